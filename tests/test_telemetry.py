"""Telemetry of a real service process: spans reach an OTLP receiver when an endpoint
is configured, carry the service's resource, and the JSON log lines written during a
call carry that call's trace id."""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2_grpc as nd_grpc
from accessline_server.runtime.embedded_etcd import free_port
from tests.conftest import ServiceProcess, connect, eventually, wait_serving


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver that keeps what it is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def Export(
        self, request: Any, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[dict[str, str], Any]]:
        out = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    out += [(resource, span) for span in scope.spans]
        return out


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, int]]:
    server = grpc.aio.server()
    sink = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await server.start()
    yield sink, port
    await server.stop(None)


async def test_spans_are_exported_over_otlp_and_logs_carry_the_trace_id(
    receiver: tuple[Receiver, int], service_factory: Callable[..., ServiceProcess]
) -> None:
    sink, port = receiver
    probe = service_factory(
        "tests.support.probe_service",
        PROBE_WORK_SECONDS="0",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
        OTEL_EXPORTER_OTLP_INSECURE="true",
        OTEL_BSP_SCHEDULE_DELAY="100",
        OTEL_METRICS_EXPORTER="none",
    )
    await wait_serving(probe)
    async with connect(probe.address) as channel:
        stub: Any = nd_grpc.NumberDistributionServiceStub(channel)
        await stub.GetPool(nd_pb2.GetPoolRequest(pool_id="lyon"), timeout=10)
    method = "/accessline.numberdistribution.v1.NumberDistributionService/GetPool"

    def exported() -> list[tuple[dict[str, str], Any]]:
        return [(r, s) for r, s in sink.spans() if s.name == method]

    [(resource, span)] = await eventually(exported, what="GetPool span exported")
    assert resource["service.name"] == "accessline-probe"
    assert resource["service.namespace"] == "accessline"
    assert resource["service.version"]
    attributes = {a.key: a.value for a in span.attributes}
    assert attributes["rpc.system"].string_value == "grpc"

    logged = json.loads(await probe.wait_for_log("GetPool in flight"))
    assert logged["trace_id"] == span.trace_id.hex()
    assert logged["service"] == "probe"

    probe.signal(signal.SIGTERM)
    assert await probe.wait_exit() == 0


async def test_traces_are_sampled_at_their_start_and_a_callers_sampled_trace_continued(
    receiver: tuple[Receiver, int], service_factory: Callable[..., ServiceProcess]
) -> None:
    sink, port = receiver
    probe = service_factory(
        "tests.support.probe_service",
        PROBE_WORK_SECONDS="0",
        ACCESSLINE_TRACE_SAMPLE_RATIO="0",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
        OTEL_EXPORTER_OTLP_INSECURE="true",
        OTEL_BSP_SCHEDULE_DELAY="100",
        OTEL_METRICS_EXPORTER="none",
    )
    await wait_serving(probe)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with connect(probe.address) as channel:
        stub: Any = nd_grpc.NumberDistributionServiceStub(channel)
        # A trace that starts here, at a ratio of 0: not recorded.
        await stub.GetPool(nd_pb2.GetPoolRequest(pool_id="root"), timeout=10)
        # The caller's sampled trace: continued, whatever the ratio.
        await stub.GetPool(
            nd_pb2.GetPoolRequest(pool_id="child"),
            timeout=10,
            metadata=(("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),),
        )
    method = "/accessline.numberdistribution.v1.NumberDistributionService/GetPool"

    def exported() -> list[Any]:
        return [s for _, s in sink.spans() if s.name == method]

    # Spans leave in the order they ended: the root call's would have gone first.
    [span] = await eventually(exported, what="the continued call's span exported")
    assert span.trace_id.hex() == trace_id
