"""A call's entry in its group's queue, as the replica holding the switch's stream
writes it: joining under the replica's lease with one of the group's bounded places in
the same transaction, taking over the agent held for a matched customer, handing over
to a lease of its own when the replica stops (with a resume token), and leaving — with
the agent's interaction kept or undone in the same transaction."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Sequence

from google.protobuf import empty_pb2
from opentelemetry import propagate

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.common.v1 import common_pb2
from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline.routing.storage.v1 import storage_pb2 as rt_store
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline_server.notification import events
from accessline_server.presence import offers as pr_offers
from accessline_server.routing import journal, keys
from accessline_server.routing.accepting import connect_ops
from accessline_server.routing.queue import Rules, interaction_for
from accessline_server.routing.settle import withdraw_offer
from accessline_server.runtime.clock import timestamp
from accessline_server.runtime.errors import (
    AccesslineError,
    FieldViolation,
    InvalidArgument,
    ResourceExhausted,
)
from accessline_server.runtime.sealing import Sealer
from accessline_server.runtime.store import Compare, Entry, Op, Store
from accessline_server.runtime.validation import ID

log = logging.getLogger("accessline.routing")

QI = rt_store.QueuedInteraction
# Tries to take a call out of the queue while the dispatch leader keeps changing it.
LEAVE_ATTEMPTS = 5
# A call joining its queue tries this many random places before it looks at which are
# free, and gives up after this many tries in all.
PLACE_GUESSES = 3
PLACE_ATTEMPTS = 8
EMPTY_PB = empty_pb2.Empty()


class QueueFull(ResourceExhausted):
    """Every place of the group's queue is taken."""


def resume_token(group: str, interaction_id: str, secret: str) -> str:
    """The opaque token a switch resumes a handed-over call with."""
    raw = f"{group}:{interaction_id}:{secret}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_resume_token(token: str) -> tuple[str, str, str]:
    """(group, interaction id, secret) of a resume token; InvalidArgument if it is none."""
    refused = InvalidArgument(
        [FieldViolation("resume_token", "is not a token this service gave")],
        reason="BAD_RESUME_TOKEN",
    )
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise refused from None
    parts = raw.split(":")
    if len(parts) != 3 or not all(ID.match(p) for p in parts[:2]) or len(parts[2]) < 16:
        raise refused
    return parts[0], parts[1], parts[2]


def secret_hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def call_entry(
    request: rt_pb2.RouteInboundCallRequest,
    matched: cm_pb2.MatchCallResponse,
    where: tuple[str, str, float],
    context: common_pb2.ContextData,
    rules: Rules,
    sealer: Sealer,
) -> QI:
    """The queue entry of an inbound call (`where`: its interaction id, group and arrival
    time), carrying the current trace."""
    interaction_id, group, arrived = where
    item = interaction_for(
        interaction_id=interaction_id,
        kind=rt_store.INTERACTION_KIND_CALL,
        group=group,
        context=context,
        rules=rules,
        now=arrived,
        sealer=sealer,
        match_outcome=matched.outcome,
    )
    item.not_before.CopyFrom(timestamp(0))
    item.call_id, item.session_id = request.call_id, matched.session_id
    item.customer_id, item.application_id = matched.customer_id, matched.application_id
    item.survey_after_call = matched.survey_after_call
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    item.trace.traceparent = carrier.get("traceparent", "")
    item.trace.tracestate = carrier.get("tracestate", "")
    return item


class QueueEntries:
    """The etcd writes of the calls this replica holds in their queues."""

    def __init__(self, store: Store, rules: Rules) -> None:
        self._store = store
        self._rules = rules

    async def replica_lease(self) -> int:
        """The lease of this replica's calls, kept alive while the replica runs."""
        return await self._store.process_lease(max(5, self._rules.leader_lease))

    async def enter(
        self, group: str, key: str, item: QI, hold: Entry[rt_store.AgentHold] | None
    ) -> int:
        """Puts the call in its group's queue under this replica's lease; the revision.
        The agent held for this customer waits for this call alone: the hold's claim is
        dropped in the same transaction so the dispatcher can offer them."""
        lease = await self.replica_lease()
        queued = await told(self._store, item, events.CALL_QUEUED)
        if hold is not None:
            item.preferred_agent_id = hold.value.agent_id
            item.preferred_until.CopyFrom(
                timestamp(
                    time.time() + self._rules.offer_timeout + self._rules.dispatch_interval + 5
                )
            )
            revision = await self.join(
                group,
                key,
                item,
                lease,
                [Compare.modified_at(hold.key, hold.meta.mod_revision)],
                [Op.delete(hold.key), Op.delete(hold.value.claim_key), *queued],
            )
            if revision:
                return revision
            item.ClearField("preferred_agent_id")
            item.ClearField("preferred_until")
        return await self.join(group, key, item, lease, (), queued)

    async def join(
        self,
        group: str,
        key: str,
        item: QI,
        lease: int,
        compares: Sequence[Compare] = (),
        ops: Sequence[Op] = (),
    ) -> int:
        """Puts the call in its group's queue, holding one of the group's places in the
        same transaction (with `compares` and `ops` of the caller's); the revision, or 0
        when the caller's compares failed. QueueFull when every place is taken: the
        limit holds over all replicas, checked and counted in one step."""
        limit = self._rules.max_queue_length
        tried: set[int] = set()
        for attempt in range(PLACE_ATTEMPTS):
            if attempt < PLACE_GUESSES:
                index = random.randrange(limit)
            else:
                # The queue is filling up: look at which places are free.
                taken, _ = await self._store.get_prefix(keys.places(group), empty_pb2.Empty)
                held = {int(e.key.rsplit("/", 1)[1]) for e in taken} | tried
                free = [i for i in range(limit) if i not in held]
                if not free:
                    break
                index = random.choice(free)
            tried.add(index)
            place = keys.place(group, index)
            item.place_key = place
            result = await self._store.txn(
                [Compare.absent(place), *compares],
                [Op.put(key, item, lease), Op.put(place, EMPTY_PB, lease), *ops],
                [Op.get(place)],
            )
            if result.succeeded:
                return result.revision
            if not result.gets[0]:
                item.ClearField("place_key")
                return 0  # the place was free: the caller's compares failed
        item.ClearField("place_key")
        raise QueueFull(
            f"the queue of group {group} holds its maximum of {limit} calls",
            reason="QUEUE_FULL",
            retry_after=max(1.0, self._rules.average_handle / 4),
        )

    @staticmethod
    def place_follows(item: QI, lease: int) -> list[Op]:
        """The call's place moves to the lease its entry moves to."""
        return [Op.relet(item.place_key, lease)] if item.place_key else []

    async def leave(
        self,
        key: str,
        connected: bool,
        seen: tuple[QI, int] | None = None,
        redirect: Op | None = None,
    ) -> None:
        """Takes the call out of the queue. Connected: the agent's interaction outlives
        it from now on, and `redirect` (the record the switch may send the call back to
        the queue with) is written in the same transaction. Not connected (the caller
        hung up): an offer still open is withdrawn, and an accept that came too late is
        undone, in the same transaction that takes the call out (the agent is told the
        caller is gone). `seen` is the entry as its watch last showed it (with its
        revision): tried first, unread."""
        with contextlib.suppress(AccesslineError):
            # The leader may change the entry meanwhile (an offer, an accept): read again.
            for attempt in range(LEAVE_ATTEMPTS):
                if attempt == 0 and seen is not None:
                    item, revision = seen
                else:
                    entry = await self._store.get(key, QI)
                    if entry is None:
                        return
                    item, revision = entry.value, entry.meta.mod_revision
                target = item.connected
                if connected and target.interaction_lease:
                    kept, relet = pr_offers.interaction_connected(
                        target.agent_id, item.interaction_id, target.interaction_lease
                    )
                    out = [Op.delete(key)] + ([Op.delete(item.place_key)] if item.place_key else [])
                    also = [redirect] if redirect is not None else []
                    also += await self._told(item, events.CALL_CONNECTED)
                    await self._store.txn([kept], [*out, relet, *also], out)
                    return
                ops = [Op.delete(key)]
                if item.place_key:
                    ops.append(Op.delete(item.place_key))
                agent_id = target.agent_id or item.offer.agent_id
                if not connected and agent_id:
                    ops.append(pr_offers.interaction_abandoned(agent_id, item.interaction_id))
                if not connected:
                    ops += await self._told(item, events.CALL_ABANDONED)
                left = await self._store.txn([Compare.modified_at(key, revision)], ops)
                if left.succeeded:
                    if not connected:
                        journal.call(item, connected=False, agent_id=agent_id)
                        await withdraw_offer(self._store, item)
                    return
            log.warning("the call %s could not be taken out of the queue", key)

    async def connect_at_accept(
        self, key: str, offered: QI, revision: int, connected: QI, redirect: Op | None
    ) -> bool:
        """Takes the offered call (its entry at `revision`) out of the queue connected
        as its agent accepted, in one transaction (accepting.py); False when the entry
        or the agent's interaction changed meanwhile."""
        also = [redirect] if redirect is not None else []
        also += await self._told(connected, events.CALL_CONNECTED)
        target = connected.connected
        compares, ops = connect_ops(key, offered, revision, target, also)
        result = await self._store.txn(compares, ops, [Op.get(key)])
        if result.succeeded:
            return True
        now = result.first()
        if now is None or now.meta.mod_revision != revision:
            return False
        # The agent ended the interaction already: the call leaves connected all the
        # same, as when the leader marked it connected first (see `leave`).
        compares, ops = connect_ops(key, offered, revision, target, [], kept=False)
        return (await self._store.txn(compares, ops)).succeeded

    async def _told(self, item: QI, event: nt_pb2.WebhookEventType.ValueType) -> list[Op]:
        return await told(self._store, item, event)

    async def written(self, key: str, item: QI, writing: Awaitable[int]) -> int:
        """The revision `writing` put the call's entry `item` at (0: it did not), taken to
        its end even when the caller is cancelled meanwhile (the switch hung up, as one
        does to send the caller to its IVR at the match decision): an entry written all
        the same is then taken out again before the cancellation goes on. Otherwise it
        stayed under the replica's lease with no stream to own it, and an agent could be
        offered, and left with, a call nobody held."""
        task = asyncio.ensure_future(writing)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.shield(self._unwritten(task, key, item))
            raise

    async def _unwritten(self, task: asyncio.Future[int], key: str, item: QI) -> None:
        try:
            revision = await task
        except AccesslineError:
            return  # not written (a full queue, etcd unreachable)
        if revision:
            await self.leave(key, False, (item, revision))

    async def adopt(self, group: str, key: str, item: QI, entry: Entry[QI]) -> int:
        """A call taken up again with its token: its entry `entry` (handed over, or its
        redirect record) made this replica's as `item`; the revision, or 0 when another
        stream took it meanwhile."""
        if entry.key != key:
            return await self.rejoin(group, key, item, entry)
        lease = await self.replica_lease()
        taken = await self._store.txn(
            [Compare.modified_at(key, entry.meta.mod_revision)],
            [Op.put(key, item, lease), *self.place_follows(entry.value, lease)],
        )
        return taken.revision if taken.succeeded else 0

    async def rejoin(self, group: str, key: str, item: QI, redirect: Entry[QI]) -> int:
        """A connected call the switch sends back (its agent's phone did not take it):
        in its queue again, the agent's interaction ended, the redirect used up, in one
        transaction; the revision, or 0 when the redirect was used meanwhile. The agent
        is not offered the call again for an offer timeout."""
        agent_id = redirect.value.connected.agent_id
        item.state = rt_store.INTERACTION_STATE_QUEUED
        for name in ("connected", "offer", "place_key"):
            item.ClearField(name)
        if agent_id and agent_id not in item.tried_agent_ids:
            item.tried_agent_ids.append(agent_id)
        item.retry_tried_after.CopyFrom(timestamp(time.time() + self._rules.offer_timeout))
        ops = [Op.delete(redirect.key)]
        if agent_id:
            ops.append(pr_offers.interaction_abandoned(agent_id, item.interaction_id))
        return await self.join(
            group,
            key,
            item,
            await self.replica_lease(),
            [Compare.modified_at(redirect.key, redirect.meta.mod_revision)],
            ops,
        )


async def told(store: Store, item: QI, event: nt_pb2.WebhookEventType.ValueType) -> list[Op]:
    """The webhook event of a matched call (its application's backend is told), for the
    transaction of what happened; none for a call that did not match, nor a callback
    (told as a callback, callbacks.py)."""
    if not item.application_id or item.kind != rt_store.INTERACTION_KIND_CALL:
        return []
    data = {
        "session_id": item.session_id,
        "customer_id": item.customer_id,
        "call_id": item.call_id,
        "interaction_id": item.interaction_id,
    }
    return await events.event_ops(store, event, item.application_id, data, time.time())
