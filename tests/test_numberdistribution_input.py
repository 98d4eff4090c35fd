"""NumberDistribution's answers to bad input, on the session's service process: every
bad field of a pool, a batch of numbers or a reservation request named, and any
dialled number resolved or refused as invalid (property-tested)."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accessline.common.v1 import common_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from tests.conftest import (
    violated_fields,
)
from tests.support.numbers import (
    fresh_numbers,
    make_pool,
    seconds,
)


async def test_a_bad_pool_is_refused_naming_every_bad_field(nd_stub: Any) -> None:
    pool = nd_pb2.Pool(
        pool_id="not a valid id!",
        city=common_pb2.City(name="Nowhereville-sur-Rien"),
        mode=nd_pb2.POOL_MODE_SHARED,
        max_shares_per_number=1,
        quarantine=seconds(-1),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await nd_stub.CreatePool(nd_pb2.CreatePoolRequest(pool=pool))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) >= {
        "pool.pool_id",
        "pool.max_shares_per_number",
        "pool.quarantine",
    }

    shared = nd_pb2.Pool(pool_id=f"p-{uuid.uuid4().hex[:8]}", mode=nd_pb2.POOL_MODE_SHARED)
    shared.city.name = "Nowhereville-sur-Rien"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await nd_stub.CreatePool(nd_pb2.CreatePoolRequest(pool=shared))
    assert violated_fields(caught.value) == {"pool.access_code_policy.mode", "pool.city.location"}
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await nd_stub.GetPool(nd_pb2.GetPoolRequest(pool_id=shared.pool_id))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    junk=st.text(min_size=1, max_size=30).filter(lambda s: not any(c.isdigit() for c in s)),
    at=st.integers(0, 3),
)
async def test_a_malformed_number_refuses_the_whole_batch(
    nd_stub: Any, subject: str, junk: str, at: int
) -> None:
    pool_id = f"p-{uuid.uuid4().hex[:10]}"
    await nd_stub.CreatePool(
        nd_pb2.CreatePoolRequest(pool=nd_pb2.Pool(pool_id=pool_id, subjects=[subject]))
    )
    batch = fresh_numbers(3)
    batch.insert(at, junk)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await nd_stub.AddNumbers(nd_pb2.AddNumbersRequest(pool_id=pool_id, numbers=batch))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == {f"numbers[{at}]"}
    stats = (await nd_stub.GetPoolStats(nd_pb2.GetPoolStatsRequest(pool_id=pool_id))).stats
    assert stats.total == 0


async def test_bad_reservation_requests_name_their_fields(nd_stub: Any, subject: str) -> None:
    await make_pool(nd_stub, subject, 1)
    request = nd_pb2.ReserveNumberRequest(
        subject=subject,
        device_location=common_pb2.GeoPoint(latitude=91, longitude=-181),
        ttl=seconds(0),
        session_id="has spaces",
        idempotency_key="k" * 129,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await nd_stub.ReserveNumber(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == {
        "device_location.latitude",
        "device_location.longitude",
        "ttl",
        "session_id",
        "idempotency_key",
    }
    with pytest.raises(grpc.aio.AioRpcError) as nowhere:
        await nd_stub.ReserveNumber(nd_pb2.ReserveNumberRequest(subject=f"{subject}-nobody-serves"))
    assert nowhere.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await nd_stub.ReleaseNumber(nd_pb2.ReleaseNumberRequest(reservation_id="r-unknown"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(dialled=st.text(max_size=60), digits=st.text(alphabet="0123456789*#x", max_size=40))
async def test_any_dialled_number_resolves_or_is_refused_as_invalid(
    nd_stub: Any, dialled: str, digits: str
) -> None:
    try:
        reply = await nd_stub.ResolveNumber(
            nd_pb2.ResolveNumberRequest(dialled_number=dialled, dtmf_digits=digits)
        )
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violated_fields(exc) <= {"dialled_number", "dtmf_digits"}
    else:
        assert reply.access_number
        assert "x" not in digits
        assert len(digits) <= 32
