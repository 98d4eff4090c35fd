"""The dispatch leader's view of the agents: Presence's agent records in etcd (read only),
loaded once and kept in step by a watch, so a dispatch pass ranks agents without calling
Presence; Presence stays the only writer of these keys. Agents' addresses are opened
with Presence's sealing secret, and held only in memory. Presence itself changes too often
to be taken from a watch: a pass reads it in the same snapshot as the claims (see
dispatch.py), and this watch only wakes the loop when a change may free an agent."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from accessline.presence.storage.v1 import storage_pb2 as pr_store
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline_server.presence import roster as pr_roster
from accessline_server.presence.roster import public_presence
from accessline_server.runtime.store import EventKind, Store, WatchCompacted, WatchEvent, decode

log = logging.getLogger("accessline.routing")


class AgentView:
    """Agents (`pr/agents/`), watch-synced; any change of an agent or of a presence that
    may free an agent calls `on_change`."""

    def __init__(
        self, store: Store, sealing: pr_roster.Sealing, on_change: Callable[[], None]
    ) -> None:
        self._store = store
        self._sealing = sealing
        self._on_change = on_change
        self._agents: dict[str, pr_pb2.Agent] = {}
        self.ready = asyncio.Event()

    def group(
        self, group: str, stored: dict[str, pr_store.StoredPresence]
    ) -> tuple[list[pr_pb2.Agent], dict[str, pr_pb2.AgentPresence]]:
        """The group's agents and the presence of each as Presence would show it, from
        `stored` (agent id to stored presence, as read by the pass)."""
        agents = [a for a in self._agents.values() if group in a.resource_groups]
        shown = {a.agent_id: public_presence(a, stored.get(a.agent_id)) for a in agents}
        return agents, shown

    async def run(self) -> None:
        """Loads the agents and follows every change until cancelled; reloads when etcd
        compacted the history the watch needed."""
        while True:
            agents, revision = await self._store.get_prefix(pr_roster.AGENTS, pr_store.StoredAgent)
            self._agents = {e.value.agent.agent_id: self._sealing.agent(e.value) for e in agents}
            self.ready.set()
            self._on_change()
            try:
                async for event in self._store.watch_prefix(pr_roster.ROOT, revision + 1):
                    if event.key.startswith(pr_roster.AGENTS):
                        agent_id = event.key.removeprefix(pr_roster.AGENTS)
                        if event.kind == EventKind.DELETE:
                            self._agents.pop(agent_id, None)
                        else:
                            stored = event.decode(pr_store.StoredAgent)
                            self._agents[agent_id] = self._sealing.agent(stored)
                    elif not event.key.startswith(pr_roster.PRESENCE) or only_busier(event):
                        continue
                    self._on_change()
            except WatchCompacted:
                log.warning("agent view fell behind etcd's history; reloading")


def only_busier(event: WatchEvent) -> bool:
    """Whether a presence change only took on interactions (an accept): it frees nothing,
    so it gives the dispatch loop no work. Any other change (a channel made available or
    not, do-not-disturb, an interaction ended, a login or logout) may."""
    if event.kind == EventKind.DELETE or event.prev_value is None:
        return False
    before = decode(pr_store.StoredPresence, event.key, event.prev_value)
    after = event.decode(pr_store.StoredPresence)
    if (before.agent_session_id, before.do_not_disturb, before.not_ready_reason) != (
        after.agent_session_id,
        after.do_not_disturb,
        after.not_ready_reason,
    ) or not set(before.interactions) <= set(after.interactions):
        return False
    channels = {c.channel: c for c in before.channels}
    return len(channels) == len(after.channels) and all(
        (was := channels.get(c.channel)) is not None
        and (was.available, was.capacity, was.available_before_dnd)
        == (c.available, c.capacity, c.available_before_dnd)
        and c.active_interactions >= was.active_interactions
        for c in after.channels
    )
