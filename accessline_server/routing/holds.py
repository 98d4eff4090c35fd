"""Notify when available: agents left over by a dispatch pass are held, one each, for
the customers who asked to be told an agent is free (oldest request first). A hold
claims a slot of the agent's channel, starts the customer's handoff for the time of the
hold and pushes "an agent is available"; the customer's call then goes to that agent."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import TYPE_CHECKING

import grpc
from opentelemetry import metrics

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.common.v1 import common_pb2
from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline.routing.storage.v1 import storage_pb2 as rt_store
from accessline_server.notification import events
from accessline_server.routing import journal, keys
from accessline_server.routing.plan import GroupState, eligible, reserved_agents
from accessline_server.routing.queue import Candidate, Rules, rank
from accessline_server.routing.settle import Fenced
from accessline_server.runtime.errors import AccesslineError
from accessline_server.runtime.peers import PeerError
from accessline_server.runtime.sealing import Sealer
from accessline_server.runtime.store import Compare, Entry, Op, Store

if TYPE_CHECKING:
    from accessline.callmatching.v1.call_matching_pb2_grpc import CallMatchingServiceAsyncStub
    from accessline.notification.v1.notification_pb2_grpc import NotificationServiceAsyncStub

log = logging.getLogger("accessline.routing")

QI = rt_store.QueuedInteraction
# Errors of StartHandoff that retrying will not mend: the notify request is dropped.
FINAL_PEER_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
}


class Holds:
    """Holds agents for the customers who asked to be told one is free."""

    def __init__(
        self,
        store: Store,
        matching: CallMatchingServiceAsyncStub,
        notification: NotificationServiceAsyncStub,
        rules: Rules,
        sealer: Sealer,
        fenced: Fenced,
        meter: metrics.Meter,
    ) -> None:
        self._store = store
        self._matching = matching
        self._notification = notification
        self._rules = rules
        self._sealer = sealer
        self._fenced = fenced
        self._holds = meter.create_counter(
            "accessline.routing.holds",
            unit="{hold}",
            description="Agents held for customers told an agent is available",
        )

    async def hold_for(
        self,
        asks: list[Entry[rt_store.NotifyRequest]],
        state: GroupState,
        taken: set[str],
        now: float,
    ) -> None:
        """Holds an agent, not taken by this pass's offers, for each customer who asked
        to be told one is available (oldest request first)."""
        reserved = reserved_agents(state.entries, now)
        for ask in asks:
            probe = QI(
                channel=ask.value.request.channel or common_pb2.CHANNEL_DESK_VOICE,
                interaction_id=ask.value.request_id,
            )
            ranked = rank(state.agents, state.shown, probe, self._rules)
            for candidate in eligible(ranked, probe, reserved, taken, now):
                taken.add(candidate.agent.agent_id)
                if await self._hold(ask, candidate):
                    break

    async def _claim(
        self, candidate: Candidate, record: rt_store.AgentClaim, ttl: float
    ) -> tuple[int, str] | None:
        """Holds a free slot of the agent's channel under a new lease: (lease, key), or
        None when every slot is held."""
        capacity = next(
            (c.capacity or 1 for c in candidate.agent.channels if c.channel == candidate.channel), 1
        )
        lease = await self._store.grant_lease(max(1, math.ceil(ttl)))
        for slot in range(capacity):
            key = keys.claim(candidate.agent.agent_id, candidate.channel, slot)
            if await self._store.create(key, record, lease) is not None:
                return lease, key
        await self._store.revoke_lease(lease)
        return None

    async def _told(self, ask: rt_store.NotifyRequest, session_id: str) -> list[Op]:
        """The `availability.notified` webhook event, for the hold's transaction."""
        if not ask.application_id:
            return []
        data = {
            "request_id": ask.request_id,
            "session_id": session_id,
            "customer_id": ask.request.customer_id,
        }
        notified = events.AVAILABILITY_NOTIFIED
        return await events.event_ops(self._store, notified, ask.application_id, data, time.time())

    async def _hold(self, ask: Entry[rt_store.NotifyRequest], candidate: Candidate) -> bool:
        """Holds a free agent for a customer who asked to be told, starts their handoff
        (number and code for the time of the hold) and pushes "an agent is available"."""
        request = ask.value.request
        hold_key = keys.hold(self._sealer, request.customer_id)
        if await self._store.get(hold_key, rt_store.AgentHold) is not None:
            return False  # this customer already has an agent held
        claimed = await self._claim(
            candidate,
            rt_store.AgentClaim(interaction_id=ask.value.request_id),
            self._rules.hold,
        )
        if claimed is None:
            return False
        lease, claim_key = claimed
        try:
            handoff = cm_pb2.StartHandoffRequest.FromString(
                self._sealer.unseal(ask.value.sealed_handoff, ask.value.request_id)
            )
            handoff.customer_id = request.customer_id
            handoff.idempotency_key = ask.value.request_id
            handoff.ttl.FromNanoseconds(int(self._rules.hold * 1e9))
            started = await self._matching.StartHandoff(handoff)
            publish = nt_pb2.PublishRequest(
                customer_id=request.customer_id,
                event_type=nt_pb2.EVENT_TYPE_AGENT_AVAILABLE,
                title="An agent is available",
                body="Open the app to call now.",
                data={"request_id": ask.value.request_id, "session_id": started.session_id},
                idempotency_key=f"agent-available-{ask.value.request_id}",
                priority=nt_pb2.PRIORITY_HIGH,
                collapse_key="agent-available",
                application_id=ask.value.application_id,
            )
            publish.ttl.FromNanoseconds(int(self._rules.hold * 1e9))
            await self._notification.Publish(publish)
            hold = rt_store.AgentHold(
                agent_id=candidate.agent.agent_id,
                channel=candidate.channel,
                claim_key=claim_key,
                request_id=ask.value.request_id,
                resource_group=request.resource_group,
            )
            hold.until.FromNanoseconds(int((time.time() + self._rules.hold) * 1e9))
            told = await self._told(ask.value, started.session_id)
            ok = await self._fenced(
                [Compare.modified_at(ask.key, ask.meta.mod_revision), Compare.absent(hold_key)],
                [Op.put(hold_key, hold, lease), Op.delete(ask.key), *told],
            )
        except PeerError as exc:
            await self._store.revoke_lease(lease)
            if exc.code in FINAL_PEER_CODES:
                log.warning("notify request %s dropped: %s", ask.value.request_id, exc)
                await self._store.txn(
                    [Compare.modified_at(ask.key, ask.meta.mod_revision)], [Op.delete(ask.key)]
                )
            else:
                log.warning("notify request %s waits: %s", ask.value.request_id, exc)
            return False
        except BaseException:
            with contextlib.suppress(AccesslineError):
                await self._store.revoke_lease(lease)
            raise
        if not ok:
            await self._store.revoke_lease(lease)
            return False
        self._holds.add(1)
        journal.notify_request(
            ask.value.application_id,
            ask.value.request_id,
            journal.ANSWERED,
            outcome="AGENT_HELD",
        )
        return True
