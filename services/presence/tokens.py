"""Agent app tokens: an HMAC of the agent id under the deployment's Presence secret,
compared in constant time. An identity provider can replace this; the stream only needs
"is this token good for this agent"."""

from __future__ import annotations

import base64
import hashlib
import hmac


def agent_token(secret: bytes, agent_id: str) -> str:
    digest = hmac.new(secret, f"accessline agent v1:{agent_id}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def token_valid(secret: bytes, agent_id: str, token: str) -> bool:
    return hmac.compare_digest(agent_token(secret, agent_id).encode(), token.encode())
