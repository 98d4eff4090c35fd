"""Presence: Agent sessions over a bidirectional stream, per-channel presence, offers
delivered to agent apps."""
