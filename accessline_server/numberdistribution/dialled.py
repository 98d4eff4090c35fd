"""NumberDistribution's published module for reading what a dialled number holds inside
another service's own etcd read: CallMatching reads the number's pool, its live
reservations (each with whether the caller's digits are its code), its quarantine and
whether the digits are a spent code in the same round trip as its own keys, instead of
asking NumberDistribution over gRPC — one hop and one etcd call fewer on every call.
ResolveNumber answers from the same reads.

Checking digits needs the key access codes are hashed with: `CodeHasher` derives it from
ACCESSLINE_NUMBERS_SECRET (`NumbersSecretSettings`), which is then the same in both
services. Only the hashing key is derived there; the key that seals codes for idempotent
retries stays NumberDistribution's. NumberDistribution publishes a check of its hashing
key at start (`nd/code-key`), read with every dialled number: a reader whose secret
differs refuses to check digits (FAILED_PRECONDITION, CODE_SECRET_MISMATCH) rather than
count every right code as a wrong one.

Storage messages are those of `accessline.numberdistribution.storage.v1`; what a reader
gets is the contract's `ResolvedReservation` (never a code or a lease)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf import wrappers_pb2
from pydantic import Field, SecretStr

from accessline.common.v1 import common_pb2
from accessline.numberdistribution.storage.v1 import storage_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline_server.numberdistribution import keys
from accessline_server.runtime.backoff import Backoff
from accessline_server.runtime.clock import seconds
from accessline_server.runtime.errors import AccesslineError, FailedPrecondition
from accessline_server.runtime.kv import RawKV, decode
from accessline_server.runtime.sealing import derive_key
from accessline_server.runtime.settings import ServiceSettings
from accessline_server.runtime.store import Op, Store

log = logging.getLogger("accessline.numberdistribution")

# Only for the embedded run on one machine: a deployment sets its own secret.
DEVELOPMENT_SECRET = "accessline-development-secret-do-not-use-in-production"  # noqa: S105


class NumbersSecretSettings(ServiceSettings):
    """The secret access codes are hashed (and, in NumberDistribution, sealed) with: read
    by NumberDistribution, which issues codes, and by CallMatching, which checks them."""

    numbers_secret: SecretStr = Field(
        default=SecretStr(DEVELOPMENT_SECRET),
        min_length=32,
        description="Secret from which access-code hashing and sealing keys are derived;"
        " the same on every replica of NumberDistribution and of CallMatching (which checks"
        " the codes callers key in).",
    )


class CodeHasher:
    """Keyed hashes of access codes, bound to their number; compared in constant time."""

    def __init__(self, secret: bytes) -> None:
        self._key = derive_key(secret, b"accessline access-code hash v1")

    def hash(self, number: str, code: str) -> bytes:
        return hmac.new(self._key, f"{number}|{code}".encode(), hashlib.sha256).digest()

    def matches(self, number: str, digits: str, code_hash: bytes) -> bool:
        """Constant-time comparison of the caller's digits with a stored code hash."""
        return hmac.compare_digest(self.hash(number, digits), code_hash)

    def key_check(self) -> bytes:
        """A value that tells whether two hashers share their key (and nothing of it)."""
        return self.hash("", "accessline code key check")

    async def publish_key_check(self, store: Store) -> None:
        """NumberDistribution, from its start: the check readers of dialled numbers
        compare, put again until etcd takes it (a replica may start before etcd answers)."""
        backoff = Backoff(0.5, 10.0)
        check = wrappers_pb2.BytesValue(value=self.key_check())
        while True:
            try:
                await store.put(keys.CODE_KEY, check)
                return
            except AccesslineError as exc:
                log.warning("access codes' key check not published yet: %s", exc)
                await asyncio.sleep(backoff.next())


def clean_digits(dtmf: str) -> str:
    """DTMF as switches report it, without the terminating '#'."""
    return dtmf.strip().rstrip("#")


def public_reservation(record: storage_pb2.StoredReservation) -> common_pb2.Reservation:
    """What the contract shows of a stored reservation (never its code or lease)."""
    return common_pb2.Reservation(
        reservation_id=record.reservation_id,
        access_number=record.number,
        pool_id=record.pool_id,
        session_id=record.session_id,
        expires_at=record.expires_at,
        shared=record.shared,
        has_access_code=bool(record.code_hash),
    )


@dataclass(frozen=True)
class Dialled:
    """What a dialled number holds: its pool (empty when it is no access number), its live
    reservations with the caller's digits checked, the reservations whose time is over,
    and whether it rests in quarantine."""

    number: str
    pool_id: str
    reservations: list[nd_pb2.ResolvedReservation]
    expired: int
    quarantined: bool


class DialledReader:
    """The reads of a dialled number, for a transaction of the caller, and what their
    rows say. `number` is normalised (E.164 or a SIP URI), as the reservations store it."""

    def __init__(self, hasher: CodeHasher) -> None:
        self._hasher = hasher

    def reads(self, number: str, dtmf: str) -> list[Op]:
        """The gets, in order, whose rows `dialled` takes (4, or 5 with digits)."""
        ops = [
            Op.get(keys.CODE_KEY),
            Op.get(keys.number(number)),
            Op.get_prefix(keys.slots(number)),
            Op.get(keys.quarantine_key(number)),
        ]
        digits = clean_digits(dtmf)
        if digits:
            # Whether the digits are the code of an ended reservation of this number.
            ops.append(Op.get(keys.spent(number, self._hasher.hash(number, digits))))
        return ops

    def dialled(self, number: str, dtmf: str, rows: Sequence[list[RawKV]], now: float) -> Dialled:
        """What the rows of `reads(number, dtmf)` say, at `now`; digits are checked only
        where the key check agrees (FailedPrecondition otherwise)."""
        digits = clean_digits(dtmf)
        check_rows, number_rows, slot_rows, quarantine_rows = rows[:4]
        if digits and check_rows:
            published = decode(wrappers_pb2.BytesValue, keys.CODE_KEY, check_rows[0].value)
            if not hmac.compare_digest(published.value, self._hasher.key_check()):
                raise FailedPrecondition(
                    "ACCESSLINE_NUMBERS_SECRET here differs from NumberDistribution's:"
                    " access codes cannot be checked",
                    reason="CODE_SECRET_MISMATCH",
                )
        spent = bool(digits) and bool(rows[4])
        pool_id = (
            decode(storage_pb2.StoredNumber, number, number_rows[0].value).pool_id
            if number_rows
            else ""
        )
        resolved: list[nd_pb2.ResolvedReservation] = []
        expired = 0
        for key, raw, _ in slot_rows:
            record = decode(storage_pb2.StoredReservation, key, raw)
            if seconds(record.expires_at) <= now:
                expired += 1
                continue
            if not record.code_hash:
                check = nd_pb2.CODE_CHECK_NO_CODE
            elif not digits:
                check = nd_pb2.CODE_CHECK_MISSING
            elif self._hasher.matches(number, digits, record.code_hash):
                check = nd_pb2.CODE_CHECK_MATCH
            elif spent:
                check = nd_pb2.CODE_CHECK_SPENT
            else:
                check = nd_pb2.CODE_CHECK_MISMATCH
            resolved.append(
                nd_pb2.ResolvedReservation(
                    reservation=public_reservation(record),
                    code_check=check,
                    failed_code_attempts=record.failed_code_attempts,
                )
            )
        return Dialled(
            number=number,
            pool_id=pool_id,
            reservations=resolved,
            expired=expired,
            quarantined=bool(quarantine_rows) or expired > 0,
        )


def pool_read(pool_id: str) -> Op:
    """The get of a pool, whose rows `resource_group` takes."""
    return Op.get(keys.pool(pool_id))


def resource_group(pool_id: str, rows: list[RawKV]) -> str:
    """The resource group calls to the pool's numbers are routed to ("" when none)."""
    return decode(nd_pb2.Pool, pool_id, rows[0].value).resource_group if rows else ""
