"""What a dispatch pass plans from — the queues, the notify requests, the claims, the
agents' presence and the pending dials — kept in the leader's memory by one etcd watch
over Presence's and Routing's keys (`pr/` through `rt/`), instead of read at every pass.

etcd sends all the changes of a revision in one watch response, and the copy applies a
response at a time, so between responses it is etcd's state at one revision, as one read
would give it (an agent whose claim was dropped after an accept shows busy). A pass first
waits for the copy to reach the leader's own last write (or reads etcd, as before, when
it does not within a second), so it never plans again what the leader just did; the
offer's transaction compares the call's entry and the claim it took from the copy. The
copy also feeds the agent view (view.py) and tells every change to the dispatcher, which
wakes the loop for the ones that make work (wakes.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import Message

from accessline.presence.storage.v1 import storage_pb2 as pr_store
from accessline.routing.storage.v1 import storage_pb2 as rt_store
from accessline_server.presence import roster as pr_roster
from accessline_server.routing import keys
from accessline_server.routing.plan import claims_per_channel
from accessline_server.routing.view import AgentView
from accessline_server.runtime.store import (
    Entry,
    EventKind,
    Op,
    RawKV,
    Store,
    WatchCompacted,
    WatchEvent,
    decode,
)

log = logging.getLogger("accessline.routing")

QI = rt_store.QueuedInteraction
M = TypeVar("M", bound=Message)
# What a pass reads, in this order (the agents only at the copy's load).
_READS = (keys.QUEUE, keys.NOTIFY, keys.CLAIMS, pr_roster.PRESENCE, keys.DIALS)


@dataclass
class Snapshot:
    """What one dispatch pass plans from, as of one revision."""

    queued: list[Entry[QI]]
    requests: list[Entry[rt_store.NotifyRequest]]
    presence: dict[str, pr_store.StoredPresence]
    claimed: dict[tuple[str, int], int]
    dials: list[Entry[rt_store.PendingDial]]


async def read_snapshot(store: Store) -> Snapshot:
    """One read of the queues, the requests, the claims, the agents' presence and the
    pending dials."""
    read = await store.txn([], [Op.get_prefix(p) for p in _READS])
    copy = _Copy()
    copy.load(read.gets)
    return copy.snapshot()


class _Copy:
    """The keys a pass plans from, decoded, as loaded and changed."""

    def __init__(self) -> None:
        self.queued: dict[str, Entry[QI]] = {}
        self.requests: dict[str, Entry[rt_store.NotifyRequest]] = {}
        self.claims: set[str] = set()
        # The revision each claim was last deleted at (kept across loads; one entry per
        # agent's slot ever freed while this leader leads).
        self.released: dict[str, int] = {}
        self.presence: dict[str, pr_store.StoredPresence] = {}
        self.dials: dict[str, Entry[rt_store.PendingDial]] = {}

    def load(self, gets: list[list[RawKV]]) -> None:
        """The copy as a read of `_READS` found it."""
        queue, requests, claims, presence, dials = gets
        self.queued = {k: Entry(k, decode(QI, k, v), m) for k, v, m in queue}
        self.requests = {
            k: Entry(k, decode(rt_store.NotifyRequest, k, v), m) for k, v, m in requests
        }
        self.claims = {kv.key.removeprefix(keys.CLAIMS) for kv in claims}
        self.presence = {
            k.removeprefix(pr_roster.PRESENCE): decode(pr_store.StoredPresence, k, v)
            for k, v, _ in presence
        }
        self.dials = {k: Entry(k, decode(rt_store.PendingDial, k, v), m) for k, v, m in dials}

    def snapshot(self) -> Snapshot:
        """The copy as a pass takes it (lists of its entries: a pass changes none)."""
        return Snapshot(
            queued=list(self.queued.values()),
            requests=list(self.requests.values()),
            presence=dict(self.presence),
            claimed=claims_per_channel(self.claims),
            dials=list(self.dials.values()),
        )

    def apply(self, event: WatchEvent) -> None:
        key, deleted = event.key, event.kind == EventKind.DELETE
        if key.startswith(keys.QUEUE):
            _keep(self.queued, event, QI, deleted)
        elif key.startswith(keys.CLAIMS):
            claim = key.removeprefix(keys.CLAIMS)
            if deleted:
                self.claims.discard(claim)
                self.released[claim] = event.revision
            else:
                self.claims.add(claim)
        elif key.startswith(pr_roster.PRESENCE):
            agent_id = key.removeprefix(pr_roster.PRESENCE)
            if deleted:
                self.presence.pop(agent_id, None)
            else:
                self.presence[agent_id] = event.decode(pr_store.StoredPresence)
        elif key.startswith(keys.NOTIFY):
            _keep(self.requests, event, rt_store.NotifyRequest, deleted)
        elif key.startswith(keys.DIALS):
            _keep(self.dials, event, rt_store.PendingDial, deleted)


class DispatchMirror:
    """The copy, while `run` runs; `on_event` is told every change applied."""

    def __init__(
        self, store: Store, agents: AgentView, on_event: Callable[[WatchEvent], None]
    ) -> None:
        self._store = store
        self._agents = agents
        self._on_event = on_event
        self._copy = _Copy()
        # The revision the copy is at (0: not loaded), and an event set at each change.
        self.revision = 0
        self._advanced = asyncio.Event()
        self.loaded = asyncio.Event()

    def snapshot(self) -> Snapshot:
        return self._copy.snapshot()

    async def wait_for(self, revision: int, timeout: float) -> bool:
        """Whether the copy is loaded and at `revision` or past it within `timeout`
        seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self.revision < max(revision, 1):
                    await self._advanced.wait()
                return True
        return False

    async def released(self, claim_key: str, since: int, timeout: float) -> bool:
        """Whether the claim `claim_key` is deleted after revision `since` within
        `timeout` seconds, as the copy follows etcd."""
        claim = claim_key.removeprefix(keys.CLAIMS)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self._copy.released.get(claim, 0) <= since:
                    await self._advanced.wait()
                return True
        return False

    async def run(self) -> None:
        """Loads the copy (with the agents), then follows every change until cancelled;
        loads it again when etcd no longer has the history to follow."""
        while True:
            try:
                await self._follow()
            except WatchCompacted:
                log.warning("the dispatch leader's copy fell behind etcd's history; reloading")

    async def _follow(self) -> None:
        read = await self._store.txn(
            [], [*(Op.get_prefix(p) for p in _READS), Op.get_prefix(pr_roster.AGENTS)]
        )
        self._copy.load(read.gets[:-1])
        self._agents.load(read.gets[-1])
        self._advance(read.revision)
        self.loaded.set()
        async for events in self._store.watch_span(pr_roster.ROOT, keys.ROOT, read.revision + 1):
            for event in events:
                self._copy.apply(event)
                self._agents.apply(event)
            self._advance(events[-1].revision)
            for event in events:
                self._on_event(event)

    def _advance(self, revision: int) -> None:
        self.revision = revision
        self._advanced.set()
        self._advanced = asyncio.Event()


def _keep(
    entries: dict[str, Entry[M]], event: WatchEvent, message_type: type[M], deleted: bool
) -> None:
    if deleted:
        entries.pop(event.key, None)
    else:
        entries[event.key] = Entry(event.key, event.decode(message_type), event.meta)
