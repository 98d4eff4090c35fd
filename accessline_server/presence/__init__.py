"""Presence: Agent sessions over a bidirectional stream, per-channel presence, offers
delivered to agent apps.

Published modules (the only ones another service may import):
offers: writing and withdrawing offers, settling interactions (Routing); the interaction
an agent is on (Notification, for links to its customer);
roster: reading agents and their presence (Routing)."""

PUBLISHED: tuple[str, ...] = ("offers", "roster")
