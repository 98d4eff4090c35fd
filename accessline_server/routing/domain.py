"""Routing an inbound call, as seen from the switch's stream: have the call matched,
choose the treatment by the outcome, put the call in its group's queue in etcd and report
its progress (queued with position and estimated wait, offered, connected, failed) until
an agent accepts. The dispatch leader (dispatch.py) does the choosing and offering; the
replica holding the stream owns the queue entry (under its own kept-alive lease, written
by entries.py), so a switch that hangs up, or a replica that dies, takes the call out of
the queue. Positions and waits come from estimates.py."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.common.v1 import common_pb2
from accessline.routing.storage.v1 import storage_pb2 as rt_store
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline_server.routing import accepting, journal, keys, private
from accessline_server.routing.accepting import Accepted
from accessline_server.routing.changes import STOPPING, CallChanges
from accessline_server.routing.entries import (
    QueueEntries,
    QueueFull,
    call_entry,
    parse_resume_token,
    resume_token,
    secret_hash,
)
from accessline_server.routing.estimates import Estimates
from accessline_server.routing.measures import RouteMeasures
from accessline_server.routing.offerfeed import OfferFeed
from accessline_server.routing.queue import Rules
from accessline_server.runtime.clock import seconds, timestamp
from accessline_server.runtime.errors import (
    Aborted,
    AccesslineError,
    NotFound,
)
from accessline_server.runtime.prefixview import PrefixView
from accessline_server.runtime.sealing import Sealer
from accessline_server.runtime.store import Compare, Entry, Op, Store

if TYPE_CHECKING:
    from accessline.callmatching.v1.call_matching_pb2_grpc import CallMatchingServiceAsyncStub
    from accessline.presence.v1.presence_pb2_grpc import PresenceServiceAsyncStub

log = logging.getLogger("accessline.routing")
tracer = trace.get_tracer("accessline.routing")

QI = rt_store.QueuedInteraction


@dataclass
class _Call:
    """One call this replica holds the switch's stream of, while it is in the queue."""

    key: str
    group: str
    interaction_id: str
    arrived: float
    context: common_pb2.ContextData
    decided: rt_pb2.MatchDecided
    session_id: str
    handed_over: bool = False
    # The secret of the connect's redirect token.
    redirect_secret: str = ""
    # The queue entry as last seen on its watch, with its revision.
    seen: tuple[QI, int] | None = None
    # Out of the queue already (connected at the agent's accept).
    left: bool = False


class Router:
    """Holds the switch's streams; safe to run as several replicas."""

    def __init__(
        self,
        store: Store,
        matching: CallMatchingServiceAsyncStub,
        presence: PresenceServiceAsyncStub,
        rules: Rules,
        sealer: Sealer,
        stopping: asyncio.Event,
        wake: Callable[[], None] = lambda: None,
        meter: metrics.Meter | None = None,
        holds: PrefixView[rt_store.AgentHold] | None = None,
        offers: OfferFeed | None = None,
    ) -> None:
        self._store = self.store = store
        # The answers to offers, from one watch of this replica (offerfeed.py).
        self._offers = offers
        # The agents held for customers (`rt/holds/`), watch-synced; read when not loaded.
        self._holds = holds
        self._matching = matching
        self._presence = presence
        self._rules = rules
        self._sealer = sealer
        self._stopping = stopping
        self._wake = wake
        self.estimates = Estimates(store, presence, rules)
        self._entries = QueueEntries(store, rules)
        meter = meter or metrics.get_meter("accessline.routing")
        self._measures = RouteMeasures(meter)

    async def route(
        self, request: rt_pb2.RouteInboundCallRequest
    ) -> AsyncIterator[rt_pb2.RouteInboundCallResponse]:
        """One inbound call on the switch's stream: the match decision (CallMatching),
        then the queue of its group until an agent accepts, or a `failed` event."""
        interaction_id = "i" + secrets.token_urlsafe(12)
        stamped = request.HasField("call_arrived_at")
        arrived = seconds(request.call_arrived_at) if stamped else time.time()

        def event(**fields: Any) -> rt_pb2.RouteInboundCallResponse:
            return rt_pb2.RouteInboundCallResponse(interaction_id=interaction_id, **fields)

        matched, decided, hold = await self._decide(request, interaction_id)
        self._measures.decided(interaction_id, decided, arrived, stamped)
        group = decided.resource_group
        yield event(match_decided=decided)
        if not group:
            yield event(
                failed=rt_pb2.Failed(
                    reason=rt_pb2.FAILURE_REASON_UNKNOWN_NUMBER,
                    message="the dialled number routes to no group",
                )
            )
            return
        try:
            is_match = matched.outcome == cm_pb2.MATCH_OUTCOME_MATCHED
            context = matched.context if is_match else common_pb2.ContextData()
            if hold is None:
                _, staffed = await self.estimates.availability(group)
                if staffed == 0:
                    yield event(
                        failed=rt_pb2.Failed(
                            reason=rt_pb2.FAILURE_REASON_NO_AGENTS,
                            message="no agent of the group is logged in",
                        )
                    )
                    return
            item = call_entry(
                request,
                matched,
                (interaction_id, group, arrived),
                context,
                self._rules,
                self._sealer,
            )
            key = keys.queued(group, interaction_id)
            entering = self._entries.enter(group, key, item, hold)
            revision = await self._entries.written(key, item, entering)
            call = _Call(
                key=key,
                group=group,
                interaction_id=interaction_id,
                arrived=arrived,
                context=context,
                decided=decided,
                session_id=matched.session_id,
            )
            async for update in self._attend(call, item, revision):
                yield update
        except QueueFull as full:
            failed = rt_pb2.Failed(reason=rt_pb2.FAILURE_REASON_QUEUE_FULL, message=full.message)
            failed.retry_after.FromNanoseconds(int((full.retry_after or 1.0) * 1e9))
            yield event(failed=failed)
        except AccesslineError as exc:
            # The switch already has the match decision: tell it on the stream.
            log.warning("routing of %s stopped: %s", interaction_id, exc.message)
            yield event(
                failed=rt_pb2.Failed(
                    reason=rt_pb2.FAILURE_REASON_UNAVAILABLE,
                    message=f"routing could not go on ({exc.reason}); try again",
                )
            )

    async def _decide(
        self, request: rt_pb2.RouteInboundCallRequest, interaction_id: str
    ) -> tuple[cm_pb2.MatchCallResponse, rt_pb2.MatchDecided, Entry[rt_store.AgentHold] | None]:
        """The match (CallMatching's MatchCall), the treatment and group it decides, and
        the agent held for the matched customer, if any (their group wins)."""
        match = cm_pb2.MatchCallRequest(
            call_id=request.call_id,
            dnis=request.dnis,
            ani=request.ani,
            dtmf_digits=request.dtmf_digits,
        )
        if request.HasField("call_arrived_at"):
            match.call_arrived_at.CopyFrom(request.call_arrived_at)
        matched = await self._matching.MatchCall(match)
        is_match = matched.outcome == cm_pb2.MATCH_OUTCOME_MATCHED
        span = trace.get_current_span()
        span.set_attribute("accessline.match.outcome", cm_pb2.MatchOutcome.Name(matched.outcome))
        span.set_attribute("accessline.interaction", interaction_id)
        if is_match:
            treatment = (
                rt_pb2.TREATMENT_SKIP_IVR if matched.skip_ivr else rt_pb2.TREATMENT_IVR_STANDARD
            )
        else:
            treatment = rt_pb2.TREATMENT_IVR_AUTHENTICATE
        hold = None
        if is_match and matched.customer_id:
            key = keys.hold(self._sealer, matched.customer_id)
            if self._holds is not None and self._holds.loaded:
                # Held agents are seconds old when their customer calls (the customer was
                # told first); the queue's transaction compares the hold taken.
                hold = self._holds.get(key)
            else:
                hold = await self._store.get(key, rt_store.AgentHold)
        group = (
            hold.value.resource_group
            if hold is not None
            else matched.resource_group or self._rules.default_group
        )
        decided = rt_pb2.MatchDecided(
            outcome=matched.outcome,
            treatment=treatment,
            session_id=matched.session_id,
            resource_group=group,
        )
        return matched, decided, hold

    async def resume(
        self, request: rt_pb2.RouteInboundCallRequest
    ) -> AsyncIterator[rt_pb2.RouteInboundCallResponse]:
        """Takes over a call a stopping replica handed over (its token from `failed`
        SERVER_STOPPING), or one whose agent's phone did not take it (the token from
        `connect`): no new match, the same interaction with its age in the queue (and
        its place, when handed over). The stream starts again with the match decision."""
        group, interaction_id, secret = parse_resume_token(request.resume_token)
        key = keys.queued(group, interaction_id)
        entry = await self._store.get(key, QI)
        if entry is None:
            entry = await self._store.get(keys.redirect(interaction_id), QI)
        if (
            entry is None
            or not entry.value.resume_hash
            or not hmac.compare_digest(secret_hash(secret), entry.value.resume_hash)
            or entry.value.call_id != request.call_id
        ):
            raise NotFound(
                "no call waits to be resumed with this token (its place ended, or it was"
                " resumed already)",
                reason="RESUME_UNKNOWN",
            )
        item = entry.value
        context = (
            common_pb2.ContextData.FromString(
                self._sealer.unseal(item.sealed_context, interaction_id)
            )
            if item.sealed_context
            else common_pb2.ContextData()
        )
        decided = rt_pb2.MatchDecided()
        decided.CopyFrom(item.match_decided)
        adopted = QI()
        adopted.CopyFrom(item)
        for name in ("detached_until", "resume_hash", "sealed_context", "match_decided"):
            adopted.ClearField(name)
        adopting = self._entries.adopt(group, key, adopted, entry)
        revision = await self._entries.written(key, adopted, adopting)
        if not revision:
            raise Aborted(
                "the call was resumed by another stream at the same moment",
                reason="RESUME_RACE",
            )
        log.info("call resumed", extra={"fields": {"interaction_id": interaction_id}})
        yield rt_pb2.RouteInboundCallResponse(interaction_id=interaction_id, match_decided=decided)
        call = _Call(
            key=key,
            group=group,
            interaction_id=interaction_id,
            arrived=seconds(item.created_at),
            context=context,
            decided=decided,
            session_id=item.session_id,
        )
        async for update in self._attend(call, adopted, revision):
            yield update

    async def _attend(
        self, call: _Call, item: QI, revision: int
    ) -> AsyncIterator[rt_pb2.RouteInboundCallResponse]:
        """The call's progress until it connects, fails, is handed over or hangs up; then
        it leaves the queue (unless handed over). A connected call leaves before the
        switch hears `connect`, so its redirect record is there for the switch at once."""
        self._wake()
        self._measures.waiting(1)
        left = False
        try:
            async for update in self._follow(call, item, revision):
                if update.WhichOneof("event") == "connect":
                    update.connect.context.CopyFrom(call.context)
                    update.connect.session_id = call.session_id
                    if not call.left:
                        redirect = await self._redirect(call)
                        leaving = self._entries.leave(call.key, True, call.seen, redirect)
                        await asyncio.shield(leaving)
                    left = True
                update.interaction_id = call.interaction_id
                yield update
        finally:
            self._measures.waiting(-1)
            if not call.handed_over and not left:
                await asyncio.shield(self._entries.leave(call.key, False, call.seen))

    async def _redirect(self, call: _Call) -> Op | None:
        """The record the switch sends the connected call back to its queue with (its
        agent's phone did not take it), under a lease that ends with the redirect time."""
        if call.seen is None or not call.redirect_secret:
            return None
        record = self._resumable(call, call.seen[0], call.redirect_secret)
        with contextlib.suppress(AccesslineError):
            lease = await self._store.shared_lease(self._rules.redirect_window)
            return Op.put(keys.redirect(call.interaction_id), record, lease)
        return None

    def _resumable(self, call: _Call, current: QI, secret: str) -> QI:
        """The call's entry as a switch takes it up again with a token (after a hand-over
        or a redirect): the token's hash, the match decision and the context, sealed."""
        record = QI()
        record.CopyFrom(current)
        record.resume_hash = secret_hash(secret)
        record.match_decided.CopyFrom(call.decided)
        if call.context.ByteSize():
            record.sealed_context = self._sealer.seal(
                call.context.SerializeToString(), call.interaction_id
            )
        return record

    async def _hand_over(
        self, call: _Call, current: QI, revision: int
    ) -> rt_pb2.RouteInboundCallResponse | None:
        """This replica is stopping: the waiting call keeps its place under a lease of its
        own for the resume window, and the switch gets the token to resume it elsewhere.
        None when the entry changed meanwhile (an offer went out: follow that first)."""
        secret = secrets.token_urlsafe(24)
        until = time.time() + self._rules.resume_window
        updated = self._resumable(call, current, secret)
        updated.detached_until.CopyFrom(timestamp(until))
        lease = await self._store.shared_lease(self._rules.resume_window)
        moved = await self._store.txn(
            [Compare.modified_at(call.key, revision)],
            [Op.put(call.key, updated, lease), *self._entries.place_follows(current, lease)],
        )
        if not moved.succeeded:
            return None
        call.handed_over = True
        log.info("call handed over", extra={"fields": {"interaction_id": call.interaction_id}})
        failed = rt_pb2.Failed(
            reason=rt_pb2.FAILURE_REASON_SERVER_STOPPING,
            message="this Routing replica is stopping; resume the call with the token",
            resume_token=resume_token(call.group, call.interaction_id, secret),
        )
        failed.retry_after.FromSeconds(1)
        failed.resume_before.CopyFrom(timestamp(until))
        return rt_pb2.RouteInboundCallResponse(failed=failed)

    async def _follow(
        self, call: _Call, item: QI, revision: int
    ) -> AsyncIterator[rt_pb2.RouteInboundCallResponse]:
        """The call's progress as its queue entry (written at `revision`) changes, and its
        position refreshed every queue update interval while it waits. When the replica
        stops, a waiting call is handed over; one being offered finishes its offer first."""
        changes = CallChanges(self._store, call.key, revision, self._stopping, self._offers)
        current: QI | None = item
        shown_queue: tuple[int, int] | None = None
        shown_offer = ""
        try:
            while True:
                if current is None:
                    yield self._lost()
                    return
                call.seen = (current, revision)
                if current.state == rt_store.INTERACTION_STATE_CONNECTED:
                    yield self._connect(call, current)
                    return
                if current.state == rt_store.INTERACTION_STATE_QUEUED and self._stopping.is_set():
                    handed = await self._hand_over(call, current, revision)
                    if handed is not None:
                        yield handed
                        return
                if current.state == rt_store.INTERACTION_STATE_OFFERED:
                    changes.follow_offer(current, revision)
                    if current.offer.offer_id != shown_offer:
                        shown_offer = current.offer.offer_id
                        shown_queue = None
                        yield rt_pb2.RouteInboundCallResponse(
                            offered=rt_pb2.Offered(
                                agent_id=current.offer.agent_id,
                                channel=current.offer.channel,
                                deadline=current.offer.deadline,
                            )
                        )
                elif current.state == rt_store.INTERACTION_STATE_QUEUED:
                    place = await self._place(call, current, shown_queue)
                    if place != shown_queue and place is not None:
                        shown_queue = place
                        queued = rt_pb2.Queued(position=place[0])
                        queued.estimated_wait.FromSeconds(place[1])
                        yield rt_pb2.RouteInboundCallResponse(queued=queued)
                left = self._rules.max_queue - (time.time() - call.arrived)
                if left <= 0:
                    yield rt_pb2.RouteInboundCallResponse(
                        failed=rt_pb2.Failed(
                            reason=rt_pb2.FAILURE_REASON_QUEUE_TIMEOUT,
                            message="the call waited longer than the maximum queue time",
                        )
                    )
                    return
                change = await changes.next(min(left, self._rules.queue_update))
                if change is None:
                    if changes.lost():
                        current = None
                elif isinstance(change, Accepted):
                    update = await self._connect_at_accept(call, current, revision, change)
                    if update is not None:
                        yield update
                        return
                elif change is not STOPPING:
                    current, revision = change  # type: ignore[misc]
        finally:
            await changes.close()

    async def _connect_at_accept(
        self, call: _Call, current: QI, revision: int, accepted: Accepted
    ) -> rt_pb2.RouteInboundCallResponse | None:
        """The switch's `connect` for the call its agent just accepted, once the call is
        out of the queue connected (accepting.py); None when the entry changed meanwhile
        (the leader moved it on: follow that)."""
        offer = current.offer
        if current.state != rt_store.INTERACTION_STATE_OFFERED or (
            offer.offer_id != accepted.offer_id
        ):
            return None
        item = accepting.connected(self._sealer, current, accepted.answer)
        call.seen, call.redirect_secret = (item, revision), secrets.token_urlsafe(24)
        redirect = await self._redirect(call)
        out = self._entries.connect_at_accept(call.key, current, revision, item, redirect)
        if not await asyncio.shield(out):
            call.seen, call.redirect_secret = (current, revision), ""
            return None
        call.left = True
        return self._connect(call, item)

    def _connect(self, call: _Call, current: QI) -> rt_pb2.RouteInboundCallResponse:
        """The switch's `connect` event for a call an agent accepted."""
        self._measures.accepted(call.arrived)
        target = current.connected
        # In the customer's journey the moment the switch is told (the queue entry may be
        # gone by the time the call leaves it: an agent who ends the interaction at once).
        journal.call(current, connected=True, agent_id=target.agent_id)
        call.redirect_secret = call.redirect_secret or secrets.token_urlsafe(24)
        connect = rt_pb2.Connect(
            agent_id=target.agent_id,
            channel=target.channel,
            address=private.target_address(self._sealer, target),
            redirect_token=resume_token(call.group, call.interaction_id, call.redirect_secret),
        )
        connect.redirect_before.CopyFrom(timestamp(time.time() + self._rules.redirect_window))
        return rt_pb2.RouteInboundCallResponse(connect=connect)

    async def _place(
        self, call: _Call, current: QI, shown: tuple[int, int] | None
    ) -> tuple[int, int] | None:
        """The call's (position, estimated wait) now, None while it has no position; the
        one shown last when etcd or Presence is unreachable (the call's place lives on
        under its lease; only the refresh of its position waits)."""
        try:
            position, wait = await self.estimates.position(call.group, current)
        except AccesslineError as exc:
            log.debug("position of %s not refreshed: %s", call.key, exc.message)
            return shown
        return (position, wait) if position else None

    @staticmethod
    def _lost() -> rt_pb2.RouteInboundCallResponse:
        return rt_pb2.RouteInboundCallResponse(
            failed=rt_pb2.Failed(
                reason=rt_pb2.FAILURE_REASON_UNAVAILABLE,
                message="the call's place in the queue was lost (etcd lease ended)",
            )
        )
