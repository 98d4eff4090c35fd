"""Access codes: random DTMF digits from `secrets`, stored only as a keyed hash bound to
the number, compared in constant time; and sealing of a code (AES-GCM) so a retried
request with the same idempotency key can be answered with the code it was given."""

from __future__ import annotations

import hashlib
import secrets

from accessline_server.numberdistribution.dialled import CodeHasher
from accessline_server.runtime.sealing import Sealer

DEFAULT_CODE_LENGTH = 6
MIN_CODE_LENGTH = 4
MAX_CODE_LENGTH = 12


class CodeBook(CodeHasher):
    """Issues, hashes, checks and seals access codes with keys derived from one secret
    (every replica must share the secret; CallMatching derives the hashing key alone)."""

    def __init__(self, secret: bytes) -> None:
        super().__init__(secret)
        self._sealer = Sealer(secret, b"accessline access-code seal v1")

    @staticmethod
    def new_code(length: int) -> str:
        return "".join(str(secrets.randbelow(10)) for _ in range(length))

    def seal(self, code: str, context: str) -> bytes:
        return self._sealer.seal(code.encode(), context)

    def unseal(self, sealed: bytes, context: str) -> str:
        return self._sealer.unseal(sealed, context).decode()


def idempotency_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
