"""The agent directory: registered agents (addresses sealed), point queries of
presence, group availability, and the watch that lets Routing and supervisors follow
presence across replicas."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

from opentelemetry import trace

from accessline.common.v1 import common_pb2
from accessline.presence.storage.v1 import storage_pb2 as pr_store
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline_server.presence import keys
from accessline_server.presence.feed import Agents, Change, Feed, Live, apply, read_snapshot
from accessline_server.presence.roster import Sealing, public_presence
from accessline_server.runtime.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from accessline_server.runtime.masks import (
    check_etag,
    check_whole,
    merged,
    put_if_unchanged,
    with_etag,
)
from accessline_server.runtime.store import (
    Op,
    Store,
    WatchCompacted,
)
from accessline_server.runtime.streams import until
from accessline_server.runtime.validation import Violations

log = logging.getLogger("accessline.presence")
tracer = trace.get_tracer("accessline.presence")

C = common_pb2

# Agents read in one etcd transaction by GetPresence (two operations each; etcd takes
# 128 in one transaction unless its --max-txn-ops says otherwise).
PRESENCE_READ_BATCH = 60


class Directory:
    """Registered agents and point queries of presence."""

    def __init__(
        self,
        store: Store,
        sealing: Sealing,
        *,
        max_watchers: int = 500,
        resume_revisions: int = 100_000,
        feed: Feed | None = None,
        feed_timeout: float = 10.0,
    ) -> None:
        self._store = store
        self._sealing = sealing
        self._max_watchers = max_watchers
        self._resume_revisions = resume_revisions
        self._feed = feed
        self._feed_timeout = feed_timeout
        self.watchers = 0

    async def register(self, agent: pr_pb2.Agent) -> pr_pb2.Agent:
        stored = pr_pb2.Agent()
        stored.CopyFrom(agent)
        stored.ClearField("etag")
        for config in stored.channels:
            config.capacity = config.capacity or 1
        revision = await self._store.put(
            keys.agent(agent.agent_id), self._sealing.stored_agent(stored)
        )
        return with_etag(stored, revision)

    async def update(
        self,
        agent: pr_pb2.Agent,
        mask: Sequence[str],
        check: Callable[[pr_pb2.Agent, Violations], None],
    ) -> pr_pb2.Agent:
        """The agent with the fields of `mask` taken from `agent`, if it is still the
        version of `agent.etag` (when given) and valid as a whole."""
        key = keys.agent(agent.agent_id)
        entry = await self._store.get(key, pr_store.StoredAgent)
        if entry is None:
            raise _not_found(agent.agent_id)
        revision = entry.meta.mod_revision
        check_etag(agent.etag, revision, f"agent {agent.agent_id}", {"agent_id": agent.agent_id})
        updated = merged(self._sealing.agent(entry.value), agent, mask)
        check_whole(check, updated)
        for config in updated.channels:
            config.capacity = config.capacity or 1
        stored = self._sealing.stored_agent(updated)
        written = await put_if_unchanged(self._store, key, revision, stored, "the agent")
        return with_etag(updated, written)

    async def get(self, agent_id: str) -> pr_pb2.Agent:
        entry = await self._store.get(keys.agent(agent_id), pr_store.StoredAgent)
        if entry is None:
            raise _not_found(agent_id)
        return with_etag(self._sealing.agent(entry.value), entry.meta.mod_revision)

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
                with_etag(self._sealing.agent(e.value), e.meta.mod_revision)
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

    async def snapshot(self) -> tuple[Agents, Live, int]:
        """Every agent (without its addresses) and every live session, read at one
        revision."""
        return await read_snapshot(self._store)

    async def presence(
        self, agent_ids: Iterable[str]
    ) -> tuple[list[pr_pb2.AgentPresence], list[str]]:
        """The presence of each registered agent of `agent_ids` (in order, once each) and
        the ids that name no agent. Read in transactions of at most
        `PRESENCE_READ_BATCH` agents (etcd takes 128 operations in one by default)."""
        ids = list(dict.fromkeys(agent_ids))
        found: list[pr_pb2.AgentPresence] = []
        missing: list[str] = []
        for start in range(0, len(ids), PRESENCE_READ_BATCH):
            batch = ids[start : start + PRESENCE_READ_BATCH]
            ops = [op for a in batch for op in (Op.get(keys.agent(a)), Op.get(keys.presence(a)))]
            result = await self._store.txn([], ops)
            for i, agent_id in enumerate(batch):
                config_rows, presence_rows = result.gets[2 * i], result.gets[2 * i + 1]
                if not config_rows:
                    missing.append(agent_id)
                    continue
                agent = pr_store.StoredAgent.FromString(config_rows[0][1]).agent
                stored = (
                    pr_store.StoredPresence.FromString(presence_rows[0][1])
                    if presence_rows
                    else None
                )
                found.append(public_presence(agent, stored))
        return found, missing

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

        def snapshot(agents: Agents, live: Live, revision: int) -> pr_pb2.WatchPresenceResponse:
            shown = [public_presence(a, live.get(a.agent_id)) for a in agents.values() if wanted(a)]
            return pr_pb2.WatchPresenceResponse(
                snapshot=pr_pb2.PresenceSnapshot(agents=shown), resume_token=str(revision)
            )

        resume = 0
        if request.resume_token:
            try:
                resume = int(request.resume_token)
            except ValueError:
                resume = -1
            if resume <= 0:
                raise _not_a_token()
        feed = self._feed
        if feed is not None:
            await feed.ready(self._feed_timeout)
        if feed is None or resume > feed.revision:
            # A token this replica's view has not reached yet (another replica is ahead),
            # or no shared view: etcd's own read and watch.
            async for message in self._watch_etcd(resume, wanted, snapshot, stopping):
                yield message
            return
        # Built before the next await: the follower then gets every later change.
        first: list[pr_pb2.WatchPresenceResponse]
        if resume and feed.holds_since(resume):
            first = [_change(c) for c in feed.since(resume) if wanted(c.agent)]
        elif resume and feed.revision - resume <= self._resume_revisions:
            # Further back than the view holds, yet within the horizon: etcd replays it.
            async for message in self._watch_etcd(resume, wanted, snapshot, stopping):
                yield message
            return
        else:
            first = [snapshot(feed.agents, feed.live, feed.revision)]
        follower = feed.follow()
        try:
            for message in first:
                yield message
            async for change in until(follower.changes(), stopping):
                if change is None:
                    yield snapshot(feed.agents, feed.live, feed.revision)
                elif wanted(change.agent):
                    yield _change(change)
        finally:
            feed.leave(follower)

    async def _watch_etcd(
        self,
        resume: int,
        wanted: Callable[[pr_pb2.Agent], bool],
        snapshot: Callable[[Agents, Live, int], pr_pb2.WatchPresenceResponse],
        stopping: asyncio.Event,
    ) -> AsyncIterator[pr_pb2.WatchPresenceResponse]:
        """A watcher served by an etcd read and an etcd watch of its own."""
        agents, live, revision = await self.snapshot()
        if resume > revision:
            raise _not_a_token()
        # A resume point too far back would replay a long history: a snapshot instead.
        if resume and revision - resume <= self._resume_revisions:
            revision = resume
        else:
            yield snapshot(agents, live, revision)
        while not stopping.is_set():
            try:
                async for event in until(
                    self._store.watch_prefix(keys.ROOT, revision + 1), stopping
                ):
                    revision = event.revision
                    change = apply(event, agents, live)
                    if change is not None and wanted(
                        agents.get(change.agent_id, pr_pb2.Agent(agent_id=change.agent_id))
                    ):
                        yield pr_pb2.WatchPresenceResponse(
                            change=change, resume_token=str(revision)
                        )
                return
            except WatchCompacted:
                agents, live, revision = await self.snapshot()
                yield snapshot(agents, live, revision)


def _change(change: Change) -> pr_pb2.WatchPresenceResponse:
    return pr_pb2.WatchPresenceResponse(change=change.presence, resume_token=str(change.revision))


def _not_a_token() -> InvalidArgument:
    return InvalidArgument([FieldViolation("resume_token", "is not a token this service gave")])


def _not_found(agent_id: str) -> NotFound:
    return NotFound(
        f"agent {agent_id} is not registered",
        reason="AGENT_NOT_FOUND",
        metadata={"agent_id": agent_id},
    )
