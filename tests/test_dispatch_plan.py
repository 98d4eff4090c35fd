"""The dispatch pass's decisions (accessline_server/routing/plan.py) on generated states, with no
etcd and no processes: no agent gets two offers in one pass, an offer goes only to an
agent free on a voice channel and not waited for by another call, a call waiting for its
preferred agent goes to nobody else, and a call left without an offer had no eligible
agent left."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from accessline.common.v1 import common_pb2
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.routing.storage.v1 import storage_pb2 as rt_store
from accessline_server.routing.plan import (
    GroupState,
    claims_per_channel,
    eligible,
    mark_claimed_busy,
    plan_offers,
    reserved_agents,
)
from accessline_server.routing.queue import Rules, rank
from accessline_server.runtime.clock import timestamp

C = common_pb2
NOW = 1_000_000.0
VOICE = [C.CHANNEL_DESK_VOICE, C.CHANNEL_MOBILE_VOICE]
RULES = Rules()


@dataclass
class AgentSpec:
    available: bool
    channel: int
    skill: int
    idle_for: float


@dataclass
class CallSpec:
    waited: float
    subject: str
    tried: int  # index of an agent already tried, or -1
    preferred: int  # index of the preferred agent, or -1
    preferred_waited_for: bool
    offered: bool


agents_st = st.lists(
    st.builds(
        AgentSpec,
        available=st.booleans(),
        channel=st.sampled_from(VOICE),
        skill=st.integers(0, 5),
        idle_for=st.floats(0, 600),
    ),
    max_size=6,
)
calls_st = st.lists(
    st.builds(
        CallSpec,
        waited=st.floats(0, 900),
        subject=st.sampled_from(["", "claims", "billing"]),
        tried=st.integers(-1, 5),
        preferred=st.integers(-1, 5),
        preferred_waited_for=st.booleans(),
        offered=st.booleans(),
    ),
    max_size=8,
)


def build(agents: list[AgentSpec], calls: list[CallSpec]) -> GroupState:
    made = []
    shown = {}
    for i, spec in enumerate(agents):
        agent_id = f"a{i}"
        made.append(
            pr_pb2.Agent(
                agent_id=agent_id,
                resource_groups=["g"],
                skills=[pr_pb2.Skill(name="claims", level=spec.skill)],
                channels=[pr_pb2.ChannelConfig(channel=spec.channel, capacity=1)],  # type: ignore[arg-type]
            )
        )
        presence = C.CHANNEL_PRESENCE_AVAILABLE if spec.available else C.CHANNEL_PRESENCE_BUSY
        shown[agent_id] = pr_pb2.AgentPresence(
            agent_id=agent_id,
            channels=[pr_pb2.ChannelState(channel=spec.channel, presence=presence, capacity=1)],  # type: ignore[arg-type]
            idle_since=timestamp(NOW - spec.idle_for),
        )
    entries = []
    for i, spec in enumerate(calls):
        item = rt_store.QueuedInteraction(
            interaction_id=f"i{i}",
            resource_group="g",
            channel=C.CHANNEL_DESK_VOICE,
            subject=spec.subject,
            business_value=10,
            sla_target_seconds=60,
            state=rt_store.INTERACTION_STATE_OFFERED
            if spec.offered
            else rt_store.INTERACTION_STATE_QUEUED,
            created_at=timestamp(NOW - spec.waited),
            not_before=timestamp(0),
            retry_tried_after=timestamp(NOW + 60),
        )
        if 0 <= spec.tried < len(agents):
            item.tried_agent_ids.append(f"a{spec.tried}")
        if 0 <= spec.preferred < len(agents):
            item.preferred_agent_id = f"a{spec.preferred}"
            item.preferred_until.CopyFrom(
                timestamp(NOW + 30 if spec.preferred_waited_for else NOW - 30)
            )
        entries.append(item)
    return GroupState(made, shown, entries)


@settings(max_examples=300, deadline=None)
@given(agents_st, calls_st)
def test_a_pass_offers_each_free_agent_at_most_once_and_only_as_the_rules_allow(
    agents: list[AgentSpec], calls: list[CallSpec]
) -> None:
    state = build(agents, calls)
    planned = plan_offers(state, RULES, NOW)
    offered_to = [chosen.agent.agent_id for _, chosen in planned.offers]
    # No agent twice; only queued calls; the taken set is exactly who was offered.
    assert len(offered_to) == len(set(offered_to))
    assert set(offered_to) == planned.taken
    reserved = reserved_agents(state.entries, NOW)
    for item, chosen in planned.offers:
        assert item.state == rt_store.INTERACTION_STATE_QUEUED
        agent_id = chosen.agent.agent_id
        channel = next(c for c in state.shown[agent_id].channels if c.channel == chosen.channel)
        assert channel.presence == C.CHANNEL_PRESENCE_AVAILABLE
        if item.preferred_agent_id and item.preferred_until.seconds > NOW:
            # Waited for: the preferred agent alone, tried or not (two calls waiting for
            # one agent: the first in priority order gets them).
            assert agent_id == item.preferred_agent_id
        else:
            # Nobody another call waits for; nobody tried already (retries not due).
            assert reserved.get(agent_id, item.interaction_id) == item.interaction_id
            assert agent_id not in item.tried_agent_ids
    # A queued call without an offer had nobody eligible left once the calls before it
    # were served.
    served = {item.interaction_id for item, _ in planned.offers}
    for item in state.entries:
        if item.state != rt_store.INTERACTION_STATE_QUEUED or item.interaction_id in served:
            continue
        ranked = rank(state.agents, state.shown, item, RULES)
        assert eligible(ranked, item, reserved, planned.taken, NOW) == []


@settings(max_examples=100, deadline=None)
@given(agents_st, calls_st)
def test_the_first_call_in_priority_order_gets_its_best_ranked_agent(
    agents: list[AgentSpec], calls: list[CallSpec]
) -> None:
    state = build(agents, calls)
    planned = plan_offers(state, RULES, NOW)
    if not planned.offers:
        return
    first, chosen = planned.offers[0]
    ranked = rank(state.agents, state.shown, first, RULES)
    best = eligible(ranked, first, reserved_agents(state.entries, NOW), set(), NOW)
    assert chosen.agent.agent_id == best[0].agent.agent_id


def test_a_channel_with_every_slot_claimed_is_busy_whatever_presence_says() -> None:
    shown = {
        "a0": pr_pb2.AgentPresence(
            agent_id="a0",
            channels=[
                pr_pb2.ChannelState(
                    channel=C.CHANNEL_DESK_VOICE,
                    presence=C.CHANNEL_PRESENCE_AVAILABLE,
                    capacity=2,
                )
            ],
        )
    }
    claimed = claims_per_channel([f"a0/{C.CHANNEL_DESK_VOICE}/0"])
    mark_claimed_busy(shown, claimed)
    assert shown["a0"].channels[0].presence == C.CHANNEL_PRESENCE_AVAILABLE  # one of two
    claimed = claims_per_channel([f"a0/{C.CHANNEL_DESK_VOICE}/0", f"a0/{C.CHANNEL_DESK_VOICE}/1"])
    mark_claimed_busy(shown, claimed)
    assert shown["a0"].channels[0].presence == C.CHANNEL_PRESENCE_BUSY
