"""The rules of agent presence: the agent directory, per-channel and overall presence,
agent sessions whose liveness is a lease kept alive only while the app's stream is open
and heartbeating, offers delivered to the replica holding the agent's stream, and the
watch that lets routing and supervisors follow presence across replicas."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics, trace

from accessline.common.v1 import common_pb2
from accessline.presence.storage.v1 import storage_pb2 as pr_store
from accessline.presence.v1 import presence_pb2 as pr_pb2
from services.presence import keys
from services.runtime import identity
from services.runtime.errors import (
    AccesslineError,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from services.runtime.store import (
    Compare,
    Entry,
    EventKind,
    KeptLease,
    Op,
    Store,
    WatchCompacted,
    WatchEvent,
)
from services.runtime.streams import until
from services.runtime.telemetry import context_from

log = logging.getLogger("accessline.presence")
tracer = trace.get_tracer("accessline.presence")

C = common_pb2


def channel_presence(channel: pr_store.StoredChannel, dnd: bool) -> int:
    if dnd or not channel.available:
        return C.CHANNEL_PRESENCE_UNAVAILABLE
    if channel.active_interactions >= max(1, channel.capacity):
        return C.CHANNEL_PRESENCE_BUSY
    return C.CHANNEL_PRESENCE_AVAILABLE


def public_presence(
    agent: pr_pb2.Agent, stored: pr_store.StoredPresence | None
) -> pr_pb2.AgentPresence:
    """What routing and supervisors see of an agent; `stored` None means offline."""
    out = pr_pb2.AgentPresence(agent_id=agent.agent_id, resource_groups=agent.resource_groups)
    if stored is None:
        out.overall = C.OVERALL_PRESENCE_OFFLINE
        for config in agent.channels:
            out.channels.append(
                pr_pb2.ChannelState(
                    channel=config.channel,
                    presence=C.CHANNEL_PRESENCE_UNAVAILABLE,
                    capacity=config.capacity or 1,
                )
            )
        return out
    ready = 0
    for channel in stored.channels:
        state = channel_presence(channel, stored.do_not_disturb)
        ready += state in (C.CHANNEL_PRESENCE_AVAILABLE, C.CHANNEL_PRESENCE_BUSY)
        out.channels.append(
            pr_pb2.ChannelState(
                channel=channel.channel,
                presence=state,  # type: ignore[arg-type]
                active_interactions=channel.active_interactions,
                capacity=channel.capacity,
            )
        )
    if stored.do_not_disturb:
        out.overall = C.OVERALL_PRESENCE_DO_NOT_DISTURB
    elif stored.channels and ready == len(stored.channels):
        out.overall = C.OVERALL_PRESENCE_READY
    elif ready:
        out.overall = C.OVERALL_PRESENCE_PARTIALLY_READY
    else:
        out.overall = C.OVERALL_PRESENCE_NOT_READY
    out.do_not_disturb = stored.do_not_disturb
    out.updated_at.CopyFrom(stored.updated_at)
    if stored.HasField("idle_since"):
        out.idle_since.CopyFrom(stored.idle_since)
    return out


def _now_ts() -> Any:
    from google.protobuf import timestamp_pb2

    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


def _channel_name(channel: int) -> str:
    return (
        C.Channel.Name(C.Channel.ValueType(channel))
        if channel in C.Channel.values()
        else str(channel)
    )


class Directory:
    """Registered agents and point queries of presence."""

    def __init__(
        self,
        store: Store,
        sealing: keys.Sealing,
        *,
        max_watchers: int = 500,
        resume_revisions: int = 100_000,
    ) -> None:
        self._store = store
        self._sealing = sealing
        self._max_watchers = max_watchers
        self._resume_revisions = resume_revisions
        self.watchers = 0

    async def register(self, agent: pr_pb2.Agent) -> pr_pb2.Agent:
        stored = pr_pb2.Agent()
        stored.CopyFrom(agent)
        for config in stored.channels:
            config.capacity = config.capacity or 1
        await self._store.put(keys.agent(agent.agent_id), self._sealing.stored_agent(stored))
        return stored

    async def get(self, agent_id: str) -> pr_pb2.Agent:
        entry = await self._store.get(keys.agent(agent_id), pr_store.StoredAgent)
        if entry is None:
            raise NotFound(
                f"agent {agent_id} is not registered",
                reason="AGENT_NOT_FOUND",
                metadata={"agent_id": agent_id},
            )
        return self._sealing.agent(entry.value)

    async def list_agents(
        self, group: str, page_size: int, page_token: str
    ) -> tuple[list[pr_pb2.Agent], str]:
        found: list[pr_pb2.Agent] = []
        after = keys.agent(page_token) if page_token else None
        more = False
        while len(found) <= page_size:
            page, _ = await self._store.get_prefix(
                keys.AGENTS, pr_store.StoredAgent, limit=500, start_after=after
            )
            found += [
                self._sealing.agent(e.value)
                for e in page
                if not group or group in e.value.agent.resource_groups
            ]
            if len(page) < 500:
                break
            after = page[-1].key
        if len(found) > page_size:
            more = True
        agents = found[:page_size]
        return agents, agents[-1].agent_id if more else ""

    async def unregister(self, agent_id: str) -> None:
        await self.get(agent_id)
        # The agent's live session (if any) sees its presence vanish and ends.
        await self._store.txn(
            [],
            [
                Op.delete(keys.agent(agent_id)),
                Op.delete(keys.presence(agent_id)),
                Op.delete_prefix(keys.interactions(agent_id)),
            ],
        )

    async def snapshot(
        self,
    ) -> tuple[dict[str, pr_pb2.Agent], dict[str, pr_store.StoredPresence], int]:
        """Every agent (without its addresses) and every live session, read at one
        revision."""
        agents, revision = await self._store.get_prefix(keys.AGENTS, pr_store.StoredAgent)
        live, _ = await self._store.get_prefix(
            keys.PRESENCE, pr_store.StoredPresence, revision=revision
        )
        return (
            {e.value.agent.agent_id: e.value.agent for e in agents},
            {e.value.agent_id: e.value for e in live},
            revision,
        )

    async def presence(self, agent_ids: Iterable[str]) -> list[pr_pb2.AgentPresence]:
        ids = list(dict.fromkeys(agent_ids))
        ops = [op for a in ids for op in (Op.get(keys.agent(a)), Op.get(keys.presence(a)))]
        result = await self._store.txn([], ops)
        out = []
        for i, agent_id in enumerate(ids):
            config_rows, presence_rows = result.gets[2 * i], result.gets[2 * i + 1]
            if not config_rows:
                raise NotFound(
                    f"agent {agent_id} is not registered",
                    reason="AGENT_NOT_FOUND",
                    metadata={"agent_id": agent_id},
                )
            agent = pr_store.StoredAgent.FromString(config_rows[0][1]).agent
            stored = (
                pr_store.StoredPresence.FromString(presence_rows[0][1]) if presence_rows else None
            )
            out.append(public_presence(agent, stored))
        return out

    async def group_availability(self, groups: list[str]) -> list[pr_pb2.GroupAvailability]:
        agents, live, _ = await self.snapshot()
        wanted = groups or sorted({g for a in agents.values() for g in a.resource_groups})
        out = []
        for group in wanted:
            counts: dict[C.Channel.ValueType, list[int]] = {}
            for agent in agents.values():
                if group not in agent.resource_groups:
                    continue
                shown = public_presence(agent, live.get(agent.agent_id))
                for channel in shown.channels:
                    tally = counts.setdefault(channel.channel, [0, 0])
                    if agent.agent_id in live:
                        tally[1] += 1
                    if channel.presence == C.CHANNEL_PRESENCE_AVAILABLE:
                        tally[0] += 1
            out.append(
                pr_pb2.GroupAvailability(
                    resource_group=group,
                    channels=[
                        pr_pb2.ChannelAvailability(
                            channel=ch, available_agents=a, logged_in_agents=n
                        )
                        for ch, (a, n) in sorted(counts.items())
                    ],
                )
            )
        return out

    async def watch(
        self, request: pr_pb2.WatchPresenceRequest, stopping: asyncio.Event
    ) -> AsyncIterator[pr_pb2.WatchPresenceResponse]:
        """A snapshot (unless resuming), then every change, each with its resume token (the
        etcd revision). A resume point etcd has compacted away, or further back than the
        resume horizon, gets a fresh snapshot. At most `max_watchers` per replica."""
        if self.watchers >= self._max_watchers:
            raise ResourceExhausted(
                f"this replica serves its maximum of {self._max_watchers} presence watchers;"
                " retry later or on another replica",
                reason="TOO_MANY_WATCHERS",
                retry_after=5.0,
            )
        self.watchers += 1
        try:
            async for message in self._watch(request, stopping):
                yield message
        finally:
            self.watchers -= 1

    async def _watch(
        self, request: pr_pb2.WatchPresenceRequest, stopping: asyncio.Event
    ) -> AsyncIterator[pr_pb2.WatchPresenceResponse]:
        agent_ids, groups, channels = (
            set(request.agent_ids),
            set(request.resource_groups),
            set(request.channels),
        )

        def wanted(agent: pr_pb2.Agent) -> bool:
            if agent_ids and agent.agent_id not in agent_ids:
                return False
            if groups and not groups & set(agent.resource_groups):
                return False
            return not channels or bool(channels & {c.channel for c in agent.channels})

        agents, live, revision = await self.snapshot()
        resume = 0
        if request.resume_token:
            try:
                resume = int(request.resume_token)
            except ValueError:
                resume = -1
            if not 0 < resume <= revision:
                raise InvalidArgument(
                    [FieldViolation("resume_token", "is not a token this service gave")]
                )
        # A resume point too far back would replay a long history: a snapshot instead.
        if resume and revision - resume <= self._resume_revisions:
            revision = resume
        else:
            yield pr_pb2.WatchPresenceResponse(
                snapshot=pr_pb2.PresenceSnapshot(
                    agents=[
                        public_presence(a, live.get(a.agent_id))
                        for a in agents.values()
                        if wanted(a)
                    ]
                ),
                resume_token=str(revision),
            )
        while not stopping.is_set():
            try:
                async for event in until(
                    self._store.watch_prefix(keys.ROOT, revision + 1), stopping
                ):
                    revision = event.revision
                    change = self._apply(event, agents, live)
                    if change is not None and wanted(
                        agents.get(change.agent_id, pr_pb2.Agent(agent_id=change.agent_id))
                    ):
                        yield pr_pb2.WatchPresenceResponse(
                            change=change, resume_token=str(revision)
                        )
                return
            except WatchCompacted:
                agents, live, revision = await self.snapshot()
                yield pr_pb2.WatchPresenceResponse(
                    snapshot=pr_pb2.PresenceSnapshot(
                        agents=[
                            public_presence(a, live.get(a.agent_id))
                            for a in agents.values()
                            if wanted(a)
                        ]
                    ),
                    resume_token=str(revision),
                )

    @staticmethod
    def _apply(
        event: WatchEvent, agents: dict[str, pr_pb2.Agent], live: dict[str, pr_store.StoredPresence]
    ) -> pr_pb2.AgentPresence | None:
        if event.key.startswith(keys.AGENTS):
            agent_id = event.key[len(keys.AGENTS) :]
            if event.kind == EventKind.DELETE:
                gone = agents.pop(agent_id, None)
                return public_presence(gone, None) if gone is not None else None
            agents[agent_id] = event.decode(pr_store.StoredAgent).agent
            return public_presence(agents[agent_id], live.get(agent_id))
        if event.key.startswith(keys.PRESENCE):
            agent_id = event.key[len(keys.PRESENCE) :]
            if event.kind == EventKind.DELETE:
                live.pop(agent_id, None)
            else:
                live[agent_id] = event.decode(pr_store.StoredPresence)
            agent = agents.get(agent_id)
            return public_presence(agent, live.get(agent_id)) if agent is not None else None
        return None


class Hub:
    """One watch of this replica on presence and offers, routed to the agent sessions it
    holds; it also cancels the open offers of agents whose session ended anywhere."""

    def __init__(self, store: Store, meter: metrics.Meter | None = None) -> None:
        self._store = store
        self.sessions: dict[str, AgentSession] = {}
        (meter or metrics.get_meter("accessline.presence")).create_observable_gauge(
            "accessline.presence.channels",
            callbacks=[self._observe],
            unit="{agent}",
            description="Agents with a session on this replica, per channel and channel presence",
        )
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._janitors: set[asyncio.Task[None]] = set()

    def _observe(self, _: object) -> list[metrics.Observation]:
        counts: dict[tuple[str, str], int] = {}
        for session in list(self.sessions.values()):
            for channel in session.state.channels:
                state = channel_presence(channel, session.state.do_not_disturb)
                key = (C.Channel.Name(channel.channel), C.ChannelPresence.Name(state))  # type: ignore[arg-type]
                counts[key] = counts.get(key, 0) + 1
        return [
            metrics.Observation(n, {"accessline.channel": ch, "accessline.presence": pr})
            for (ch, pr), n in counts.items()
        ]

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="presence-hub")

    async def ready(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            raise Unavailable(
                "presence is still connecting to etcd", reason="HUB_STARTING", retry_after=1.0
            ) from None

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                revision = await self._store.revision()
                self._ready.set()
                async for event in self._store.watch_prefix(keys.ROOT, revision + 1):
                    await self._dispatch(event)
            except WatchCompacted:
                log.warning("presence hub fell behind a compaction; sessions resync")
                for session in list(self.sessions.values()):
                    session.resync_needed.set()
            except AccesslineError as exc:
                log.warning(
                    "presence hub cannot reach etcd", extra={"fields": {"error": exc.message}}
                )
                await asyncio.sleep(1.0)

    async def _dispatch(self, event: WatchEvent) -> None:
        key = event.key
        if key.startswith(keys.PRESENCE):
            agent_id = key[len(keys.PRESENCE) :]
            session = self.sessions.get(agent_id)
            if session is not None:
                session.on_presence(event)
            if event.kind == EventKind.DELETE:
                task = asyncio.create_task(self._cancel_orphaned_offers(agent_id))
                self._janitors.add(task)
                task.add_done_callback(self._janitors.discard)
        elif key.startswith(keys.OFFERS):
            agent_id = key[len(keys.OFFERS) :].split("/", 1)[0]
            session = self.sessions.get(agent_id)
            if session is not None:
                session.on_offer(event)
        elif key.startswith(keys.INTERACTIONS) and event.kind == EventKind.DELETE:
            agent_id = key[len(keys.INTERACTIONS) :].split("/", 1)[0]
            session = self.sessions.get(agent_id)
            if session is not None:
                session.on_interaction_gone(event)

    async def _cancel_orphaned_offers(self, agent_id: str) -> None:
        """The agent's session ended (cleanly or by lease): its open offers are cancelled.
        Every replica may try; the compare-and-swap makes it happen once."""
        try:
            if await self._store.get(keys.presence(agent_id), pr_store.StoredPresence) is not None:
                return  # a new session already started; it delivers the open offers
            entries, _ = await self._store.get_prefix(keys.offers(agent_id), pr_store.StoredOffer)
            for entry in entries:
                if entry.value.state == pr_store.OFFER_STATE_OPEN:
                    await keys.set_offer_state(
                        self._store,
                        entry,
                        pr_store.OFFER_STATE_CANCELLED,
                        cancel_reason=pr_pb2.OFFER_CANCEL_REASON_SESSION_ENDED,
                    )
        except AccesslineError as exc:
            log.warning(
                "could not cancel offers of an ended session",
                extra={"fields": {"agent_id": agent_id, "error": exc.message}},
            )


class SessionEnded(Exception):
    """Ends the Connect stream: `error` is the status to end it with, None for OK."""

    def __init__(self, error: AccesslineError | None = None) -> None:
        super().__init__(error.message if error else "session ended")
        self.error = error


@dataclass
class Limits:
    lease_seconds: int
    heartbeat_timeout: float
    sealing: keys.Sealing
    max_interaction: float = 12 * 3600.0
    login_timeout: float = 10.0


@dataclass
class AgentSession:
    """One agent app's live session on this replica."""

    store: Store
    hub: Hub
    limits: Limits
    agent: pr_pb2.Agent
    device: pr_pb2.Device
    outbox: asyncio.Queue[pr_pb2.ConnectResponse | SessionEnded] = field(
        default_factory=asyncio.Queue
    )
    session_id: str = field(default_factory=lambda: "as" + secrets.token_urlsafe(12))
    state: pr_store.StoredPresence = field(default_factory=pr_store.StoredPresence)
    revision: int = 0
    lease: KeptLease | None = None
    last_seen: float = field(default_factory=time.monotonic)
    delivered: set[str] = field(default_factory=set)
    replaced: bool = False
    resync_needed: asyncio.Event = field(default_factory=asyncio.Event)
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    background: set[asyncio.Task[None]] = field(default_factory=set)

    # -- lifecycle --------------------------------------------------------------------

    async def open(self) -> None:
        lease_id = await self.store.grant_lease(self.limits.lease_seconds)
        self.lease = await self.store.keep_alive(lease_id, self.limits.lease_seconds)
        now = _now_ts()
        self.state = pr_store.StoredPresence(
            agent_id=self.agent.agent_id,
            agent_session_id=self.session_id,
            channels=[
                pr_store.StoredChannel(
                    channel=c.channel, available=c.available_on_login, capacity=c.capacity or 1
                )
                for c in self.agent.channels
            ],
            updated_at=now,
            idle_since=now,
            resource_groups=self.agent.resource_groups,
            device=self.device,
        )
        # Calls accepted in an earlier session and not ended: the agent is still on them.
        ongoing, _ = await self.store.get_prefix(
            keys.interactions(self.agent.agent_id), pr_store.StoredInteraction
        )
        for entry in ongoing:
            for channel in self.state.channels:
                if channel.channel == entry.value.channel:
                    channel.active_interactions += 1
                    self.state.interactions[entry.value.interaction_id] = entry.value.channel
        if self.state.interactions:
            self.state.ClearField("idle_since")
        previous = self.hub.sessions.get(self.agent.agent_id)
        if previous is not None:
            previous.replace(self.device)
        self.hub.sessions[self.agent.agent_id] = self
        # Overwrites a session of another replica too; that replica sees it and steps down.
        self.revision = await self.store.put(
            keys.presence(self.agent.agent_id), self.state, lease_id
        )
        self.send(
            pr_pb2.ConnectResponse(
                snapshot=pr_pb2.Snapshot(
                    agent=self.agent, presence=self.public(), agent_session_id=self.session_id
                )
            )
        )
        await self._deliver_open_offers()
        log.info(
            "agent logged in",
            extra={
                "fields": {"agent_id": self.agent.agent_id, "agent_session_id": self.session_id}
            },
        )

    async def _deliver_open_offers(self) -> None:
        entries, _ = await self.store.get_prefix(
            keys.offers(self.agent.agent_id), pr_store.StoredOffer
        )
        for entry in entries:
            self._offer_state(entry.value)

    def public(self) -> pr_pb2.AgentPresence:
        return public_presence(self.agent, self.state)

    def send(self, message: pr_pb2.ConnectResponse | SessionEnded) -> None:
        self.outbox.put_nowait(message)

    def replace(self, by: pr_pb2.Device) -> None:
        """Another login of this agent took over."""
        if not self.replaced:
            self.replaced = True
            self.send(pr_pb2.ConnectResponse(session_replaced=pr_pb2.SessionReplaced(by_device=by)))
            self.send(SessionEnded())

    async def close(self) -> None:
        """Ends the session: presence removed at once (unless replaced), open offers
        cancelled, lease released."""
        if self.hub.sessions.get(self.agent.agent_id) is self:
            del self.hub.sessions[self.agent.agent_id]
        if self.lease is not None:
            self.store.stop_keep_alive(self.lease)
        with contextlib.suppress(AccesslineError):
            if not self.replaced:
                await self.store.txn(
                    [Compare.modified_at(keys.presence(self.agent.agent_id), self.revision)],
                    [Op.delete(keys.presence(self.agent.agent_id))],
                )
            if self.lease is not None:
                await self.store.revoke_lease(self.lease.id)
        log.info(
            "agent session ended",
            extra={
                "fields": {"agent_id": self.agent.agent_id, "agent_session_id": self.session_id}
            },
        )

    # -- events from etcd -------------------------------------------------------------

    def on_presence(self, event: WatchEvent) -> None:
        if event.kind == EventKind.DELETE:
            if event.revision > self.revision and not self.replaced:
                self.send(
                    SessionEnded(
                        Unavailable(
                            "the agent session ended (unregistered or lease lost)",
                            reason="SESSION_LOST",
                        )
                    )
                )
            return
        stored = event.decode(pr_store.StoredPresence)
        if stored.agent_session_id != self.session_id:
            self.replace(stored.device)

    def on_offer(self, event: WatchEvent) -> None:
        if event.kind == EventKind.DELETE:
            before = event.decode_prev(pr_store.StoredOffer)
            if (
                before is not None
                and before.state == pr_store.OFFER_STATE_OPEN
                and before.offer.offer_id in self.delivered
            ):
                self.delivered.discard(before.offer.offer_id)
                self.send(
                    pr_pb2.ConnectResponse(
                        offer_cancelled=pr_pb2.OfferCancelled(
                            offer_id=before.offer.offer_id,
                            reason=pr_pb2.OFFER_CANCEL_REASON_TIMED_OUT,
                        )
                    )
                )
            return
        self._offer_state(event.decode(pr_store.StoredOffer))

    def on_interaction_gone(self, event: WatchEvent) -> None:
        """An interaction's key vanished while the agent was still on it: the caller was
        gone before the call reached the agent (its lease ended, or the router took the
        call out). The agent is free again and the app is told."""
        interaction_id = event.key.rsplit("/", 1)[1]
        if interaction_id not in self.state.interactions:
            return  # ended by the agent
        before = event.decode_prev(pr_store.StoredInteraction)
        task = asyncio.get_running_loop().create_task(
            self._caller_gone(interaction_id, before.offer_id if before is not None else "")
        )
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _caller_gone(self, interaction_id: str, offer_id: str) -> None:
        async with self.write_lock:
            if interaction_id not in self.state.interactions:
                return
            channel_id = self.state.interactions[interaction_id]
            del self.state.interactions[interaction_id]
            for channel in self.state.channels:
                if channel.channel == channel_id:
                    channel.active_interactions = max(0, channel.active_interactions - 1)
            if not self.state.interactions:
                self.state.idle_since.CopyFrom(_now_ts())
            self.send(
                pr_pb2.ConnectResponse(
                    offer_cancelled=pr_pb2.OfferCancelled(
                        offer_id=offer_id, reason=pr_pb2.OFFER_CANCEL_REASON_CALLER_GONE
                    )
                )
            )
            try:
                await self._write_locked()
            except SessionEnded as ended:
                self.send(ended)
            except AccesslineError as exc:
                log.warning("could not free agent %s: %s", self.agent.agent_id, exc)

    def _offer_state(self, stored: pr_store.StoredOffer) -> None:
        offer_id = stored.offer.offer_id
        if stored.state == pr_store.OFFER_STATE_OPEN and offer_id not in self.delivered:
            if stored.offer.deadline.ToNanoseconds() <= time.time_ns():
                return
            self.delivered.add(offer_id)
            with tracer.start_as_current_span(
                "accessline.offer.deliver",
                context=context_from(stored.trace.traceparent, stored.trace.tracestate),
                attributes={"accessline.agent": self.agent.agent_id},
            ):
                self.send(pr_pb2.ConnectResponse(offer=self.limits.sealing.shown_offer(stored)))
        elif stored.state == pr_store.OFFER_STATE_CANCELLED and offer_id in self.delivered:
            self.delivered.discard(offer_id)
            self.send(
                pr_pb2.ConnectResponse(
                    offer_cancelled=pr_pb2.OfferCancelled(
                        offer_id=offer_id, reason=stored.cancel_reason
                    )
                )
            )
            if stored.cancel_reason == pr_pb2.OFFER_CANCEL_REASON_NO_ANSWER_LIMIT:
                task = asyncio.get_running_loop().create_task(self._set_not_ready())
                self.background.add(task)
                task.add_done_callback(self.background.discard)

    async def _set_not_ready(self) -> None:
        """Redirect on no answer: the agent let too many offers time out, so every channel
        is set not ready until the agent makes it available again."""
        for channel in self.state.channels:
            if self.state.do_not_disturb:
                channel.available_before_dnd = False
            else:
                channel.available = False
        try:
            await self._write()
        except SessionEnded as ended:
            self.send(ended)
        except AccesslineError as exc:
            log.warning("could not set agent %s not ready: %s", self.agent.agent_id, exc)

    # -- messages from the app --------------------------------------------------------

    def _channel(self, channel: C.Channel.ValueType, field_name: str) -> pr_store.StoredChannel:
        for stored in self.state.channels:
            if stored.channel == channel:
                return stored
        raise InvalidArgument(
            [
                FieldViolation(
                    field_name,
                    f"channel {_channel_name(channel)} is not configured for this agent",
                )
            ]
        )

    async def _write(self, also: Sequence[Op] = ()) -> None:
        async with self.write_lock:
            await self._write_locked(also)

    async def _write_locked(self, also: Sequence[Op] = ()) -> None:
        self.state.updated_at.CopyFrom(_now_ts())
        assert self.lease is not None
        result = await self.store.txn(
            [Compare.modified_at(keys.presence(self.agent.agent_id), self.revision)],
            [Op.put(keys.presence(self.agent.agent_id), self.state, self.lease.id), *also],
        )
        if not result.succeeded:
            self.replaced = True
            raise SessionEnded(
                Unavailable("this session was replaced or lost", reason="SESSION_LOST")
            )
        self.revision = result.revision
        self.send(
            pr_pb2.ConnectResponse(
                presence_confirmed=pr_pb2.PresenceConfirmed(presence=self.public())
            )
        )

    async def handle(self, message: pr_pb2.ConnectRequest) -> None:
        self.last_seen = time.monotonic()
        kind = message.WhichOneof("message")
        if kind == "login":
            raise InvalidArgument([FieldViolation("login", "the session is already logged in")])
        if kind == "heartbeat":
            self.send(
                pr_pb2.ConnectResponse(heartbeat_ack=pr_pb2.HeartbeatAck(server_time=_now_ts()))
            )
        elif kind == "set_channel_presence":
            change = message.set_channel_presence
            channel = self._channel(change.channel, "set_channel_presence.channel")
            if self.state.do_not_disturb:
                channel.available_before_dnd = change.available
            else:
                channel.available = change.available
            await self._write()
        elif kind == "set_do_not_disturb":
            enabled = message.set_do_not_disturb.enabled
            if enabled != self.state.do_not_disturb:
                for channel in self.state.channels:
                    if enabled:
                        channel.available_before_dnd, channel.available = channel.available, False
                    else:
                        channel.available = channel.available_before_dnd
                self.state.do_not_disturb = enabled
            await self._write()
        elif kind == "offer_response":
            await self._answer(message.offer_response)
        elif kind == "end_interaction":
            interaction = message.end_interaction.interaction_id
            if not interaction or len(interaction) > 64:
                raise InvalidArgument(
                    [FieldViolation("end_interaction.interaction_id", "must be 1 to 64 characters")]
                )
            if interaction not in self.state.interactions:
                # Already ended (an app repeating itself after a reconnect): nothing to
                # change, the presence as it is confirms it.
                self.send(
                    pr_pb2.ConnectResponse(
                        presence_confirmed=pr_pb2.PresenceConfirmed(presence=self.public())
                    )
                )
                return
            channel_id = self.state.interactions[interaction]
            del self.state.interactions[interaction]
            for channel in self.state.channels:
                if channel.channel == channel_id:
                    channel.active_interactions = max(0, channel.active_interactions - 1)
            if not self.state.interactions:
                self.state.idle_since.CopyFrom(_now_ts())
            await self._write([Op.delete(keys.interaction(self.agent.agent_id, interaction))])
        else:
            raise InvalidArgument(
                [FieldViolation("message", "must be one of the ConnectRequest messages")]
            )

    async def _answer(self, response: pr_pb2.OfferResponse) -> None:
        if response.decision not in (pr_pb2.OFFER_DECISION_ACCEPT, pr_pb2.OFFER_DECISION_DECLINE):
            raise InvalidArgument(
                [FieldViolation("offer_response.decision", "must be ACCEPT or DECLINE")]
            )
        if not response.offer_id or len(response.offer_id) > 64:
            raise InvalidArgument(
                [FieldViolation("offer_response.offer_id", "must be 1 to 64 characters")]
            )
        entry = await self.store.get(
            keys.offer(self.agent.agent_id, response.offer_id), pr_store.StoredOffer
        )
        parent = (
            context_from(entry.value.trace.traceparent, entry.value.trace.tracestate)
            if entry
            else None
        )
        # The agent's answer joins the trace of the call that made the offer.
        with tracer.start_as_current_span(
            "accessline.offer.answer",
            context=parent,
            attributes={
                "accessline.agent": self.agent.agent_id,
                "accessline.offer.decision": pr_pb2.OfferDecision.Name(response.decision)
                if response.decision in pr_pb2.OfferDecision.values()
                else "UNKNOWN",
            },
        ):
            await self._answer_offer(response, entry)

    async def _answer_offer(
        self, response: pr_pb2.OfferResponse, entry: Entry[pr_store.StoredOffer] | None
    ) -> None:
        def refuse(reason: pr_pb2.OfferRefusal.ValueType) -> None:
            self.send(
                pr_pb2.ConnectResponse(
                    offer_response_refused=pr_pb2.OfferResponseRefused(
                        offer_id=response.offer_id, reason=reason
                    )
                )
            )

        if entry is None:
            refuse(pr_pb2.OFFER_REFUSAL_UNKNOWN_OFFER)
            return
        stored = entry.value
        accept = response.decision == pr_pb2.OFFER_DECISION_ACCEPT
        wanted = stored.state == (
            pr_store.OFFER_STATE_ACCEPTED if accept else pr_store.OFFER_STATE_DECLINED
        )
        if wanted and (
            not accept
            or not response.accept_channel
            or response.accept_channel == stored.accepted_channel
        ):
            # Answering twice the same way is harmless: the same confirmation again.
            self.send(
                pr_pb2.ConnectResponse(
                    offer_response_recorded=pr_pb2.OfferResponseRecorded(
                        offer_id=response.offer_id, decision=response.decision
                    )
                )
            )
            return
        if (
            stored.state != pr_store.OFFER_STATE_OPEN
            or stored.offer.deadline.ToNanoseconds() <= time.time_ns()
        ):
            refuse(pr_pb2.OFFER_REFUSAL_NO_LONGER_OPEN)
            return
        channel_id = response.accept_channel or stored.offer.channel
        if accept:
            try:
                channel = self._channel(channel_id, "offer_response.accept_channel")
            except InvalidArgument:
                refuse(pr_pb2.OFFER_REFUSAL_CHANNEL_UNAVAILABLE)
                return
            if (
                channel_presence(channel, self.state.do_not_disturb) != C.CHANNEL_PRESENCE_AVAILABLE
                and channel_id != stored.offer.channel
            ):
                refuse(pr_pb2.OFFER_REFUSAL_CHANNEL_UNAVAILABLE)
                return
        async with self.write_lock:
            # An accept makes the agent busy in the same transaction, so whoever sees the
            # accepted offer also sees the channel taken.
            also: tuple[list[Compare], list[Op]] = ([], [])
            lasts = 0
            busy = pr_store.StoredPresence()
            if accept:
                busy.CopyFrom(self.state)
                for channel in busy.channels:
                    if channel.channel == channel_id:
                        channel.active_interactions += 1
                busy.interactions[stored.offer.interaction_id] = channel_id
                busy.ClearField("idle_since")
                busy.updated_at.CopyFrom(_now_ts())
                assert self.lease is not None
                presence_key = keys.presence(self.agent.agent_id)
                ongoing = pr_store.StoredInteraction(
                    interaction_id=stored.offer.interaction_id,
                    channel=channel_id,
                    offer_id=stored.offer.offer_id,
                    accepted_at=_now_ts(),
                )
                lasts = await self.store.shared_lease(self.limits.max_interaction, window=60.0)
                compares = [Compare.modified_at(presence_key, self.revision)]
                if stored.call_key:
                    # The caller is still there: their place in the queue is unchanged.
                    compares.append(
                        Compare.created_at(stored.call_key, stored.call_create_revision)
                    )
                also = (
                    compares,
                    [
                        Op.put(presence_key, busy, self.lease.id),
                        # Until the call is connected the interaction lives and dies with
                        # the call; the router moves it to `lasts` then.
                        Op.put(
                            keys.interaction(self.agent.agent_id, stored.offer.interaction_id),
                            ongoing,
                            stored.call_lease or lasts,
                        ),
                    ],
                )
            ok = await keys.set_offer_state(
                self.store,
                entry,
                pr_store.OFFER_STATE_ACCEPTED if accept else pr_store.OFFER_STATE_DECLINED,
                accepted_channel=channel_id if accept else C.CHANNEL_UNSPECIFIED,
                interaction_lease=lasts if accept else 0,
                also=also,
            )
            if not ok:
                refuse(pr_pb2.OFFER_REFUSAL_NO_LONGER_OPEN)
                return
            self.delivered.discard(response.offer_id)
            self.send(
                pr_pb2.ConnectResponse(
                    offer_response_recorded=pr_pb2.OfferResponseRecorded(
                        offer_id=response.offer_id, decision=response.decision
                    )
                )
            )
            if accept:
                fresh = await self.store.get(
                    keys.presence(self.agent.agent_id), pr_store.StoredPresence
                )
                if fresh is not None and fresh.value.agent_session_id == self.session_id:
                    self.state = fresh.value
                    self.revision = fresh.meta.mod_revision
                self.send(
                    pr_pb2.ConnectResponse(
                        presence_confirmed=pr_pb2.PresenceConfirmed(presence=self.public())
                    )
                )


class Sessions:
    """Runs Connect streams: login, then messages up and events down until the end."""

    def __init__(self, store: Store, hub: Hub, directory: Directory, limits: Limits) -> None:
        self._store = store
        self._hub = hub
        self._directory = directory
        self._limits = limits

    async def connect(
        self, requests: AsyncIterator[pr_pb2.ConnectRequest], stopping: asyncio.Event
    ) -> AsyncIterator[pr_pb2.ConnectResponse]:
        await self._hub.ready(5.0)
        iterator = requests.__aiter__()
        try:
            first = await asyncio.wait_for(iterator.__anext__(), self._limits.login_timeout)
        except (StopAsyncIteration, TimeoutError):
            raise InvalidArgument(
                [FieldViolation("login", "the first message must be a login")]
            ) from None
        if first.WhichOneof("message") != "login":
            raise InvalidArgument([FieldViolation("login", "the first message must be a login")])
        login = first.login
        if not login.agent_id or len(login.agent_id) > 64:
            raise InvalidArgument([FieldViolation("login.agent_id", "must be 1 to 64 characters")])
        caller = identity.current()
        if not caller.unchecked and caller.subject != login.agent_id:
            # An agent logs in as themselves only: the token's subject.
            raise PermissionDenied("the token is not this agent's", reason="NOT_THIS_AGENT")
        agent = await self._directory.get(login.agent_id)
        session = AgentSession(self._store, self._hub, self._limits, agent, login.device)
        reader: asyncio.Task[None] | None = None
        watchdog: asyncio.Task[None] | None = None
        try:
            await session.open()
            reader = asyncio.create_task(self._read(iterator, session))
            watchdog = asyncio.create_task(self._watch(session, stopping))
            while True:
                item = await session.outbox.get()
                if isinstance(item, SessionEnded):
                    if item.error is not None:
                        raise item.error
                    return
                yield item
        finally:
            for task in (reader, watchdog):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await session.close()

    async def _read(
        self, iterator: AsyncIterator[pr_pb2.ConnectRequest], session: AgentSession
    ) -> None:
        try:
            async for message in iterator:
                await session.handle(message)
            session.send(SessionEnded())
        except SessionEnded as ended:
            session.send(ended)
        except AccesslineError as error:
            session.send(SessionEnded(error))

    async def _watch(self, session: AgentSession, stopping: asyncio.Event) -> None:
        """Ends the session when the app goes silent, the lease is lost or the server stops;
        resyncs offers after the hub missed events."""
        assert session.lease is not None
        while True:
            if stopping.is_set():
                session.send(
                    SessionEnded(
                        Unavailable(
                            "the server is shutting down; reconnect",
                            reason="SERVER_STOPPING",
                            retry_after=1.0,
                        )
                    )
                )
                return
            if session.lease.lost.is_set():
                session.send(
                    SessionEnded(
                        Unavailable(
                            "the agent session's lease was lost; reconnect",
                            reason="SESSION_LOST",
                            retry_after=1.0,
                        )
                    )
                )
                return
            if time.monotonic() - session.last_seen > self._limits.heartbeat_timeout:
                session.send(
                    SessionEnded(
                        Unavailable("no heartbeat from the agent app", reason="HEARTBEAT_TIMEOUT")
                    )
                )
                return
            if session.resync_needed.is_set():
                session.resync_needed.clear()
                with contextlib.suppress(AccesslineError):
                    await session._deliver_open_offers()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    stopping.wait(), min(1.0, self._limits.heartbeat_timeout / 4)
                )
