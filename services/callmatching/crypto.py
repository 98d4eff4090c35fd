"""The secrets of a handoff: the context is sealed with AES-GCM (the session id as
associated data, so a sealed context cannot be moved to another session) and callers'
numbers are kept only as keyed hashes."""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.runtime.errors import AccesslineError


class SealBroken(AccesslineError):
    """A sealed value does not open with this deployment's secret."""

    default_reason = "SEAL_BROKEN"


def _derive(secret: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(secret)


class SessionCrypto:
    def __init__(self, secret: bytes) -> None:
        self._aead = AESGCM(_derive(secret, b"accessline context seal v1"))
        self._ani_key = _derive(secret, b"accessline ani hash v1")

    def seal(self, data: bytes, session_id: str) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, data, session_id.encode())

    def unseal(self, sealed: bytes, session_id: str) -> bytes:
        try:
            return self._aead.decrypt(sealed[:12], sealed[12:], session_id.encode())
        except InvalidTag:
            raise SealBroken("a stored session does not open with this secret") from None

    def ani_hash(self, ani: str) -> bytes:
        return hmac.new(self._ani_key, ani.encode(), hashlib.sha256).digest()

    @staticmethod
    def same(a: bytes, b: bytes) -> bool:
        return hmac.compare_digest(a, b)
