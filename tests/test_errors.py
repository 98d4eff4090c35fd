"""Domain errors reach callers as gRPC statuses with rich details; anything unexpected
becomes INTERNAL without internals. Proven through a real in-process server."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2_grpc as nd_grpc
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from accessline_server.runtime.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from accessline_server.runtime.server import (
    Registration,
    RuntimeContext,
    ServiceRuntime,
    ServiceSpec,
)
from accessline_server.runtime.settings import ServiceSettings, SettingsError, load_settings
from tests.conftest import connect, error_details, identity


class Raising(nd_grpc.NumberDistributionServiceServicer):
    """Raises whatever the test put in the request's pool id."""

    async def GetPool(self, request: nd_pb2.GetPoolRequest, context: Any) -> nd_pb2.GetPoolResponse:
        if request.pool_id == "missing":
            raise NotFound(
                "pool missing does not exist",
                reason="POOL_NOT_FOUND",
                metadata={"pool_id": "missing"},
            )
        if request.pool_id == "full":
            raise ResourceExhausted("no free number", reason="POOL_EXHAUSTED", retry_after=7.5)
        if request.pool_id == "bug":
            raise KeyError("secret-internal-detail")
        return nd_pb2.GetPoolResponse(pool=nd_pb2.Pool(pool_id=request.pool_id))

    async def AddNumbers(
        self, request: nd_pb2.AddNumbersRequest, context: Any
    ) -> nd_pb2.AddNumbersResponse:
        raise InvalidArgument(
            [
                FieldViolation(f"numbers[{i}]", f"not a number: {n}")
                for i, n in enumerate(request.numbers)
            ]
        )


@pytest.fixture(scope="module")
async def stub(etcd: EmbeddedEtcd) -> AsyncIterator[Any]:
    async def build(context: RuntimeContext) -> Sequence[Registration]:
        return [
            Registration(
                Raising(),
                nd_grpc.add_NumberDistributionServiceServicer_to_server,
                nd_pb2.DESCRIPTOR.services_by_name["NumberDistributionService"],
            )
        ]

    settings = ServiceSettings(
        port=0,
        etcd_endpoints=etcd.endpoint,
        etcd_prefix="/errors",
        shutdown_grace_seconds=1,
        **identity().settings("probe"),  # type: ignore[arg-type]
    )
    runtime = ServiceRuntime(ServiceSpec("errors-test", build), settings)
    port = await runtime.start()
    async with connect(f"127.0.0.1:{port}") as channel:
        yield nd_grpc.NumberDistributionServiceStub(channel)
    await runtime.stop()


async def test_not_found_carries_reason_and_metadata(stub: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetPool(nd_pb2.GetPoolRequest(pool_id="missing"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    info = error_details(caught.value)["ErrorInfo"]
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "POOL_NOT_FOUND",
        "accessline",
        {"pool_id": "missing"},
    )


async def test_resource_exhausted_carries_retry_info(stub: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetPool(nd_pb2.GetPoolRequest(pool_id="full"))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_details(caught.value)["RetryInfo"].retry_delay.ToMilliseconds() == 7500


async def test_an_unexpected_error_is_internal_and_reveals_nothing(stub: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetPool(nd_pb2.GetPoolRequest(pool_id="bug"))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "secret-internal-detail" not in (caught.value.details() or "")
    assert "Traceback" not in (caught.value.details() or "")


async def test_the_server_still_answers_after_errors(stub: Any) -> None:
    reply = await stub.GetPool(nd_pb2.GetPoolRequest(pool_id="lyon"))
    assert reply.pool.pool_id == "lyon"


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(numbers=st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=20))
async def test_field_violations_reach_the_caller_exactly(stub: Any, numbers: list[str]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.AddNumbers(nd_pb2.AddNumbersRequest(pool_id="p", numbers=numbers))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = error_details(caught.value)["BadRequest"]
    assert [(v.field, v.description) for v in bad.field_violations] == [
        (f"numbers[{i}]", f"not a number: {n}") for i, n in enumerate(numbers)
    ]


@given(
    endpoint=st.text(
        alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=40
    )
)
@example(endpoint="0:1")  # a valid endpoint: loading must not stop at other settings
def test_any_etcd_endpoint_value_loads_or_is_refused_naming_the_variable(endpoint: str) -> None:
    # The endpoint alone is under test: what production requires besides is not asked.
    given_env = {
        "ACCESSLINE_ETCD_ENDPOINTS": endpoint,
        "ACCESSLINE_INSECURE": "true",
        "ACCESSLINE_ENVIRONMENT": "development",
    }
    old = {name: os.environ.get(name) for name in given_env}
    os.environ.update(given_env)
    refusal = ""
    loaded: ServiceSettings | None = None
    try:
        loaded = load_settings(ServiceSettings)
    except SettingsError as exc:
        refusal = str(exc)
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value
    if loaded is None:
        assert "ACCESSLINE_ETCD_ENDPOINTS" in refusal
    else:
        assert loaded.etcd_endpoint_list == [e.strip() for e in endpoint.split(",")]
        for member in loaded.etcd_endpoint_list:
            host, port = member.rsplit(":", 1)
            assert host
            assert 1 <= int(port) <= 65535
