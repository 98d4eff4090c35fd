"""The presence feed: the one view of agents and their presence a Presence replica keeps
from its hub's watch, shared by the replica's WatchPresence streams. Each change is
decoded and worked out once, then handed to every watcher (each filters it); a watcher
that starts, or resumes from a token the feed still holds, is served from memory rather
than by an etcd read and an etcd watch of its own."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from accessline.presence.storage.v1 import storage_pb2 as pr_store
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline_server.presence import keys
from accessline_server.presence.roster import public_presence
from accessline_server.runtime.errors import Unavailable
from accessline_server.runtime.store import EventKind, Store, WatchEvent

Agents = dict[str, pr_pb2.Agent]
Live = dict[str, pr_store.StoredPresence]


async def read_snapshot(store: Store) -> tuple[Agents, Live, int]:
    """Every agent (without its addresses) and every live session, read at one
    revision."""
    agents, revision = await store.get_prefix(keys.AGENTS, pr_store.StoredAgent)
    live, _ = await store.get_prefix(keys.PRESENCE, pr_store.StoredPresence, revision=revision)
    return (
        {e.value.agent.agent_id: e.value.agent for e in agents},
        {e.value.agent_id: e.value for e in live},
        revision,
    )


def apply(event: WatchEvent, agents: Agents, live: Live) -> pr_pb2.AgentPresence | None:
    """Applies a watch event to the view; the change a watcher is shown, if any."""
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


@dataclass(frozen=True)
class Change:
    """A change as watchers are shown it, at its etcd revision, with the agent as
    registered then (what a watcher's filter looks at)."""

    revision: int
    presence: pr_pb2.AgentPresence
    agent: pr_pb2.Agent


class Follower:
    """One watcher's place in the feed: the changes not yet sent to it. One that falls
    `backlog` changes behind (a slow reader) or whose feed reloaded is owed a fresh
    snapshot instead (`None` from `changes`)."""

    def __init__(self, backlog: int) -> None:
        self._backlog = backlog
        self._queue: deque[Change] = deque()
        self._resync = False
        self._wake = asyncio.Event()

    def push(self, change: Change) -> None:
        if len(self._queue) >= self._backlog:
            self.resync()
            return
        self._queue.append(change)
        self._wake.set()

    def resync(self) -> None:
        self._queue.clear()
        self._resync = True
        self._wake.set()

    async def changes(self) -> AsyncIterator[Change | None]:
        """The changes in order; None where a snapshot must be sent (built at once,
        before the next await, from the feed's view: it holds every change until then)."""
        while True:
            while not self._queue and not self._resync:
                self._wake.clear()
                await self._wake.wait()
            if self._resync:
                # The snapshot is of the view now, which holds what was queued since.
                self._resync = False
                self._queue.clear()
                yield None
            else:
                yield self._queue.popleft()


class Feed:
    """Agents and their presence as of `revision`, the last `recent` changes, and the
    followers to hand each new change to."""

    def __init__(self, *, recent: int = 10_000, backlog: int = 10_000) -> None:
        self.agents: Agents = {}
        self.live: Live = {}
        self.revision = 0
        self._recent: deque[Change] = deque(maxlen=recent)
        # Every change after this revision is in `_recent`.
        self._complete_after = 0
        self._backlog = backlog
        self._followers: set[Follower] = set()
        self._ready = asyncio.Event()

    def load(self, agents: Agents, live: Live, revision: int) -> None:
        """A view read afresh (the start, or after the hub's watch broke): every
        follower is owed a snapshot of it."""
        self.agents, self.live, self.revision = agents, live, revision
        self._recent.clear()
        self._complete_after = revision
        for follower in self._followers:
            follower.resync()
        self._ready.set()

    def apply(self, event: WatchEvent) -> None:
        self.revision = event.revision
        shown = apply(event, self.agents, self.live)
        if shown is None:
            return
        change = Change(
            event.revision,
            shown,
            self.agents.get(shown.agent_id) or pr_pb2.Agent(agent_id=shown.agent_id),
        )
        if len(self._recent) == self._recent.maxlen:
            self._complete_after = self._recent[0].revision
        self._recent.append(change)
        for follower in self._followers:
            follower.push(change)

    async def ready(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            raise Unavailable(
                "presence is still connecting to etcd", reason="HUB_STARTING", retry_after=1.0
            ) from None

    def holds_since(self, revision: int) -> bool:
        """Whether every change after `revision` is in memory (and none is to come
        that etcd already holds)."""
        return self._complete_after <= revision <= self.revision

    def since(self, revision: int) -> list[Change]:
        return [c for c in self._recent if c.revision > revision]

    def follow(self) -> Follower:
        follower = Follower(self._backlog)
        self._followers.add(follower)
        return follower

    def leave(self, follower: Follower) -> None:
        self._followers.discard(follower)
