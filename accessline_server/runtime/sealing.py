"""Keys derived from a service's secret, and sealing (AES-GCM) of personal data kept in
etcd: a sealed value is bound to an id (associated data), so it cannot be moved to
another record, and it opens only with the deployment's secret."""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from accessline_server.runtime.errors import AccesslineError


class SealBroken(AccesslineError):
    """A sealed value does not open with this deployment's secret."""

    default_reason = "SEAL_BROKEN"


def derive_key(secret: bytes, purpose: bytes) -> bytes:
    """A 32-byte key for one purpose, derived from the service's secret (HKDF-SHA256)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(secret)


class Sealer:
    """Seals and opens values with a key derived from `secret` for `purpose`."""

    def __init__(self, secret: bytes, purpose: bytes) -> None:
        self._aead = AESGCM(derive_key(secret, purpose))
        self._names = derive_key(secret, purpose + b" key names")

    def keyed_name(self, kind: str, value: str) -> str:
        """A keyed hash (HMAC-SHA256, hex) of an id a key name needs: the id matches
        exactly and never appears in etcd."""
        return hmac.new(self._names, f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()

    def seal(self, data: bytes, bound_to: str) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, data, bound_to.encode())

    def unseal(self, sealed: bytes, bound_to: str) -> bytes:
        try:
            return self._aead.decrypt(sealed[:12], sealed[12:], bound_to.encode())
        except InvalidTag:
            raise SealBroken("a stored value does not open with this secret") from None
