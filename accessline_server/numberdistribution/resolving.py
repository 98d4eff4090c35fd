"""Resolution of a dialled number: which pool and group it belongs to, the live
reservations on it, and for each whether the digits the caller keyed in are its code,
a spent code of an ended reservation, or neither. One consistent read, no writes."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from accessline.common.v1 import common_pb2
from accessline.numberdistribution.storage.v1 import storage_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline_server.numberdistribution import keys
from accessline_server.numberdistribution.codes import CodeBook, clean_digits
from accessline_server.numberdistribution.pools import READY_TIMEOUT
from accessline_server.numberdistribution.view import NumberView
from accessline_server.runtime.clock import seconds
from accessline_server.runtime.errors import FieldViolation, InvalidArgument
from accessline_server.runtime.phone import NumberFormatError, normalize_number
from accessline_server.runtime.store import Op, Store, decode


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
class Resolution:
    access_number: str
    pool_id: str
    resource_group: str
    reservations: list[nd_pb2.ResolvedReservation]
    quarantined: bool
    expired_reservations: int


class Resolver:
    """Resolves dialled numbers against etcd, the view giving each pool's group."""

    def __init__(
        self,
        store: Store,
        view: NumberView,
        codes: CodeBook,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._view = view
        self._codes = codes
        self._clock = clock

    async def resolve(self, dialled: str, region: str, dtmf: str) -> Resolution:
        await self._view.ready(READY_TIMEOUT)
        try:
            value = normalize_number(dialled, region)
        except NumberFormatError as exc:
            raise InvalidArgument([FieldViolation("dialled_number", str(exc))]) from None
        digits = clean_digits(dtmf)
        reads = [
            Op.get(keys.number(value)),
            Op.get_prefix(keys.slots(value)),
            Op.get(keys.quarantine_key(value)),
        ]
        if digits:
            # Whether the digits are the code of an ended reservation of this number.
            reads.append(Op.get(keys.spent(value, self._codes.hash(value, digits))))
        result = await self._store.txn([], reads)
        number_rows, slot_rows, quarantine_rows = result.gets[:3]
        spent = bool(digits) and bool(result.gets[3])
        pool_id = (
            decode(storage_pb2.StoredNumber, value, number_rows[0][1]).pool_id
            if number_rows
            else ""
        )
        state = self._view.pools.get(pool_id)
        now = self._clock()
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
            elif self._codes.matches(value, digits, record.code_hash):
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
        return Resolution(
            access_number=value,
            pool_id=pool_id,
            resource_group=state.pool.resource_group if state is not None else "",
            reservations=resolved,
            quarantined=bool(quarantine_rows) or expired > 0,
            expired_reservations=expired,
        )
