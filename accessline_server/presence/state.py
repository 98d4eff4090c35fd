"""An agent's stored presence and how the agent's session changes it: the state at
login, a channel made available or not (remembered under do-not-disturb), do-not-disturb
itself, every channel set not ready, and an interaction ended. Pure: the session
(session.py) writes the result."""

from __future__ import annotations

from collections.abc import Iterable

from accessline.presence.storage.v1 import storage_pb2 as pr_store
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline_server.runtime.clock import now_timestamp


def logged_in(
    agent: pr_pb2.Agent,
    session_id: str,
    device: pr_pb2.Device,
    ongoing: Iterable[pr_store.StoredInteraction],
) -> pr_store.StoredPresence:
    """The presence of a new session: each channel as the agent's configuration says at
    login, busy with the interactions an earlier session accepted and did not end."""
    now = now_timestamp()
    state = pr_store.StoredPresence(
        agent_id=agent.agent_id,
        agent_session_id=session_id,
        channels=[
            pr_store.StoredChannel(
                channel=c.channel, available=c.available_on_login, capacity=c.capacity or 1
            )
            for c in agent.channels
        ],
        updated_at=now,
        idle_since=now,
        resource_groups=agent.resource_groups,
        device=device,
    )
    for interaction in ongoing:
        for channel in state.channels:
            if channel.channel == interaction.channel:
                channel.active_interactions += 1
                state.interactions[interaction.interaction_id] = interaction.channel
    if state.interactions:
        state.ClearField("idle_since")
    return state


def resumed(state: pr_store.StoredPresence, previous: pr_store.StoredPresence) -> None:
    """A new session takes on a previous one's choices: each channel's availability
    (channels configured since keep their login default), do-not-disturb and the
    not-ready reason."""
    before = {c.channel: c for c in previous.channels}
    for channel in state.channels:
        if channel.channel in before:
            channel.available = before[channel.channel].available
            channel.available_before_dnd = before[channel.channel].available_before_dnd
    state.do_not_disturb = previous.do_not_disturb
    state.not_ready_reason = previous.not_ready_reason


def set_available(
    state: pr_store.StoredPresence,
    channel: pr_store.StoredChannel,
    available: bool,
    reason: str = "",
) -> None:
    """The agent makes a channel available (the not-ready reason cleared) or not (with
    its reason, if given); under do-not-disturb the choice is kept for when it ends."""
    if state.do_not_disturb:
        channel.available_before_dnd = available
    else:
        channel.available = available
    if available:
        state.not_ready_reason = ""
    elif reason:
        state.not_ready_reason = reason


def set_do_not_disturb(state: pr_store.StoredPresence, enabled: bool, reason: str = "") -> None:
    """Do-not-disturb on (with its reason, if given): every channel unavailable, each
    one's choice kept; off: the choices back and the reason cleared."""
    if enabled and reason:
        state.not_ready_reason = reason
    elif not enabled:
        state.not_ready_reason = ""
    if enabled == state.do_not_disturb:
        return
    for channel in state.channels:
        if enabled:
            channel.available_before_dnd, channel.available = channel.available, False
        else:
            channel.available = channel.available_before_dnd
    state.do_not_disturb = enabled


# The not-ready reason Presence gives when it sets an agent not ready itself.
NO_ANSWER_REASON = "no-answer"


def not_ready(state: pr_store.StoredPresence) -> None:
    """Every channel not ready (reason `no-answer`) until the agent makes it available
    again."""
    for channel in state.channels:
        set_available(state, channel, False, NO_ANSWER_REASON)


def interaction_ended(state: pr_store.StoredPresence, interaction_id: str) -> bool:
    """The agent is no longer on the interaction: its channel has one less, and the
    agent is idle from now when it was the last. False when it was not ongoing."""
    if interaction_id not in state.interactions:
        return False
    channel_id = state.interactions.pop(interaction_id)
    for channel in state.channels:
        if channel.channel == channel_id:
            channel.active_interactions = max(0, channel.active_interactions - 1)
    if not state.interactions:
        state.idle_since.CopyFrom(now_timestamp())
    return True
