"""The NumberDistribution tests' service process (one per session, on `PREFIX`) and the
helpers that make pools and reservations through its contract."""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import duration_pb2

from accessline.common.v1 import common_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline_server.numberdistribution.reserving import ReserveRequest
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from tests.conftest import (
    ServiceProcess,
    spawn_service,
    wait_serving,
)

PREFIX = "/nd-functional"


_serial = itertools.count(1)


LYON = common_pb2.GeoPoint(latitude=45.7640, longitude=4.8357)


PARIS = common_pb2.GeoPoint(latitude=48.8566, longitude=2.3522)


DIJON = common_pb2.GeoPoint(latitude=47.3220, longitude=5.0415)  # 175 km from Lyon, 263 from Paris


def fresh_numbers(count: int) -> list[str]:
    """Numbers no other test of the module uses (a number belongs to one pool)."""
    return [f"+3347{next(_serial):07d}" for _ in range(count)]


def seconds(value: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(value * 1e9))
    return d


async def make_pool(
    stub: Any, subject: str, count: int, **fields: Any
) -> tuple[nd_pb2.Pool, list[str]]:
    pool = nd_pb2.Pool(pool_id=f"p-{uuid.uuid4().hex[:10]}", subjects=[subject], **fields)
    created = (await stub.CreatePool(nd_pb2.CreatePoolRequest(pool=pool))).pool
    numbers = fresh_numbers(count)
    if numbers:
        await stub.AddNumbers(nd_pb2.AddNumbersRequest(pool_id=created.pool_id, numbers=numbers))
    return created, numbers


async def reserve(stub: Any, subject: str, **fields: Any) -> nd_pb2.ReserveNumberResponse:
    return await stub.ReserveNumber(nd_pb2.ReserveNumberRequest(subject=subject, **fields))


@contextlib.asynccontextmanager
async def running_numberdistribution(etcd: EmbeddedEtcd) -> AsyncIterator[ServiceProcess]:
    process = spawn_service("accessline_server.numberdistribution", etcd.endpoint, PREFIX)
    try:
        await wait_serving(process)
        yield process
    finally:
        process.stop()


def request(session: str) -> ReserveRequest:
    """A reservation request for any pool, as the in-process domain tests make it."""
    return ReserveRequest(
        min_quarantine=0.0,
        location=None,
        subject="",
        segment="",
        resource_group="",
        ttl=30.0,
        want_access_code=False,
        session_id=session,
        idempotency_key="",
    )
