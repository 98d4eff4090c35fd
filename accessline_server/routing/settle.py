"""What becomes of an offer once it is out: the leader follows the agent's answer and
moves the interaction on — connected, or back in the queue with the agent tried — and
drops the channel's claim in every case. An unanswered offer is withdrawn and counted
against the agent (at the limit Presence sets them not ready)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from opentelemetry import metrics

from accessline.presence.storage.v1 import storage_pb2 as pr_store
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.routing.storage.v1 import storage_pb2 as rt_store
from accessline_server.presence import offers as pr_offers
from accessline_server.routing import keys
from accessline_server.routing.accepting import connect_target
from accessline_server.routing.offerfeed import OfferFeed
from accessline_server.routing.queue import Rules
from accessline_server.runtime.clock import seconds
from accessline_server.runtime.election import Term
from accessline_server.runtime.errors import AccesslineError
from accessline_server.runtime.sealing import Sealer
from accessline_server.runtime.store import Compare, Entry, EventKind, Op, Store

log = logging.getLogger("accessline.routing")

QI = rt_store.QueuedInteraction
# A fenced transaction of the leader: False when its compares failed, NotLeader when the
# fence did.
Fenced = Callable[[list[Compare], list[Op]], Awaitable[bool]]
AcceptedCallback = Callable[[Entry[QI], rt_store.ConnectTarget, Term], Coroutine[Any, Any, None]]


async def wait_answer(
    store: Store,
    offer: rt_store.OfferInFlight,
    written_at: int = 0,
    feed: OfferFeed | None = None,
) -> pr_store.StoredOffer | None:
    """The offer once it is no longer open, or None when it timed out or vanished. The
    leader that wrote the offer at `written_at` follows it from there (from the
    replica's feed of answers when it covers it); one resuming an offer of an earlier
    leader reads it first."""
    key = pr_offers.offer_key(offer.agent_id, offer.offer_id)
    since, deadline = written_at, seconds(offer.deadline)
    if feed is not None and since:
        answer = await feed.answer(key, since, deadline - time.time())
        if answer is None or isinstance(answer, pr_store.StoredOffer):
            return answer
        if time.time() >= deadline:
            return None
    if not since:
        entry = await store.get(key, pr_store.StoredOffer)
        if entry is None:
            return None
        if entry.value.state != pr_store.OFFER_STATE_OPEN:
            return entry.value
        since = entry.meta.mod_revision

    async def follow() -> pr_store.StoredOffer | None:
        async for change in store.watch_key(key, since + 1):
            if change.kind == EventKind.DELETE:
                return None
            value = change.decode(pr_store.StoredOffer)
            if value.state != pr_store.OFFER_STATE_OPEN:
                return value
        return None

    try:
        return await asyncio.wait_for(follow(), max(0.1, deadline - time.time()))
    except TimeoutError:
        return None


async def withdraw_offer(store: Store, item: QI) -> None:
    """Withdraws the offer in flight of an interaction leaving the queue, if any."""
    if item.state == rt_store.INTERACTION_STATE_OFFERED:
        await pr_offers.cancel_offer(
            store, item.offer.agent_id, item.offer.offer_id, pr_pb2.OFFER_CANCEL_REASON_WITHDRAWN
        )


class Settler:
    """Follows the offers the leader made until they are answered or time out."""

    def __init__(
        self,
        store: Store,
        rules: Rules,
        sealer: Sealer,
        fenced: Fenced,
        office: Callable[[], Term],
        on_accepted_callback: AcceptedCallback,
        meter: metrics.Meter,
        left: Callable[[str, int], Awaitable[bool]],
        feed: OfferFeed | None = None,
    ) -> None:
        self._store = store
        self._feed = feed
        # Whether an accepted call's claim went after the offer's revision (its stream's
        # replica connected it), within LEAVE_TO_STREAM_SECONDS.
        self._left = left
        self._rules = rules
        self._sealer = sealer
        self._fenced = fenced
        self._office = office
        self._on_accepted_callback = on_accepted_callback
        self._offers = meter.create_counter(
            "accessline.routing.offers", unit="{offer}", description="Offers to agents by result"
        )

    async def settle(
        self, key: str, offer: rt_store.OfferInFlight, written: Entry[QI] | None = None
    ) -> None:
        """Waits for the agent's answer and moves the interaction on: connected, or back
        in the queue with the agent tried. The claim is dropped in every case: in the
        transaction that moves the interaction on (with the agent's count of offers
        without an answer, when the agent answered), else on its own. `written` is the
        entry as this leader wrote it with the offer: the offer is followed from there,
        and a call's entry is moved on from it unread (read when its compare fails)."""
        dropped = False
        written_at = written.meta.mod_revision if written is not None else 0
        try:
            answer = await wait_answer(self._store, offer, written_at, self._feed)
            if answer is None or answer.state == pr_store.OFFER_STATE_OPEN:
                answer = await self._time_out(offer)
            result = (
                pr_store.OfferState.Name(answer.state).removeprefix("OFFER_STATE_")
                if answer is not None
                else "TIMED_OUT"
            )
            self._offers.add(1, {"accessline.offer.result": result})
            log.info(
                "offer answered",
                extra={
                    "fields": {
                        "offer_id": offer.offer_id,
                        "agent_id": offer.agent_id,
                        "result": result,
                    }
                },
            )
            drop = [Op.delete(offer.claim_key)]
            answered = answer is not None and answer.state in (
                pr_store.OFFER_STATE_ACCEPTED,
                pr_store.OFFER_STATE_DECLINED,
            )
            if answered:
                drop.append(Op.delete(keys.no_answer(offer.agent_id)))
            entry = written
            if entry is not None and entry.value.kind == rt_store.INTERACTION_KIND_CALLBACK:
                entry = None  # a callback's entry is read: its dial is written from it
            elif (
                entry is not None
                and answer is not None
                and answer.state == pr_store.OFFER_STATE_ACCEPTED
                and await self._left(offer.claim_key, written_at)
            ):
                # Connected by the replica holding its switch stream (accepting.py), the
                # claim and the agent's unanswered mark dropped with it.
                dropped = True
                return
            for _ in range(2):
                unread = entry is not None
                if entry is None:
                    entry = await self._store.get(key, QI)
                    if entry is None or entry.value.offer.offer_id != offer.offer_id:
                        return  # the caller hung up or the call moved on: nothing to update
                if answer is not None and answer.state == pr_store.OFFER_STATE_ACCEPTED:
                    channel = answer.accepted_channel or offer.channel
                    dropped = await self._accepted(
                        entry, offer, channel, answer.interaction_lease, drop
                    )
                else:
                    dropped = await self._requeue(entry, offer.agent_id, drop)
                if dropped or not unread:
                    break
                entry = None  # changed since this leader wrote it: read it, try again
            if answered and not dropped:
                await self._store.delete(keys.no_answer(offer.agent_id))
        finally:
            if not dropped:
                with contextlib.suppress(AccesslineError):
                    await self._drop_claim(key, offer, written_at)

    async def _drop_claim(self, key: str, offer: rt_store.OfferInFlight, written_at: int) -> None:
        """Drops the offer's claim, only while it is still this offer's: once it went
        (with the call, or its lease), the agent's slot may hold a newer offer's claim
        under the same key. Its create revision is the offer's own when this leader wrote
        it; one resuming an earlier leader's offer reads it."""
        created = written_at
        if not created:
            found = await self._store.get(offer.claim_key, rt_store.AgentClaim)
            if found is None or found.value.interaction_id != key.rsplit("/", 1)[-1]:
                return
            created = found.meta.create_revision
        await self._store.txn(
            [Compare.created_at(offer.claim_key, created)], [Op.delete(offer.claim_key)]
        )

    async def _time_out(self, offer: rt_store.OfferInFlight) -> pr_store.StoredOffer | None:
        """Withdraws an unanswered offer, counting the agent's offers in a row without an
        answer; at the limit Presence sets the agent not ready. Returns the answer when
        the agent answered just in time."""
        limit = self._rules.no_answer_limit
        counter = await self._store.get(keys.no_answer(offer.agent_id), rt_store.NoAnswerCount)
        count = (counter.value.count if counter else 0) + 1
        reason = (
            pr_pb2.OFFER_CANCEL_REASON_NO_ANSWER_LIMIT
            if limit and count >= limit
            else pr_pb2.OFFER_CANCEL_REASON_TIMED_OUT
        )
        withdrawn = await pr_offers.cancel_offer(
            self._store, offer.agent_id, offer.offer_id, reason
        )
        if not withdrawn:
            late = await self._store.get(
                pr_offers.offer_key(offer.agent_id, offer.offer_id), pr_store.StoredOffer
            )
            if late is not None and late.value.state in (
                pr_store.OFFER_STATE_ACCEPTED,
                pr_store.OFFER_STATE_DECLINED,
            ):
                return late.value
        if reason == pr_pb2.OFFER_CANCEL_REASON_NO_ANSWER_LIMIT:
            log.info("agent %s set not ready after %d offers without answer", offer.agent_id, count)
            await self._store.delete(keys.no_answer(offer.agent_id))
        else:
            await self._store.put(
                keys.no_answer(offer.agent_id), rt_store.NoAnswerCount(count=count)
            )
        return None

    async def _requeue(self, entry: Entry[QI], agent_id: str, also: list[Op]) -> bool:
        """Back in the queue with the agent tried, and `also` done, in one fenced
        transaction; False when the interaction changed meanwhile."""
        updated = QI()
        updated.CopyFrom(entry.value)
        updated.state = rt_store.INTERACTION_STATE_QUEUED
        updated.ClearField("offer")
        if agent_id not in updated.tried_agent_ids and len(updated.tried_agent_ids) < 200:
            updated.tried_agent_ids.append(agent_id)
        updated.retry_tried_after.FromNanoseconds(
            int((time.time() + self._rules.offer_timeout) * 1e9)
        )
        return await self._fenced(
            [Compare.modified_at(entry.key, entry.meta.mod_revision)],
            [Op.put(entry.key, updated, entry.meta.lease), *also],
        )

    async def _accepted(
        self,
        entry: Entry[QI],
        offer: rt_store.OfferInFlight,
        channel: int,
        lease: int,
        also: list[Op],
    ) -> bool:
        """The interaction connected to the agent's channel, and `also` done, in one
        fenced transaction (a callback goes to the dial instead, `also` left undone);
        whether `also` was done."""
        target = connect_target(self._sealer, offer, channel, lease)
        if entry.value.kind == rt_store.INTERACTION_KIND_CALLBACK:
            await self._on_accepted_callback(entry, target, self._office())
            return False
        updated = QI()
        updated.CopyFrom(entry.value)
        updated.state = rt_store.INTERACTION_STATE_CONNECTED
        updated.connected.CopyFrom(target)
        return await self._fenced(
            [Compare.modified_at(entry.key, entry.meta.mod_revision)],
            [Op.put(entry.key, updated, entry.meta.lease), *also],
        )
