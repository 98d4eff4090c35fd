"""Every service starts as its own process, reports health per service and serves
reflection."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from accessline.callmatching.v1 import call_matching_pb2
from accessline.journey.v1 import journey_pb2
from accessline.notification.v1 import notification_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2
from accessline.presence.v1 import presence_pb2
from accessline.routing.v1 import routing_pb2
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from tests.conftest import ServiceProcess, connect, health_status, spawn_service, wait_serving

SERVICES = {
    "numberdistribution": number_distribution_pb2.DESCRIPTOR.services_by_name[
        "NumberDistributionService"
    ],
    "callmatching": call_matching_pb2.DESCRIPTOR.services_by_name["CallMatchingService"],
    "routing": routing_pb2.DESCRIPTOR.services_by_name["RoutingService"],
    "presence": presence_pb2.DESCRIPTOR.services_by_name["PresenceService"],
    "notification": notification_pb2.DESCRIPTOR.services_by_name["NotificationService"],
}


@pytest.fixture(scope="module")
async def running(etcd: EmbeddedEtcd) -> AsyncIterator[dict[str, ServiceProcess]]:
    started = {
        name: spawn_service(f"accessline_server.{name}", etcd.endpoint, "/services-up")
        for name in SERVICES
    }
    try:
        for service in started.values():
            await wait_serving(service)
        yield started
    finally:
        for service in started.values():
            service.stop()


@pytest.mark.parametrize("name", list(SERVICES))
async def test_health_is_serving_for_the_server_and_for_the_service(
    running: dict[str, ServiceProcess], name: str
) -> None:
    address = running[name].address
    assert await health_status(address) == health_pb2.HealthCheckResponse.SERVING
    assert (
        await health_status(address, SERVICES[name].full_name)
        == health_pb2.HealthCheckResponse.SERVING
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health_status(address, "accessline.unknown.v1.NoSuchService")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("name", list(SERVICES))
async def test_health_lists_every_name_it_answers_for(
    running: dict[str, ServiceProcess], name: str
) -> None:
    async with connect(running[name].address, "") as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthListRequest()  # type: ignore[attr-defined]
        listed = await stub.List(request, timeout=5)
    statuses = {key: value.status for key, value in listed.statuses.items()}
    serving = health_pb2.HealthCheckResponse.SERVING
    assert statuses[""] == serving
    assert statuses[SERVICES[name].full_name] == serving
    assert statuses["liveness"] == serving


async def reflect(address: str, request: reflection_pb2.ServerReflectionRequest) -> Any:
    async with connect(address) as channel:
        stub: Any = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(iter([request]))
        async for reply in call:
            return reply
    raise AssertionError("no reflection reply")


@pytest.mark.parametrize("name", list(SERVICES))
async def test_reflection_lists_the_service_and_describes_every_method(
    running: dict[str, ServiceProcess], name: str
) -> None:
    address = running[name].address
    listed = await reflect(address, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert SERVICES[name].full_name in names
    assert "grpc.health.v1.Health" in names

    described = await reflect(
        address,
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICES[name].full_name),
    )
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    methods = {
        m.name for f in files for s in f.service if s.name == SERVICES[name].name for m in s.method
    }
    assert methods == {m.name for m in SERVICES[name].methods}


async def test_callmatching_serves_the_journey_too(running: dict[str, ServiceProcess]) -> None:
    """JourneyService is served by CallMatching: listed by reflection, in health."""
    address = running["callmatching"].address
    journey = journey_pb2.DESCRIPTOR.services_by_name["JourneyService"].full_name
    listed = await reflect(address, reflection_pb2.ServerReflectionRequest(list_services=""))
    assert journey in {s.name for s in listed.list_services_response.service}
    serving = health_pb2.HealthCheckResponse.SERVING
    assert await health_status(address, journey) == serving


async def reflect_v1(address: str, request: reflection_pb2.ServerReflectionRequest) -> Any:
    """A reflection v1 call (its messages are v1alpha's, field for field)."""
    async with connect(address) as channel:
        call = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )(iter([request]))
        async for reply in call:
            return reply
    raise AssertionError("no reflection reply")


async def test_reflection_answers_v1_as_well_as_v1alpha(
    running: dict[str, ServiceProcess],
) -> None:
    address = running["numberdistribution"].address
    listed = await reflect_v1(address, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert {
        SERVICES["numberdistribution"].full_name,
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    described = await reflect_v1(
        address,
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="grpc.reflection.v1.ServerReflection"
        ),
    )
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    assert [f.package for f in files if f.service] == ["grpc.reflection.v1"]
