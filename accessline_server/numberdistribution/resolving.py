"""Resolution of a dialled number: which pool and group it belongs to, the live
reservations on it, and for each whether the digits the caller keyed in are its code,
a spent code of an ended reservation, or neither. One consistent read, no writes."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline_server.numberdistribution.codes import CodeBook
from accessline_server.numberdistribution.dialled import DialledReader
from accessline_server.numberdistribution.pools import READY_TIMEOUT
from accessline_server.numberdistribution.view import NumberView
from accessline_server.runtime.errors import FieldViolation, InvalidArgument
from accessline_server.runtime.phone import NumberFormatError, normalize_number
from accessline_server.runtime.store import Store


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
        self._reader = DialledReader(codes)
        self._clock = clock

    async def resolve(self, dialled: str, region: str, dtmf: str) -> Resolution:
        await self._view.ready(READY_TIMEOUT)
        try:
            value = normalize_number(dialled, region)
        except NumberFormatError as exc:
            raise InvalidArgument([FieldViolation("dialled_number", str(exc))]) from None
        reader = self._reader
        result = await self._store.txn([], reader.reads(value, dtmf))
        found = reader.dialled(value, dtmf, result.gets, self._clock())
        state = self._view.pools.get(found.pool_id)
        return Resolution(
            access_number=value,
            pool_id=found.pool_id,
            resource_group=state.pool.resource_group if state is not None else "",
            reservations=found.reservations,
            quarantined=found.quarantined,
            expired_reservations=found.expired,
        )
