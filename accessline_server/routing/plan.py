"""What one dispatch pass decides, as pure functions of a snapshot: which waiting calls
go to which agents (`plan_offers`), with no etcd and no clock of their own, so the rules
can be checked on any state (tests/test_dispatch_plan.py does so with hypothesis). The
dispatcher reads the snapshot, plans, then carries the plan out in fenced transactions,
where a plan that lost a race simply waits for the next pass."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from accessline.common.v1 import common_pb2
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.routing.storage.v1 import storage_pb2 as rt_store
from accessline_server.routing.queue import Candidate, Rules, order, rank, waiting
from accessline_server.runtime.clock import seconds

QI = rt_store.QueuedInteraction


@dataclass
class GroupState:
    """One resource group as the pass's snapshot shows it."""

    agents: list[pr_pb2.Agent]
    # Presence as Presence shows it, agent id to presence (mark_claimed_busy adjusts it).
    shown: dict[str, pr_pb2.AgentPresence]
    # The group's queued interactions, whatever their state.
    entries: list[QI] = field(default_factory=list)


def claims_per_channel(claim_keys: Iterable[str]) -> dict[tuple[str, int], int]:
    """How many slots of each (agent, channel) are claimed, from the claims' key names
    (`{agent_id}/{channel}/{slot}`, relative to the claims prefix)."""
    claimed: dict[tuple[str, int], int] = defaultdict(int)
    for key in claim_keys:
        agent_id, channel, _slot = key.rsplit("/", 2)
        claimed[(agent_id, int(channel))] += 1
    return claimed


def mark_claimed_busy(
    shown: dict[str, pr_pb2.AgentPresence], claimed: dict[tuple[str, int], int]
) -> None:
    """A channel whose slots are all claimed (an offer out, or a hold) is not free,
    whatever the agent's presence says."""
    for presence in shown.values():
        for state in presence.channels:
            if claimed.get((presence.agent_id, state.channel), 0) >= max(1, state.capacity):
                state.presence = common_pb2.CHANNEL_PRESENCE_BUSY


def ready_to_offer(entries: Iterable[QI], now: float) -> list[QI]:
    """The interactions waiting for an agent now. A call handed over by a stopping
    replica keeps its place but waits for its switch to resume it before it is offered."""
    return [e for e in entries if waiting(e, now) and not e.HasField("detached_until")]


def reserved_agents(entries: Iterable[QI], now: float) -> dict[str, str]:
    """Agents waited for by one interaction (its preferred agent, while the wait lasts):
    agent id to interaction id."""
    return {
        e.preferred_agent_id: e.interaction_id
        for e in entries
        if e.preferred_agent_id and seconds(e.preferred_until) > now
    }


def eligible(
    candidates: list[Candidate],
    item: QI,
    reserved: dict[str, str],
    taken: set[str],
    now: float,
) -> list[Candidate]:
    """Who may be offered `item` now: the preferred agent alone while they are waited
    for; otherwise agents not reserved for another interaction, not taken in this pass,
    and not tried already (unless the retry time has come)."""
    out = [c for c in candidates if c.agent.agent_id not in taken]
    if item.preferred_agent_id and seconds(item.preferred_until) > now:
        return [c for c in out if c.agent.agent_id == item.preferred_agent_id]
    retry_tried = seconds(item.retry_tried_after) <= now
    return [
        c
        for c in out
        if reserved.get(c.agent.agent_id, item.interaction_id) == item.interaction_id
        and (retry_tried or not c.tried)
    ]


@dataclass
class OfferPlan:
    """The offers of one group in one pass, best interaction first, and the agents they
    take (no agent gets two offers in one pass)."""

    offers: list[tuple[QI, Candidate]]
    taken: set[str]


def plan_offers(
    group: GroupState,
    rules: Rules,
    now: float,
    location_of: Callable[[QI], common_pb2.GeoPoint | None] = lambda _: None,
) -> OfferPlan:
    """In priority order, each ready interaction gets the best eligible agent not taken
    yet by an interaction before it."""
    reserved = reserved_agents(group.entries, now)
    taken: set[str] = set()
    offers: list[tuple[QI, Candidate]] = []
    for item in order(ready_to_offer(group.entries, now), rules, now):
        ranked = rank(group.agents, group.shown, item, rules, location_of(item))
        chosen = eligible(ranked, item, reserved, taken, now)
        if chosen:
            taken.add(chosen[0].agent.agent_id)
            offers.append((item, chosen[0]))
    return OfferPlan(offers, taken)
