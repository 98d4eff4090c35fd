"""Access codes: random DTMF digits from `secrets`, stored only as a keyed hash bound to
the number, compared in constant time; and sealing of a code (AES-GCM) so a retried
request with the same idempotency key can be answered with the code it was given."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from accessline_server.runtime.sealing import Sealer, derive_key

DEFAULT_CODE_LENGTH = 6
MIN_CODE_LENGTH = 4
MAX_CODE_LENGTH = 12


class CodeBook:
    """Issues, hashes, checks and seals access codes with keys derived from one secret
    (every replica must share the secret)."""

    def __init__(self, secret: bytes) -> None:
        self._hash_key = derive_key(secret, b"accessline access-code hash v1")
        self._sealer = Sealer(secret, b"accessline access-code seal v1")

    @staticmethod
    def new_code(length: int) -> str:
        return "".join(str(secrets.randbelow(10)) for _ in range(length))

    def hash(self, number: str, code: str) -> bytes:
        return hmac.new(self._hash_key, f"{number}|{code}".encode(), hashlib.sha256).digest()

    def matches(self, number: str, digits: str, code_hash: bytes) -> bool:
        """Constant-time comparison of the caller's digits with a stored code hash."""
        return hmac.compare_digest(self.hash(number, digits), code_hash)

    def seal(self, code: str, context: str) -> bytes:
        return self._sealer.seal(code.encode(), context)

    def unseal(self, sealed: bytes, context: str) -> str:
        return self._sealer.unseal(sealed, context).decode()


def clean_digits(dtmf: str) -> str:
    """DTMF as switches report it, without the terminating '#'."""
    return dtmf.strip().rstrip("#")


def idempotency_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
