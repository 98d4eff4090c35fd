"""The dispatch loop: one Routing replica at a time (the holder of `rt/leader`) serves the
queues. Each pass takes every group's queue from the leader's copy of its keys (mirror.py),
orders it by priority then age, and for each waiting interaction claims the best free
agent and offers it through Presence; agents left over are held for customers who asked
to be told when an agent is free (holds.py). Every
write the leader makes is fenced by the create revision of its `rt/leader` key, so a
leader whose lease ran out can no longer change anything. Offers in flight are recorded
in the queue, so a new leader resumes them where the old one stopped (settle.py):
nothing queued is lost."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace

from accessline.common.v1 import common_pb2
from accessline.presence.storage.v1 import storage_pb2 as pr_store
from accessline.routing.storage.v1 import storage_pb2 as rt_store
from accessline_server.notification import events
from accessline_server.presence import offers as pr_offers
from accessline_server.presence import roster as pr_roster
from accessline_server.routing import journal, keys, private
from accessline_server.routing.accepting import LEAVE_TO_STREAM_SECONDS
from accessline_server.routing.entries import told
from accessline_server.routing.holds import Holds
from accessline_server.routing.mirror import DispatchMirror, Snapshot, read_snapshot
from accessline_server.routing.offerfeed import OfferFeed
from accessline_server.routing.plan import (
    GroupState,
    OfferPlan,
    mark_claimed_busy,
    plan_offers,
    ready_to_offer,
)
from accessline_server.routing.queue import Candidate, Rules
from accessline_server.routing.settle import AcceptedCallback, Settler
from accessline_server.routing.view import AgentView
from accessline_server.routing.wakes import Wakes
from accessline_server.runtime.backoff import Backoff
from accessline_server.runtime.clock import seconds
from accessline_server.runtime.election import Election, NotLeader, Term
from accessline_server.runtime.errors import AccesslineError
from accessline_server.runtime.sealing import Sealer
from accessline_server.runtime.store import (
    Compare,
    Entry,
    KeyMeta,
    Op,
    Store,
    WatchCompacted,
    WatchEvent,
)
from accessline_server.runtime.telemetry import context_from

if TYPE_CHECKING:
    from accessline.callmatching.v1.call_matching_pb2_grpc import CallMatchingServiceAsyncStub
    from accessline.notification.v1.notification_pb2_grpc import NotificationServiceAsyncStub

log = logging.getLogger("accessline.routing")
# How long a pass waits for the leader's copy to show the leader's own last write before
# it reads etcd instead (the watch delivers it within milliseconds).
MIRROR_WAIT = 1.0
tracer = trace.get_tracer("accessline.routing")

QI = rt_store.QueuedInteraction


class Dispatcher:
    """Campaigns for `rt/leader` and, while it leads, runs the dispatch passes."""

    def __init__(
        self,
        store: Store,
        matching: CallMatchingServiceAsyncStub,
        notification: NotificationServiceAsyncStub,
        rules: Rules,
        sealer: Sealer,
        presence_sealing: pr_roster.Sealing,
        replica_id: str,
        on_accepted_callback: AcceptedCallback,
        sweep: Callable[
            [list[Entry[QI]], list[Entry[rt_store.PendingDial]], float],
            Coroutine[Any, Any, None],
        ],
        meter: metrics.Meter | None = None,
        doorbell: asyncio.Event | None = None,
        offers: OfferFeed | None = None,
    ) -> None:
        self._store = store
        self._rules = rules
        self._sealer = sealer
        self._presence_sealing = presence_sealing
        self._replica = replica_id
        self._sweep = sweep
        # Rung (set) by whatever makes work for the leader: a call queued, an agent free.
        self._wake = doorbell or asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._follows: dict[str, asyncio.Task[None]] = {}
        self._election = Election(store, keys.LEADER, rules.leader_lease)
        # The current term while this replica leads (its fence guards every write).
        self._term: Term | None = None
        # Whether the last pass found nothing waiting (no call queued, no request, no
        # dial): an agent freed then makes no work, and what does make work (a call
        # queued...) wakes the loop by itself, whose pass takes presence from the copy.
        self._idle = False
        self._view = AgentView(presence_sealing, self._agents_changed)
        # The leader's copy of what a pass plans from (mirror.py), while it leads, and
        # the revision of the leader's last write, which a pass waits for the copy to see.
        self._mirror: DispatchMirror | None = None
        self._written = 0
        self.leading = asyncio.Event()
        meter = meter or metrics.get_meter("accessline.routing")
        self._settler = Settler(
            store,
            rules,
            sealer,
            self._txn,
            lambda: self._office,
            on_accepted_callback,
            meter,
            self._left_to_stream,
            offers,
        )
        self._holds = Holds(store, matching, notification, rules, sealer, self._txn, meter)
        meter.create_observable_gauge(
            "accessline.routing.leader",
            callbacks=[lambda _: [metrics.Observation(1 if self.leading.is_set() else 0)]],
            description="1 on the replica running the dispatch loop",
        )
        # Per group: (waiting for an agent, of which past their SLA target), as the
        # leader's last pass saw the queue; a group once seen stays, at zero when empty.
        self._waiting: dict[str, tuple[int, int]] = {}
        meter.create_observable_gauge(
            "accessline.routing.queue.waiting",
            callbacks=[lambda _: self._observe_waiting(0)],
            unit="{interaction}",
            description="Interactions waiting for an agent, per group (the dispatch leader's view)",
        )
        meter.create_observable_gauge(
            "accessline.routing.queue.past_sla",
            callbacks=[lambda _: self._observe_waiting(1)],
            unit="{interaction}",
            description="Interactions waiting longer than their SLA target, per group"
            " (the dispatch leader's view)",
        )

    def _observe_waiting(self, which: int) -> list[metrics.Observation]:
        if not self.leading.is_set():
            return []
        return [
            metrics.Observation(counts[which], {"accessline.group": group})
            for group, counts in list(self._waiting.items())
        ]

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._campaign())

    def wake(self) -> None:
        self._wake.set()

    def _agents_changed(self) -> None:
        if not self._idle:
            self._wake.set()

    async def stop(self) -> None:
        """Stops dispatching and, when leading, steps down at once so another replica
        takes over without waiting for the lease to run out."""
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _campaign(self) -> None:
        backoff = Backoff(0.2, 5.0)
        while not self._stopping.is_set():
            try:
                await self._term_of_office()
                backoff.reset()
                continue
            except (AccesslineError, NotLeader, WatchCompacted) as exc:
                log.warning("dispatch leadership interrupted: %s", exc)
            except Exception:
                # A bug must not end dispatching on this replica for good: log it with
                # its trace and campaign again.
                log.exception("dispatch loop failed")
            # Back off before campaigning again (etcd unreachable, lease lost).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff.next())

    def _leader_record(self) -> rt_store.Leader:
        leader = rt_store.Leader(replica_id=self._replica)
        leader.since.FromNanoseconds(time.time_ns())
        return leader

    async def _term_of_office(self) -> None:
        """Campaigns for `rt/leader`; once elected, leads while the term holds, then
        resigns (another replica may lead at once)."""
        term = await self._election.campaign(self._leader_record, self._stopping)
        if term is None:
            return
        self._term = term
        log.info("this replica now runs the dispatch loop")
        try:
            await self._lead(term.lost)
        finally:
            self.leading.clear()
            log.info("this replica no longer runs the dispatch loop")
            await term.resign()

    async def _lead(self, lost: asyncio.Event) -> None:
        self.leading.set()
        self._idle = False
        self._view = AgentView(self._presence_sealing, self._agents_changed)
        wakes = Wakes()

        def on_event(event: WatchEvent) -> None:
            if event.key.startswith(keys.ROOT) and wakes.work(event):
                self._wake.set()

        self._mirror = mirror = DispatchMirror(self._store, self._view, on_event)
        watchers = [asyncio.ensure_future(mirror.run())]
        try:
            # The first pass waits for the copy to be loaded.
            starting = [asyncio.ensure_future(e.wait()) for e in (mirror.loaded, lost)]
            try:
                await asyncio.wait([*starting, *watchers], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in starting:
                    waiter.cancel()
            while not lost.is_set() and not self._stopping.is_set():
                for watcher in watchers:
                    if watcher.done():
                        watcher.result()  # a watch that failed ends the leadership
                self._wake.clear()
                await self._pass()
                waits = [asyncio.ensure_future(e.wait()) for e in (self._wake, lost)]
                try:
                    await asyncio.wait(
                        waits,
                        timeout=self._rules.dispatch_interval,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    for w in waits:
                        w.cancel()
        finally:
            for task in [*watchers, *self._follows.values()]:
                task.cancel()
            await asyncio.gather(*watchers, *self._follows.values(), return_exceptions=True)
            self._follows.clear()
            self._mirror = None

    @property
    def _office(self) -> Term:
        """The term this replica leads in (only called while leading)."""
        if self._term is None:
            raise NotLeader("this replica has not been elected")
        return self._term

    async def _txn(self, compares: list[Compare], ops: list[Op]) -> bool:
        """A fenced transaction: False when `compares` failed, NotLeader when the fence did."""
        term = self._office
        result = await self._store.txn([term.fence(), *compares], ops, [term.read()])
        term.check(result)
        if result.succeeded:
            self._written = max(self._written, result.revision)
        return result.succeeded

    # -- one pass ---------------------------------------------------------------------

    async def _snapshot(self) -> Snapshot:
        """What the pass plans from: the leader's copy once it has the leader's own last
        write (within MIRROR_WAIT seconds), else one read of etcd."""
        mirror = self._mirror
        if mirror is not None and await mirror.wait_for(self._written, MIRROR_WAIT):
            return mirror.snapshot()
        return await read_snapshot(self._store)

    async def _left_to_stream(self, claim_key: str, since: int) -> bool:
        """Whether an accepted call's claim went within LEAVE_TO_STREAM_SECONDS, as the
        leader's copy shows it (settles run only while it leads, and so has a copy; False
        without one: the settle then reads the entry)."""
        mirror = self._mirror
        if mirror is None:
            return False
        return await mirror.released(claim_key, since, LEAVE_TO_STREAM_SECONDS)

    async def _pass(self) -> None:
        """Snapshot, then per group: plan the offers (plan.py), make them, and hold
        agents for the customers who asked to be told one is available."""
        now = time.time()
        snapshot = await self._snapshot()
        self._idle = not (snapshot.requests or snapshot.dials) and not any(
            e.value.state == rt_store.INTERACTION_STATE_QUEUED for e in snapshot.queued
        )
        await self._sweep(snapshot.queued, snapshot.dials, now)
        by_group: dict[str, list[Entry[QI]]] = defaultdict(list)
        waiting = dict.fromkeys(self._waiting, (0, 0))
        for entry in snapshot.queued:
            by_group[entry.value.resource_group].append(entry)
            waiting[entry.value.resource_group] = _counted(
                waiting.get(entry.value.resource_group, (0, 0)), entry.value, now
            )
            if (
                entry.value.state == rt_store.INTERACTION_STATE_OFFERED
                and entry.value.interaction_id not in self._follows
            ):
                self._follow_offer(entry)
        self._waiting = waiting
        asks_by_group: dict[str, list[Entry[rt_store.NotifyRequest]]] = defaultdict(list)
        for request in snapshot.requests:
            if seconds(request.value.active_at) <= now:
                asks_by_group[request.value.request.resource_group].append(request)
        for group in sorted(set(by_group) | set(asks_by_group)):
            entries = by_group.get(group, [])
            asks = sorted(asks_by_group.get(group, []), key=lambda r: seconds(r.value.created_at))
            if not asks and not ready_to_offer((e.value for e in entries), now):
                continue
            agents, shown = self._view.group(group, snapshot.presence)
            mark_claimed_busy(shown, snapshot.claimed)
            state = GroupState(agents, shown, [e.value for e in entries])
            planned = plan_offers(state, self._rules, now, self._location)
            await self._make_offers(entries, planned)
            await self._holds.hold_for(asks, state, planned.taken, now)

    def _location(self, item: QI) -> common_pb2.GeoPoint | None:
        where = private.interaction(self._sealer, item)
        return where.location if where.HasField("location") else None

    async def _make_offers(self, entries: list[Entry[QI]], planned: OfferPlan) -> None:
        """The offers of one pass go out together. One that lost a race (the call changed,
        a slot was claimed meanwhile) waits for the next pass, which that very change in
        etcd wakes."""
        by_id = {e.value.interaction_id: e for e in entries}
        results = await asyncio.gather(
            *(self._offer(by_id[item.interaction_id], chosen) for item, chosen in planned.offers),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, NotLeader):
                raise result
            if isinstance(result, BaseException):
                log.warning("offer failed: %s", result)

    def _new_offer(self, entry: Entry[QI], candidate: Candidate) -> pr_store.StoredOffer:
        """The offer of the interaction to the candidate, in the trace of its call."""
        item = entry.value
        agent = candidate.agent
        with tracer.start_as_current_span(
            "accessline.agent.claim",
            context=context_from(item.trace.traceparent, item.trace.tracestate)
            if item.trace.traceparent
            else None,
            attributes={"accessline.agent": agent.agent_id},
        ):
            what = private.interaction(self._sealer, item)
            return pr_offers.new_offer(
                agent.agent_id,
                item.interaction_id,
                candidate.channel,
                what.summary,
                self._rules.offer_timeout,
                self._presence_sealing,
                # An accept holds only while the caller still has this place in the queue.
                pr_offers.CallBinding(entry.key, entry.meta.create_revision, entry.meta.lease),
                context=what.context if what.HasField("context") else None,
                customer=(item.customer_id, item.application_id),
                journey_id=journal.surveyed_id(item),
                survey=item.survey_after_call,
            )

    async def _offer(self, entry: Entry[QI], candidate: Candidate) -> bool:
        """Claims a slot of the agent's channel and offers them the interaction, in one
        fenced transaction; True when the offer is out."""
        item = entry.value
        agent = candidate.agent
        capacity = next(
            (c.capacity or 1 for c in agent.channels if c.channel == candidate.channel), 1
        )
        stored = self._new_offer(entry, candidate)
        # The claim is deleted once the offer is answered; should the leader die and the
        # call with it (nobody left to answer for), it ends with the offer's own lease.
        offer_lease = await self._store.shared_lease(
            self._rules.offer_timeout + pr_offers.OFFER_MARGIN_SECONDS
        )
        record = rt_store.AgentClaim(interaction_id=item.interaction_id, call_id=item.call_id)
        offered = await told(self._store, item, events.CALL_OFFERED)
        for slot in range(capacity):
            claim_key = keys.claim(agent.agent_id, candidate.channel, slot)
            updated = QI()
            updated.CopyFrom(item)
            updated.state = rt_store.INTERACTION_STATE_OFFERED
            updated.offer.CopyFrom(
                rt_store.OfferInFlight(
                    agent_id=agent.agent_id,
                    channel=candidate.channel,
                    offer_id=stored.offer.offer_id,
                    deadline=stored.offer.deadline,
                    claim_key=claim_key,
                )
            )
            private.seal_addresses(self._sealer, updated.offer, agent)
            result = await self._store.txn(
                [
                    self._office.fence(),
                    Compare.modified_at(entry.key, entry.meta.mod_revision),
                    Compare.absent(claim_key),
                ],
                [
                    Op.put(claim_key, record, offer_lease),
                    Op.put(entry.key, updated, entry.meta.lease),
                    Op.put(
                        pr_offers.offer_key(agent.agent_id, stored.offer.offer_id),
                        stored,
                        offer_lease,
                    ),
                    *offered,
                ],
                [self._office.read(), Op.get(entry.key), Op.get(claim_key)],
            )
            if result.succeeded:
                self._written = max(self._written, result.revision)
                _log_offer(item, stored.offer.offer_id, candidate)
                written = KeyMeta(
                    entry.meta.create_revision,
                    result.revision,
                    entry.meta.version + 1,
                    entry.meta.lease,
                )
                self._follow_offer(Entry(entry.key, updated, written), fresh=True)
                return True
            self._office.check(result, 0)
            current, holder = result.first(1), result.first(2)
            if current is None or current.meta.mod_revision != entry.meta.mod_revision:
                return False  # the call hung up or changed meanwhile
            if holder is None:
                return False
        return False

    def _follow_offer(self, entry: Entry[QI], *, fresh: bool = False) -> None:
        """Settles the entry's offer in a task of its own; `fresh` when this leader just
        wrote the entry as given (with the revision it wrote it at)."""
        interaction_id = entry.value.interaction_id
        task = asyncio.get_running_loop().create_task(
            self._settler.settle(entry.key, entry.value.offer, entry if fresh else None)
        )
        self._follows[interaction_id] = task

        def done(t: asyncio.Task[None]) -> None:
            if self._follows.get(interaction_id) is t:
                del self._follows[interaction_id]
            if not t.cancelled() and t.exception() is not None:
                log.warning("following offer of %s failed: %s", interaction_id, t.exception())
            self._wake.set()

        task.add_done_callback(done)


__all__ = ["Dispatcher"]


def _counted(counts: tuple[int, int], item: QI, now: float) -> tuple[int, int]:
    """(waiting, past SLA) of a group with one more queue entry counted."""
    if item.state == rt_store.INTERACTION_STATE_CONNECTED:
        return counts
    late = now - seconds(item.created_at) > item.sla_target_seconds
    return counts[0] + 1, counts[1] + int(late)


def _log_offer(item: QI, offer_id: str, candidate: Candidate) -> None:
    log.info(
        "offer made",
        extra={
            "fields": {
                "interaction_id": item.interaction_id,
                "offer_id": offer_id,
                "agent_id": candidate.agent.agent_id,
                "channel": common_pb2.Channel.Name(candidate.channel),
                "group": item.resource_group,
            }
        },
    )
