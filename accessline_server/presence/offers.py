"""Presence's published module for offers: the offer of an interaction to an agent is
written by whoever routes (Routing, in its dispatch transaction, maybe on another
replica), delivered by the Presence replica holding the agent's stream, and answered in
place; the interaction an agent accepted is bound to the call until the call is
connected. Routing writes and withdraws offers and settles interactions only through
these functions.

    offer_key(agent_id, offer_id)            StoredOffer       (a lease ending at the deadline)
    interactions_key(agent_id) + id          StoredInteraction (the longest interaction allowed)

Storage messages are those of `accessline.presence.storage.v1`."""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass

from opentelemetry import propagate

from accessline.common.v1 import common_pb2
from accessline.presence.storage.v1 import storage_pb2 as pr_store
from accessline.presence.v1 import presence_pb2
from accessline_server.presence.keys import OFFERS, interaction, interactions, offer, offers
from accessline_server.presence.roster import Sealing
from accessline_server.runtime.store import Compare, Entry, Op, Store

# An offer's key outlives its deadline by this much, so its answer can still be read.
OFFER_MARGIN_SECONDS = 5.0
NO_REASON = presence_pb2.OFFER_CANCEL_REASON_UNSPECIFIED

offer_key = offer
# Every agent's offers, for a watch of all of them.
OFFERS_ROOT = OFFERS
offers_key = offers
interactions_key = interactions


@dataclass(frozen=True)
class CallBinding:
    """What ties an offered call's fate to its caller: the key of the call's place (the
    offer holds only while it exists with this create revision) and the call's lease
    (an accepted interaction is bound to it until the call is connected)."""

    key: str
    create_revision: int
    lease: int


def new_offer(
    agent_id: str,
    interaction_id: str,
    channel: common_pb2.Channel.ValueType,
    summary: presence_pb2.ContextSummary,
    timeout: float,
    sealing: Sealing,
    call: CallBinding | None = None,
    context: common_pb2.ContextData | None = None,
    customer: tuple[str, str] = ("", ""),
    journey_id: str = "",
    survey: bool = False,
) -> pr_store.StoredOffer:
    """An open offer due `timeout` seconds from now, its preview's personal part and the
    interaction's whole `context` (for the agent who accepts) sealed, naming the
    `customer` (customer id, application id) the agent may send links to and the
    interaction's id in their journey (`journey_id`, which the call's end and the survey
    after it name; `survey` when the customer's application asks for one),
    carrying the current trace context (write it under a lease of at least
    `timeout + OFFER_MARGIN_SECONDS`)."""
    deadline = time.time() + timeout
    shown = presence_pb2.Offer(
        offer_id="o" + secrets.token_urlsafe(12),
        interaction_id=interaction_id,
        summary=summary,
        channel=channel,
    )
    shown.deadline.FromNanoseconds(int(deadline * 1e9))
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    stored = pr_store.StoredOffer(
        offer=shown,
        agent_id=agent_id,
        state=pr_store.OFFER_STATE_OPEN,
        trace=common_pb2.TraceContext(
            traceparent=carrier.get("traceparent", ""), tracestate=carrier.get("tracestate", "")
        ),
    )
    if call is not None:
        stored.call_key = call.key
        stored.call_create_revision = call.create_revision
        stored.call_lease = call.lease
    stored.customer_id, stored.application_id = customer
    stored.journey_interaction_id = journey_id
    stored.survey_after_call = survey
    sealing.seal_summary(stored)
    if context is not None:
        sealing.seal_context(stored, context)
    return stored


def interaction_connected(agent_id: str, interaction_id: str, lease: int) -> tuple[Compare, Op]:
    """For the transaction that confirms a call reached the agent: the accepted
    interaction leaves the call's lease for `lease` (the answer's `interaction_lease`),
    if the agent has not ended it already (apply the op only when the compare holds)."""
    key = interaction(agent_id, interaction_id)
    return Compare.exists(key), Op.relet(key, lease)


def interaction_abandoned(agent_id: str, interaction_id: str) -> Op:
    """For the transaction that takes a call out before it reached the agent: an
    interaction the agent accepted meanwhile ends (the agent's app is told the caller is
    gone, and the channel is free again)."""
    return Op.delete(interaction(agent_id, interaction_id))


async def make_offer(
    store: Store,
    agent_id: str,
    interaction_id: str,
    channel: common_pb2.Channel.ValueType,
    summary: presence_pb2.ContextSummary,
    timeout: float,
    sealing: Sealing,
) -> pr_store.StoredOffer:
    """Offers an interaction to an agent; the offer expires by itself after `timeout`."""
    stored = new_offer(agent_id, interaction_id, channel, summary, timeout, sealing)
    lease = await store.grant_lease(max(1, math.ceil(timeout + OFFER_MARGIN_SECONDS)))
    await store.put(offer(agent_id, stored.offer.offer_id), stored, lease)
    return stored


async def cancel_offer(
    store: Store, agent_id: str, offer_id: str, reason: presence_pb2.OfferCancelReason.ValueType
) -> bool:
    """Withdraws an open offer; False when it was answered, cancelled or gone already."""
    for _ in range(5):
        entry = await store.get(offer(agent_id, offer_id), pr_store.StoredOffer)
        if entry is None or entry.value.state != pr_store.OFFER_STATE_OPEN:
            return False
        if await _set_state(store, entry, pr_store.OFFER_STATE_CANCELLED, cancel_reason=reason):
            return True
    return False


async def _set_state(
    store: Store,
    entry: Entry[pr_store.StoredOffer],
    state: pr_store.OfferState.ValueType,
    *,
    cancel_reason: presence_pb2.OfferCancelReason.ValueType = NO_REASON,
    accepted_channel: common_pb2.Channel.ValueType = common_pb2.CHANNEL_UNSPECIFIED,
    interaction_lease: int = 0,
    also: tuple[list[Compare], list[Op]] = ([], []),
) -> int:
    """Moves an open offer to `state` if nobody changed it since it was read, together
    with `also` (more compares and operations) in the same transaction: the revision it
    was written at, or 0 when a compare failed."""
    updated = pr_store.StoredOffer()
    updated.CopyFrom(entry.value)
    updated.state = state
    updated.cancel_reason = cancel_reason
    updated.accepted_channel = accepted_channel
    updated.interaction_lease = interaction_lease
    updated.answered_at.FromNanoseconds(time.time_ns())
    result = await store.txn(
        [Compare.modified_at(entry.key, entry.meta.mod_revision), *also[0]],
        [Op.put(entry.key, updated, entry.meta.lease), *also[1]],
    )
    return result.revision if result.succeeded else 0


set_offer_state = _set_state


async def working_on(
    store: Store, agent_id: str, interaction_id: str
) -> pr_store.StoredInteraction | None:
    """The interaction while the agent is on it (accepted, not ended), else None: for
    Notification, sending a link only to the customer of an agent's own interaction."""
    entry = await store.get(interaction(agent_id, interaction_id), pr_store.StoredInteraction)
    return entry.value if entry is not None else None
