"""The personal parts of Routing's queue records, sealed with Routing's secret
(ACCESSLINE_ROUTING_SECRET) and bound to the record they belong to: the customer's
location and the preview that names them, the offered agent's addresses, and the address a
call is connected to. What stays in clear is what dispatch orders and matches by (group,
channel, subject, language, segment, value, times, ids)."""

from __future__ import annotations

from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.routing.storage.v1 import storage_pb2 as rt_store
from accessline_server.runtime.sealing import Sealer


def seal_interaction(
    sealer: Sealer, item: rt_store.QueuedInteraction, private: rt_store.InteractionPrivate
) -> None:
    item.sealed_private = sealer.seal(private.SerializeToString(), item.interaction_id)


def interaction(sealer: Sealer, item: rt_store.QueuedInteraction) -> rt_store.InteractionPrivate:
    """The interaction's location and preview (empty when it has none)."""
    if not item.sealed_private:
        return rt_store.InteractionPrivate()
    return rt_store.InteractionPrivate.FromString(
        sealer.unseal(item.sealed_private, item.interaction_id)
    )


def summary(sealer: Sealer, item: rt_store.QueuedInteraction) -> pr_pb2.ContextSummary:
    return interaction(sealer, item).summary


def seal_addresses(sealer: Sealer, offer: rt_store.OfferInFlight, agent: pr_pb2.Agent) -> None:
    addresses = rt_store.AgentAddresses(addresses={c.channel: c.address for c in agent.channels})
    offer.sealed_addresses = sealer.seal(addresses.SerializeToString(), offer.offer_id)


def address(sealer: Sealer, offer: rt_store.OfferInFlight, channel: int) -> str:
    """The offered agent's address on `channel` ("" when unknown)."""
    if not offer.sealed_addresses:
        return ""
    addresses = rt_store.AgentAddresses.FromString(
        sealer.unseal(offer.sealed_addresses, offer.offer_id)
    )
    return addresses.addresses.get(channel, "")


def seal_target(sealer: Sealer, target: rt_store.ConnectTarget, address: str) -> None:
    target.sealed_address = sealer.seal(address.encode(), target.agent_id)


def target_address(sealer: Sealer, target: rt_store.ConnectTarget) -> str:
    if not target.sealed_address:
        return ""
    return sealer.unseal(target.sealed_address, target.agent_id).decode()
