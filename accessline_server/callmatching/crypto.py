"""The secrets of a handoff: the context is sealed with AES-GCM (the session id as
associated data, so a sealed context cannot be moved to another session) and callers'
numbers are kept only as keyed hashes."""

from __future__ import annotations

import hashlib
import hmac

from accessline_server.runtime.sealing import SealBroken, Sealer, derive_key

__all__ = ["SealBroken", "SessionCrypto"]


class SessionCrypto:
    def __init__(self, secret: bytes) -> None:
        self._sealer = Sealer(secret, b"accessline context seal v1")
        self._ani_key = derive_key(secret, b"accessline ani hash v1")

    def seal(self, data: bytes, session_id: str) -> bytes:
        return self._sealer.seal(data, session_id)

    def unseal(self, sealed: bytes, session_id: str) -> bytes:
        return self._sealer.unseal(sealed, session_id)

    def ani_hash(self, ani: str) -> bytes:
        return hmac.new(self._ani_key, ani.encode(), hashlib.sha256).digest()

    @staticmethod
    def same(a: bytes, b: bytes) -> bool:
        return hmac.compare_digest(a, b)
