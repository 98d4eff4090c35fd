"""Routing's key layout in etcd.

    rt/claims/{agent_id}/{channel}/{slot}   AgentClaim   (the claim's lease)

An agent's channel has as many slots as its capacity; claiming one is a create-if-absent,
so two Routing replicas never offer one agent more calls than the channel holds.
"""

from __future__ import annotations

CLAIMS = "rt/claims/"


def claim(agent_id: str, channel: int, slot: int) -> str:
    return f"{CLAIMS}{agent_id}/{channel}/{slot}"
