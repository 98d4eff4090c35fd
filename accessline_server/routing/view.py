"""The dispatch leader's view of the agents: Presence's agent records in etcd (read only),
loaded once and kept in step by the leader's watch (mirror.py), so a dispatch pass ranks
agents without calling Presence; Presence stays the only writer of these keys. Agents'
addresses are opened with Presence's sealing secret, and held only in memory. The
agents' presence is kept beside the claims in the same copy; a change of it wakes the
loop only when it may free an agent."""

from __future__ import annotations

from collections.abc import Callable

from accessline.presence.storage.v1 import storage_pb2 as pr_store
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline_server.presence import roster as pr_roster
from accessline_server.presence.roster import public_presence
from accessline_server.runtime.store import EventKind, RawKV, WatchEvent, decode


class AgentView:
    """Agents (`pr/agents/`), loaded and kept in step by the dispatch leader's copy of
    its keys (mirror.py); any change of an agent or of a presence that may free an agent
    calls `on_change`."""

    def __init__(self, sealing: pr_roster.Sealing, on_change: Callable[[], None]) -> None:
        self._sealing = sealing
        self._on_change = on_change
        self._agents: dict[str, pr_pb2.Agent] = {}

    def group(
        self, group: str, stored: dict[str, pr_store.StoredPresence]
    ) -> tuple[list[pr_pb2.Agent], dict[str, pr_pb2.AgentPresence]]:
        """The group's agents and the presence of each as Presence would show it, from
        `stored` (agent id to stored presence, as read by the pass)."""
        agents = [a for a in self._agents.values() if group in a.resource_groups]
        shown = {a.agent_id: public_presence(a, stored.get(a.agent_id)) for a in agents}
        return agents, shown

    def load(self, rows: list[RawKV]) -> None:
        """The agents as a read of `pr/agents/` found them."""
        self._agents = {}
        for key, value, _ in rows:
            agent = self._sealing.agent(decode(pr_store.StoredAgent, key, value))
            self._agents[agent.agent_id] = agent
        self._on_change()

    def apply(self, event: WatchEvent) -> None:
        """A change under `pr/` (any other is ignored)."""
        if event.key.startswith(pr_roster.AGENTS):
            agent_id = event.key.removeprefix(pr_roster.AGENTS)
            if event.kind == EventKind.DELETE:
                self._agents.pop(agent_id, None)
            else:
                self._agents[agent_id] = self._sealing.agent(event.decode(pr_store.StoredAgent))
        elif not event.key.startswith(pr_roster.PRESENCE) or only_busier(event):
            return
        self._on_change()


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
