"""An agent's answer to an offer, judged and written: whether it repeats the answer the
offer holds, why it cannot be recorded, what an accept writes in the transaction that
marks the offer accepted, and what the interaction's end writes. Pure: the session
(session.py) reads and writes."""

from __future__ import annotations

import time
from collections.abc import Callable

from accessline.common.v1 import common_pb2
from accessline.presence.storage.v1 import storage_pb2 as pr_store
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline_server.notification import surveys
from accessline_server.presence import keys
from accessline_server.presence.roster import channel_presence
from accessline_server.runtime.clock import now_timestamp
from accessline_server.runtime.errors import InvalidArgument
from accessline_server.runtime.store import Compare, Entry, Op

C = common_pb2


def already_answered(response: pr_pb2.OfferResponse, stored: pr_store.StoredOffer) -> bool:
    """Whether the offer already holds this very answer (answering twice the same way
    is harmless: the same confirmation again)."""
    accept = response.decision == pr_pb2.OFFER_DECISION_ACCEPT
    wanted = stored.state == (
        pr_store.OFFER_STATE_ACCEPTED if accept else pr_store.OFFER_STATE_DECLINED
    )
    return wanted and (
        not accept
        or not response.accept_channel
        or response.accept_channel == stored.accepted_channel
    )


def refusal_of(
    response: pr_pb2.OfferResponse,
    entry: Entry[pr_store.StoredOffer] | None,
    channel_of: Callable[[C.Channel.ValueType, str], pr_store.StoredChannel],
    do_not_disturb: bool,
) -> pr_pb2.OfferRefusal.ValueType | None:
    """Why this answer cannot be recorded (unknown offer, no longer open, the channel
    accepted on unavailable), or None."""
    if entry is None:
        return pr_pb2.OFFER_REFUSAL_UNKNOWN_OFFER
    stored = entry.value
    if (
        stored.state != pr_store.OFFER_STATE_OPEN
        or stored.offer.deadline.ToNanoseconds() <= time.time_ns()
    ):
        return pr_pb2.OFFER_REFUSAL_NO_LONGER_OPEN
    if response.decision != pr_pb2.OFFER_DECISION_ACCEPT:
        return None
    channel_id = response.accept_channel or stored.offer.channel
    try:
        channel = channel_of(channel_id, "offer_response.accept_channel")
    except InvalidArgument:
        return pr_pb2.OFFER_REFUSAL_CHANNEL_UNAVAILABLE
    if (
        channel_presence(channel, do_not_disturb) != C.CHANNEL_PRESENCE_AVAILABLE
        and channel_id != stored.offer.channel
    ):
        return pr_pb2.OFFER_REFUSAL_CHANNEL_UNAVAILABLE
    return None


def accept_ops(
    state: pr_store.StoredPresence,
    stored: pr_store.StoredOffer,
    channel_id: C.Channel.ValueType,
    *,
    agent_id: str,
    presence: tuple[int, int],
    lasts: int,
) -> tuple[list[Compare], list[Op], pr_store.StoredPresence, pr_store.StoredInteraction]:
    """What an accept writes with the offer's new state (and the agent's presence as it
    writes it): the agent busy on the channel
    (so whoever sees the accepted offer also sees the channel taken) and the
    interaction, bound to the call's lease until the call is connected (then to
    `lasts`); only while the agent's presence (`presence`: its lease and the revision
    it was read at) is as read and the caller still holds their place. Last, the
    interaction as written."""
    presence_lease, presence_revision = presence
    busy = pr_store.StoredPresence()
    busy.CopyFrom(state)
    for channel in busy.channels:
        if channel.channel == channel_id:
            channel.active_interactions += 1
    busy.interactions[stored.offer.interaction_id] = channel_id
    busy.ClearField("idle_since")
    busy.updated_at.CopyFrom(now_timestamp())
    presence_key = keys.presence(agent_id)
    ongoing = pr_store.StoredInteraction(
        interaction_id=stored.offer.interaction_id,
        channel=channel_id,
        offer_id=stored.offer.offer_id,
        accepted_at=now_timestamp(),
        customer_id=stored.customer_id,
        application_id=stored.application_id,
        sealed_context=stored.sealed_context,
        journey_interaction_id=stored.journey_interaction_id,
        survey_after_call=stored.survey_after_call,
    )
    compares = [Compare.modified_at(presence_key, presence_revision)]
    if stored.call_key:
        # The caller is still there: their place in the queue is unchanged.
        compares.append(Compare.created_at(stored.call_key, stored.call_create_revision))
    ops = [
        Op.put(presence_key, busy, presence_lease),
        # Until the call is connected the interaction lives and dies with the call;
        # the router moves it to `lasts` then.
        Op.put(
            keys.interaction(agent_id, stored.offer.interaction_id),
            ongoing,
            stored.call_lease or lasts,
        ),
    ]
    return compares, ops, busy, ongoing


def end_ops(ended: Entry[pr_store.StoredInteraction], agent_id: str) -> list[Op]:
    """What the end of an interaction writes with the agent's presence: its key gone
    and, for a customer of an app, the call's end for Notification (its published
    `surveys` module)."""
    ops = [Op.delete(ended.key)]
    ongoing = ended.value
    if ongoing.customer_id and ongoing.journey_interaction_id:
        ops.append(
            surveys.invitation_op(
                ongoing.application_id,
                ongoing.customer_id,
                ongoing.journey_interaction_id,
                agent_id,
                ask=ongoing.survey_after_call,
            )
        )
    return ops
