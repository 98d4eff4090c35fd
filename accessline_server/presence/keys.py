"""Presence's key layout in etcd, private to this service: other services reach its
state through the published modules, `roster.py` (agents and their presence, read) and
`offers.py` (offers and interactions, written in their own transactions).

    pr/agents/{agent_id}              StoredAgent     (addresses sealed)
    pr/presence/{agent_id}            StoredPresence  (the agent session's lease)
    pr/offers/{agent_id}/{offer_id}   StoredOffer     (a lease ending at the deadline)
    pr/interactions/{agent_id}/{id}   StoredInteraction (the longest interaction allowed)
    pr/resume/{agent_id}              StoredPresence  (an ended session, 120 s, to resume)

An interaction's value is written once, by the accept; after it only its lease changes
(`offers.interaction_connected`) until it is deleted: a session ends one it wrote with a
compare on its create revision, without reading it back.
"""

from __future__ import annotations

ROOT = "pr/"
AGENTS = "pr/agents/"
PRESENCE = "pr/presence/"
OFFERS = "pr/offers/"
INTERACTIONS = "pr/interactions/"
RESUME = "pr/resume/"


def agent(agent_id: str) -> str:
    return AGENTS + agent_id


def presence(agent_id: str) -> str:
    return PRESENCE + agent_id


def offers(agent_id: str) -> str:
    return f"{OFFERS}{agent_id}/"


def offer(agent_id: str, offer_id: str) -> str:
    return f"{OFFERS}{agent_id}/{offer_id}"


def interactions(agent_id: str) -> str:
    return f"{INTERACTIONS}{agent_id}/"


def interaction(agent_id: str, interaction_id: str) -> str:
    return f"{INTERACTIONS}{agent_id}/{interaction_id}"


def resume(agent_id: str) -> str:
    return RESUME + agent_id
