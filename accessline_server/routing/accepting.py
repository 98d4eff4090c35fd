"""A call connected at its agent's accept by the replica holding the switch's stream.

That replica follows the offer its call's queue entry names (a key watch on the store's
shared stream) and, once the agent accepted, takes the call out of the queue connected
in one transaction: the entry and its place gone, the agent's interaction moved to its
own lease, the redirect record written, the claim and the agent's unanswered mark
dropped, the connected event told — only while the entry is still the offered one and
the interaction is there. The dispatch leader, which follows the same offer, leaves an
accepted call to it for `LEAVE_TO_STREAM_SECONDS` (it sees the claim go in its copy,
mirror.py) and marks the
entry connected itself only when it did not (the stream's replica on an older version,
or the transaction refused): one transaction per call fewer than the leader marking it
connected and the stream's replica taking it out after."""

from __future__ import annotations

import time

from accessline.presence.storage.v1 import storage_pb2 as pr_store
from accessline.routing.storage.v1 import storage_pb2 as rt_store
from accessline_server.presence import offers as pr_offers
from accessline_server.routing import keys, private
from accessline_server.routing.offerfeed import OfferFeed
from accessline_server.runtime.clock import seconds
from accessline_server.runtime.sealing import Sealer
from accessline_server.runtime.store import Compare, EventKind, Op, Store

QI = rt_store.QueuedInteraction
# How long the leader leaves an accepted call to its stream's replica.
LEAVE_TO_STREAM_SECONDS = 1.0


class Accepted:
    """The agent's accept of the offer `offer_id`, as its watch showed it."""

    def __init__(self, offer_id: str, answer: pr_store.StoredOffer) -> None:
        self.offer_id = offer_id
        self.answer = answer


async def accept_of(
    store: Store, offer: rt_store.OfferInFlight, since: int, feed: OfferFeed | None = None
) -> Accepted | None:
    """The offer's accept, followed from revision `since` on (from the replica's feed of
    answers when it covers it, else with a watch of its own); None once it ends any
    other way (declined, withdrawn, expired)."""
    key = pr_offers.offer_key(offer.agent_id, offer.offer_id)
    if feed is not None:
        wait = seconds(offer.deadline) - time.time() + pr_offers.OFFER_MARGIN_SECONDS
        answer = await feed.answer(key, since, wait)
        if isinstance(answer, pr_store.StoredOffer):
            accepted = answer.state == pr_store.OFFER_STATE_ACCEPTED
            return Accepted(offer.offer_id, answer) if accepted else None
        if answer is None:
            return None
    async for change in store.watch_key(key, since + 1):
        if change.kind == EventKind.DELETE:
            return None
        answer = change.decode(pr_store.StoredOffer)
        if answer.state == pr_store.OFFER_STATE_ACCEPTED:
            return Accepted(offer.offer_id, answer)
        if answer.state != pr_store.OFFER_STATE_OPEN:
            return None
    return None


def connect_target(
    sealer: Sealer, offer: rt_store.OfferInFlight, channel: int, lease: int
) -> rt_store.ConnectTarget:
    """Where an accepted call goes: the agent, the channel they took it on, the lease
    their interaction moves to, and their address there (sealed)."""
    target = rt_store.ConnectTarget(
        agent_id=offer.agent_id,
        channel=channel,  # type: ignore[arg-type]
        interaction_lease=lease,
    )
    private.seal_target(sealer, target, private.address(sealer, offer, channel))
    return target


def connected(sealer: Sealer, offered: QI, answer: pr_store.StoredOffer) -> QI:
    """The offered entry as connected by the agent's accept."""
    updated = QI()
    updated.CopyFrom(offered)
    updated.state = rt_store.INTERACTION_STATE_CONNECTED
    channel = answer.accepted_channel or offered.offer.channel
    updated.connected.CopyFrom(
        connect_target(sealer, offered.offer, channel, answer.interaction_lease)
    )
    return updated


def connect_ops(
    key: str,
    offered: QI,
    revision: int,
    target: rt_store.ConnectTarget,
    also: list[Op],
    *,
    kept: bool = True,
) -> tuple[list[Compare], list[Op]]:
    """The transaction that takes the offered entry (at `revision`) out connected, with
    `also` (the redirect record, the connected event); with `kept`, only while the
    agent's interaction is there, moved to its own lease."""
    ops = [Op.delete(key), Op.delete(offered.offer.claim_key)]
    if offered.place_key:
        ops.append(Op.delete(offered.place_key))
    ops.append(Op.delete(keys.no_answer(target.agent_id)))
    compares = [Compare.modified_at(key, revision)]
    if kept:
        there, relet = pr_offers.interaction_connected(
            target.agent_id, offered.interaction_id, target.interaction_lease
        )
        compares.append(there)
        ops.append(relet)
    return compares, [*ops, *also]
