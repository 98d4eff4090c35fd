"""Bad input on every RPC of every service, generated from the contracts' descriptors,
against the five services as real processes: bytes that are no message, timestamps and
durations out of range, and every string, list and map a client controls made oversized.
Each is refused with INVALID_ARGUMENT naming the field — never INTERNAL or UNKNOWN,
never internals in the message — and the services keep serving."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, message_factory
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message

from accessline.callmatching.v1 import call_matching_pb2
from accessline.journey.v1 import journey_pb2
from accessline.notification.v1 import notification_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2
from accessline.presence.v1 import presence_pb2, presence_pb2_grpc
from accessline.routing.v1 import routing_pb2
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from accessline_server.runtime.identity import method_policy
from tests.conftest import (
    ServiceProcess,
    connect,
    health_status,
    identity,
    spawn_service,
    violated_fields,
)

SERVICES = {
    "numberdistribution": number_distribution_pb2.DESCRIPTOR.services_by_name[
        "NumberDistributionService"
    ],
    "callmatching": call_matching_pb2.DESCRIPTOR.services_by_name["CallMatchingService"],
    "routing": routing_pb2.DESCRIPTOR.services_by_name["RoutingService"],
    "presence": presence_pb2.DESCRIPTOR.services_by_name["PresenceService"],
    "notification": notification_pb2.DESCRIPTOR.services_by_name["NotificationService"],
}
# Longer than any field allows, far below the 4 MiB a request may have.
HUGE_TEXT = "x" * 70_000
HUGE_COUNT = 20_000
WELL_KNOWN = "google.protobuf."
# Answers that say nothing useful about the request: never the answer to bad input.
OPAQUE = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


@dataclass(frozen=True)
class Rpc:
    service: str
    method: MethodDescriptor

    @property
    def path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def id(self) -> str:
        return f"{self.service}.{self.method.name}"


# Every gRPC service each process serves: CallMatching hosts JourneyService besides.
HOSTED = [
    *SERVICES.items(),
    ("callmatching", journey_pb2.DESCRIPTOR.services_by_name["JourneyService"]),
]
RPCS = [Rpc(name, m) for name, service in HOSTED for m in service.methods]
UNARY_REQUEST = [r for r in RPCS if not r.method.client_streaming]


def message_class(desc: descriptor.Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(desc)


@pytest.fixture(scope="module")
async def stack(etcd: EmbeddedEtcd) -> AsyncIterator[dict[str, ServiceProcess]]:
    prefix = "/bad-input"
    nd = spawn_service("accessline_server.numberdistribution", etcd.endpoint, prefix)
    pr = spawn_service("accessline_server.presence", etcd.endpoint, prefix)
    nt = spawn_service("accessline_server.notification", etcd.endpoint, prefix)
    started = {"numberdistribution": nd, "presence": pr, "notification": nt}
    try:
        for service in started.values():
            await _serving(service)
        cm = spawn_service(
            "accessline_server.callmatching",
            etcd.endpoint,
            prefix,
            ACCESSLINE_NUMBERDISTRIBUTION_ADDRESS=nd.address,
        )
        started["callmatching"] = cm
        await _serving(cm)
        rt = spawn_service(
            "accessline_server.routing",
            etcd.endpoint,
            prefix,
            ACCESSLINE_CALLMATCHING_ADDRESS=cm.address,
            ACCESSLINE_PRESENCE_ADDRESS=pr.address,
            ACCESSLINE_NOTIFICATION_ADDRESS=nt.address,
        )
        started["routing"] = rt
        await _serving(rt)
        yield started
    finally:
        await asyncio.gather(*(s.stop_async() for s in started.values()))


async def _serving(service: ServiceProcess) -> None:
    from tests.conftest import wait_serving

    await wait_serving(service)


async def raw_call(address: str, rpc: Rpc, payload: bytes, timeout: float = 10.0) -> Any:
    """Sends `payload` as the request's bytes, as a caller the RPC allows; returns the
    first answer's bytes."""
    async with grpc.aio.secure_channel(address, identity().allowed(rpc.method)) as channel:
        if rpc.method.client_streaming:
            call = channel.stream_stream(rpc.path)(iter([payload]), timeout=timeout)
            async for reply in call:
                return reply
            return None
        if rpc.method.server_streaming:
            stream = channel.unary_stream(rpc.path)(payload, timeout=timeout)
            async for reply in stream:
                return reply
            return None
        return await channel.unary_unary(rpc.path)(payload, timeout=timeout)


async def call(address: str, rpc: Rpc, request: Message, timeout: float = 10.0) -> Any:
    return await raw_call(address, rpc, request.SerializeToString(), timeout)


def refusal(error: grpc.aio.AioRpcError) -> str:
    return f"{error.code().name}: {error.details()}"


@pytest.mark.parametrize("rpc", RPCS, ids=[r.id for r in RPCS])
async def test_bytes_that_are_no_message_are_refused_without_internals(
    stack: dict[str, ServiceProcess], rpc: Rpc
) -> None:
    # A field tag of 0 can never be valid protobuf.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await raw_call(stack[rpc.service].address, rpc, b"\x00\x01garbage")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refusal(caught.value)
    details = caught.value.details() or ""
    assert "class" not in details
    assert "Error" not in details


def paths(desc: descriptor.Descriptor, depth: int = 0) -> Iterator[tuple[FieldDescriptor, ...]]:
    """Every field reachable from a message, as the chain of fields leading to it (well
    known types are leaves; at most three levels deep)."""
    for field in desc.fields:
        yield (field,)
        sub = field.message_type
        if (
            sub is not None
            and depth < 2
            and not sub.full_name.startswith(WELL_KNOWN)
            and not sub.GetOptions().map_entry
        ):
            for rest in paths(sub, depth + 1):
                yield (field, *rest)


def is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def in_scope(rpc: Rpc) -> Message:
    """An empty request but for the fields its access option scopes, set to what the
    probing caller owns (so the probe reaches the request's checks)."""
    request = message_class(rpc.method.input_type)()
    for _, path in method_policy(rpc.method).scopes:
        *parents, last = path.split(".")
        target: Any = request
        for part in parents:
            target = getattr(target, part)
        setattr(target, last, "probe-subject")
    return request


def request_with(rpc: Rpc, chain: tuple[FieldDescriptor, ...], fill: Any) -> Message:
    """A request with the field at the end of `chain` set by `fill(parent, field)`."""
    request = in_scope(rpc)
    parent = request
    for field in chain[:-1]:
        if is_repeated(field):
            parent = getattr(parent, field.name).add()
        else:
            parent = getattr(parent, field.name)
    fill(parent, chain[-1])
    return request


def field_name(chain: tuple[FieldDescriptor, ...]) -> str:
    """The field's path as refusals name it: `agent.skills[0].name`."""
    parts = [f"{f.name}[0]" if is_repeated(f) else f.name for f in chain[:-1]]
    return ".".join([*parts, chain[-1].name])


def oversized_cases() -> list[tuple[Rpc, tuple[FieldDescriptor, ...]]]:
    out = []
    for rpc in UNARY_REQUEST:
        for chain in paths(rpc.method.input_type):
            field = chain[-1]
            if any(
                is_repeated(f) and (f.message_type is None or f.message_type.GetOptions().map_entry)
                for f in chain[:-1]
            ):
                continue
            text = field.type == FieldDescriptor.TYPE_STRING
            listed = is_repeated(field)
            if (text or listed) and not (
                field.message_type is not None
                and field.message_type.full_name.startswith(WELL_KNOWN)
                and not listed
            ):
                out.append((rpc, chain))
    return out


OVERSIZED = oversized_cases()


def oversize(parent: Message, field: FieldDescriptor) -> None:
    value = getattr(parent, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        for i in range(HUGE_COUNT):
            value[f"k{i}"] = "v"  # every map of the contracts is string to string
    elif is_repeated(field):
        for i in range(HUGE_COUNT):
            if field.message_type is not None:
                value.add()
            elif field.type == FieldDescriptor.TYPE_STRING:
                value.append(f"v{i}")
            else:
                value.append(1)
    else:
        setattr(parent, field.name, HUGE_TEXT)


@pytest.mark.parametrize(
    ("rpc", "chain"),
    OVERSIZED,
    ids=[f"{r.id}:{field_name(c)}" for r, c in OVERSIZED],
)
async def test_every_string_and_list_a_client_sends_has_a_limit(
    stack: dict[str, ServiceProcess], rpc: Rpc, chain: tuple[FieldDescriptor, ...]
) -> None:
    request = request_with(rpc, chain, oversize)
    name = field_name(chain)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(stack[rpc.service].address, rpc, request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refusal(caught.value)
    named = violated_fields(caught.value)
    assert any(f == name or f.startswith((f"{name}.", f"{name}[")) for f in named), (
        f"{name} not among {sorted(named)}"
    )


def time_cases() -> list[tuple[Rpc, tuple[FieldDescriptor, ...], str]]:
    out = []
    for rpc in UNARY_REQUEST:
        for chain in paths(rpc.method.input_type):
            field = chain[-1]
            if any(is_repeated(f) for f in chain) or field.message_type is None:
                continue
            kind = field.message_type.full_name
            if kind == "google.protobuf.Timestamp":
                out += [(rpc, chain, "seconds+"), (rpc, chain, "seconds-"), (rpc, chain, "nanos")]
            elif kind == "google.protobuf.Duration":
                out += [(rpc, chain, "seconds+"), (rpc, chain, "nanos")]
    return out


TIMES = time_cases()


@pytest.mark.parametrize(
    ("rpc", "chain", "how"),
    TIMES,
    ids=[f"{r.id}:{field_name(c)}:{h}" for r, c, h in TIMES],
)
async def test_timestamps_and_durations_out_of_range_are_refused(
    stack: dict[str, ServiceProcess], rpc: Rpc, chain: tuple[FieldDescriptor, ...], how: str
) -> None:
    def bad(parent: Message, field: FieldDescriptor) -> None:
        value = getattr(parent, field.name)
        if how == "seconds+":
            value.seconds = 10**12
        elif how == "seconds-":
            value.seconds = -(10**12)
        else:
            value.seconds = 1
            value.nanos = 2_000_000_000

    request = request_with(rpc, chain, bad)
    name = field_name(chain)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(stack[rpc.service].address, rpc, request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refusal(caught.value)
    assert any(f == name or f.startswith(f"{name}.") for f in violated_fields(caught.value)), (
        f"{name} not among {sorted(violated_fields(caught.value))}"
    )


@pytest.mark.parametrize("name", list(SERVICES))
async def test_the_services_still_serve_after_the_probes(
    stack: dict[str, ServiceProcess], name: str
) -> None:
    from grpc_health.v1 import health_pb2

    assert await health_status(stack[name].address) == health_pb2.HealthCheckResponse.SERVING


async def test_garbage_after_a_login_ends_the_agent_stream_at_once(
    stack: dict[str, ServiceProcess],
) -> None:
    from accessline.common.v1 import common_pb2

    address = stack["presence"].address
    async with (
        connect(address) as admin,
        connect(address, identity().token("garbage-sender", "agent")) as channel,
    ):
        stub: Any = presence_pb2_grpc.PresenceServiceStub(admin)
        agent = presence_pb2.Agent(
            agent_id="garbage-sender",
            channels=[
                presence_pb2.ChannelConfig(channel=common_pb2.CHANNEL_DESK_VOICE, address="4000")
            ],
        )
        await stub.RegisterAgent(presence_pb2.RegisterAgentRequest(agent=agent))
        login = presence_pb2.ConnectRequest(login=presence_pb2.Login(agent_id="garbage-sender"))
        stream = channel.stream_stream(
            "/accessline.presence.v1.PresenceService/Connect",
            request_serializer=lambda b: b,
            response_deserializer=presence_pb2.ConnectResponse.FromString,
        )(timeout=30)
        await stream.write(login.SerializeToString())
        first = await stream.read()
        assert first.HasField("snapshot")
        await stream.write(b"\x00\x01garbage")
        # Ended by the server at once, not left unread until the heartbeat time-out.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(read_to_end(stream), 10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refusal(caught.value)


async def read_to_end(stream: Any) -> None:
    while await stream.read() is not grpc.aio.EOF:
        pass


@pytest.mark.parametrize("rpc", RPCS, ids=[r.id for r in RPCS])
async def test_a_client_cancelling_any_call_logs_no_error(
    stack: dict[str, ServiceProcess], rpc: Rpc
) -> None:
    service = stack[rpc.service]
    before = len(service.lines)
    request = message_class(rpc.method.input_type)().SerializeToString()
    async with grpc.aio.secure_channel(service.address, identity().allowed(rpc.method)) as channel:
        if rpc.method.client_streaming:
            call: Any = channel.stream_stream(rpc.path)(iter([]), timeout=30)
        elif rpc.method.server_streaming:
            call = channel.unary_stream(rpc.path)(request, timeout=30)
        else:
            call = channel.unary_unary(rpc.path)(request, timeout=30)
        # Let the call reach the servicer (whatever it answers), then walk away.
        done = asyncio.ensure_future(asyncio.wait_for(asyncio.shield(_finish(call)), 0.3))
        with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError, asyncio.CancelledError):
            await done
        call.cancel()
    # A call that the server handled, in any way, appears in its health afterwards too.
    from grpc_health.v1 import health_pb2

    assert await health_status(service.address) == health_pb2.HealthCheckResponse.SERVING
    logged = service.lines[before:]
    assert [line for line in logged if '"level": "ERROR"' in line] == []


async def _finish(call: Any) -> None:
    if hasattr(call, "read"):
        while await call.read() is not grpc.aio.EOF:
            pass
    else:
        await call


async def test_no_service_logged_an_error_or_a_traceback_during_the_probes(
    stack: dict[str, ServiceProcess],
) -> None:
    await asyncio.gather(*(s.stop_async() for s in stack.values()))
    for name, service in stack.items():
        logged = await service.whole_log()
        bad = [line for line in logged if '"level": "ERROR"' in line or "Traceback" in line]
        assert bad == [], name
