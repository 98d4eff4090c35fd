"""Presence's published module for reading agents and their presence: Routing keeps a
view of every agent (its groups, channels and sealed addresses) and of their presence
from these keys, and reads presence inside its dispatch transaction. Only Presence writes
them. Agents' channel addresses are personal data, sealed with
ACCESSLINE_PRESENCE_SECRET; Routing, which connects calls to them, is given the same
secret.

    AGENTS + agent_id     StoredAgent     (addresses sealed)
    PRESENCE + agent_id   StoredPresence  (the agent session's lease)

Storage messages are those of `accessline.presence.storage.v1`."""

from __future__ import annotations

from accessline.common.v1 import common_pb2 as C
from accessline.presence.storage.v1 import storage_pb2 as pr_store
from accessline.presence.v1 import presence_pb2
from accessline_server.presence.keys import AGENTS, PRESENCE, ROOT
from accessline_server.runtime.sealing import Sealer

__all__ = [
    "AGENTS",
    "DEVELOPMENT_SECRET",
    "PRESENCE",
    "ROOT",
    "Sealing",
    "channel_presence",
    "public_presence",
]

# The sealing secret of the embedded run on one machine (ACCESSLINE_PRESENCE_SECRET):
# a deployment sets its own, refused in production.
DEVELOPMENT_SECRET = "accessline-development-presence-secret-not-for-production"  # noqa: S105


class Sealing:
    """Personal data in Presence's records, sealed with ACCESSLINE_PRESENCE_SECRET:
    agents' channel addresses and offers' previews. Routing, which writes offers and
    connects calls to agents' addresses, is given the same secret."""

    def __init__(self, secret: bytes) -> None:
        self._sealer = Sealer(secret, b"accessline presence records v1")

    def stored_agent(self, agent: presence_pb2.Agent) -> pr_store.StoredAgent:
        shown = presence_pb2.Agent()
        shown.CopyFrom(agent)
        addresses = pr_store.AgentAddresses()
        for config in shown.channels:
            addresses.addresses[config.channel] = config.address
            config.address = ""
        sealed = self._sealer.seal(addresses.SerializeToString(), agent.agent_id)
        return pr_store.StoredAgent(agent=shown, sealed_addresses=sealed)

    def agent(self, stored: pr_store.StoredAgent) -> presence_pb2.Agent:
        """The agent with its addresses."""
        found = presence_pb2.Agent()
        found.CopyFrom(stored.agent)
        if stored.sealed_addresses:
            addresses = pr_store.AgentAddresses.FromString(
                self._sealer.unseal(stored.sealed_addresses, found.agent_id)
            )
            for config in found.channels:
                config.address = addresses.addresses.get(config.channel, "")
        return found

    def seal_summary(self, offer: pr_store.StoredOffer) -> None:
        """Moves the preview's personal part out of the offer into its sealed copy."""
        summary = offer.offer.summary
        offer.sealed_summary = self._sealer.seal(summary.SerializeToString(), offer.offer.offer_id)
        summary.customer_display_name = ""
        summary.ClearField("location")

    def seal_context(self, offer: pr_store.StoredOffer, context: C.ContextData) -> None:
        offer.sealed_context = self._sealer.seal(
            context.SerializeToString(), "context:" + offer.offer.offer_id
        )

    def context(self, offer: pr_store.StoredOffer) -> C.ContextData | None:
        """The interaction's whole context (None when the offer carries none)."""
        return self._context(offer.sealed_context, offer.offer.offer_id)

    def ongoing(self, interaction: pr_store.StoredInteraction) -> presence_pb2.OngoingInteraction:
        """An interaction the agent is on, with its whole context, as the app is shown it."""
        shown = presence_pb2.OngoingInteraction(
            interaction_id=interaction.interaction_id,
            channel=interaction.channel,
            offer_id=interaction.offer_id,
            accepted_at=interaction.accepted_at,
        )
        context = self._context(interaction.sealed_context, interaction.offer_id)
        if context is not None:
            shown.context.CopyFrom(context)
        return shown

    def _context(self, sealed: bytes, offer_id: str) -> C.ContextData | None:
        if not sealed:
            return None
        return C.ContextData.FromString(self._sealer.unseal(sealed, "context:" + offer_id))

    def shown_offer(self, offer: pr_store.StoredOffer) -> presence_pb2.Offer:
        """The offer as the agent's app is shown it, preview whole."""
        shown = presence_pb2.Offer()
        shown.CopyFrom(offer.offer)
        if offer.sealed_summary:
            shown.summary.CopyFrom(
                presence_pb2.ContextSummary.FromString(
                    self._sealer.unseal(offer.sealed_summary, shown.offer_id)
                )
            )
        return shown


def channel_presence(channel: pr_store.StoredChannel, dnd: bool) -> int:
    """The state of one channel of an agent: unavailable when toggled off or on
    do-not-disturb, busy at capacity, available otherwise."""
    if dnd or not channel.available:
        return C.CHANNEL_PRESENCE_UNAVAILABLE
    if channel.active_interactions >= max(1, channel.capacity):
        return C.CHANNEL_PRESENCE_BUSY
    return C.CHANNEL_PRESENCE_AVAILABLE


def public_presence(
    agent: presence_pb2.Agent, stored: pr_store.StoredPresence | None
) -> presence_pb2.AgentPresence:
    """What routing and supervisors see of an agent; `stored` None means offline."""
    out = presence_pb2.AgentPresence(agent_id=agent.agent_id, resource_groups=agent.resource_groups)
    if stored is None:
        out.overall = C.OVERALL_PRESENCE_OFFLINE
        for config in agent.channels:
            out.channels.append(
                presence_pb2.ChannelState(
                    channel=config.channel,
                    presence=C.CHANNEL_PRESENCE_UNAVAILABLE,
                    capacity=config.capacity or 1,
                )
            )
        return out
    ready = 0
    for channel in stored.channels:
        state = channel_presence(channel, stored.do_not_disturb)
        ready += state in (C.CHANNEL_PRESENCE_AVAILABLE, C.CHANNEL_PRESENCE_BUSY)
        out.channels.append(
            presence_pb2.ChannelState(
                channel=channel.channel,
                presence=state,  # type: ignore[arg-type]
                active_interactions=channel.active_interactions,
                capacity=channel.capacity,
            )
        )
    if stored.do_not_disturb:
        out.overall = C.OVERALL_PRESENCE_DO_NOT_DISTURB
    elif stored.channels and ready == len(stored.channels):
        out.overall = C.OVERALL_PRESENCE_READY
    elif ready:
        out.overall = C.OVERALL_PRESENCE_PARTIALLY_READY
    else:
        out.overall = C.OVERALL_PRESENCE_NOT_READY
    out.do_not_disturb = stored.do_not_disturb
    out.not_ready_reason = stored.not_ready_reason
    out.updated_at.CopyFrom(stored.updated_at)
    if stored.HasField("idle_since"):
        out.idle_since.CopyFrom(stored.idle_since)
    return out
