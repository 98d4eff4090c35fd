"""One trace across the call-matching path, exported over OTLP to a real in-process
receiver: the switch's RouteInboundCall, CallMatching's MatchCall (which reads the
dialled number's reservations itself, no hop to NumberDistribution), the agent claim, the
offer through etcd to the agent's stream and the agent's answer share one trace id, and
the call's trace links to the trace of the StartHandoff that prepared it, whose
ReserveNumber in NumberDistribution is in the handoff's trace. No attribute carries the
caller's number or context."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.callmatching.v1 import call_matching_pb2_grpc as cm_grpc
from accessline.common.v1 import common_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2_grpc as nd_grpc
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.presence.v1 import presence_pb2_grpc as pr_grpc
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline.routing.v1 import routing_pb2_grpc as rt_grpc
from accessline_server.runtime.embedded_etcd import free_port
from tests.conftest import ServiceProcess, connect, eventually
from tests.support.presence import App
from tests.support.stack import call_path_services
from tests.test_telemetry import Receiver

C = common_pb2
ANI = "+33612349876"
SECRET_CONTEXT = "context-value-never-exported"


class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    """An OTLP metrics receiver that keeps the names and kinds of what it is sent."""

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}

    async def Export(
        self, request: Any, context: Any
    ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        for resource in request.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    self.seen[metric.name] = metric.WhichOneof("data")
        return metrics_service_pb2.ExportMetricsServiceResponse()


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, int]]:
    server = grpc.aio.server()
    sink = Receiver()
    sink.metrics = Metrics()  # type: ignore[attr-defined]
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(sink.metrics, server)  # type: ignore[attr-defined]
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await server.start()
    yield sink, port
    await server.stop(None)


async def provision(numbers: Any, matching: Any, presence: Any) -> None:
    """A pool with one number for subject "loan", the bank's application matching by
    the caller's number, and agent alice of the loans group."""
    await numbers.CreatePool(
        nd_pb2.CreatePoolRequest(
            pool=nd_pb2.Pool(pool_id="traced", subjects=["loan"], resource_group="loans")
        )
    )
    await numbers.AddNumbers(nd_pb2.AddNumbersRequest(pool_id="traced", numbers=["+33140001234"]))
    await matching.RegisterApplication(
        cm_pb2.RegisterApplicationRequest(
            application=cm_pb2.Application(
                application_id="bank",
                match_schema=C.MATCH_SCHEMA_NUMBER_ANI,
                skip_ivr_on_match=True,
            )
        )
    )
    await presence.RegisterAgent(
        pr_pb2.RegisterAgentRequest(
            agent=pr_pb2.Agent(
                agent_id="alice",
                resource_groups=["loans"],
                channels=[
                    pr_pb2.ChannelConfig(
                        channel=C.CHANNEL_DESK_VOICE, address="4001", available_on_login=True
                    )
                ],
            )
        )
    )


async def test_a_call_is_one_trace_from_the_switch_to_the_agents_accept(
    receiver: tuple[Receiver, int], service_factory: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    sink, port = receiver
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
    }
    services = await call_path_services(service_factory, tmp_path, otel)
    nd, cm, pr, rt = services.nd, services.cm, services.pr, services.rt
    channels = [connect(p.address) for p in (nd, cm, pr, rt)]
    numbers: Any = nd_grpc.NumberDistributionServiceStub(channels[0])
    matching: Any = cm_grpc.CallMatchingServiceStub(channels[1])
    presence: Any = pr_grpc.PresenceServiceStub(channels[2])
    routing: Any = rt_grpc.RoutingServiceStub(channels[3])
    try:
        await provision(numbers, matching, presence)
        app = App(pr.address)
        await app.login("alice")
        handoff = await matching.StartHandoff(
            cm_pb2.StartHandoffRequest(
                application_id="bank",
                customer_id="c1",
                ani_hint=ANI,
                context=C.ContextData(subject="loan", attributes={"note": SECRET_CONTEXT}),
            )
        )
        call = routing.RouteInboundCall(
            rt_pb2.RouteInboundCallRequest(
                call_id="traced-call", dnis=handoff.access_number, ani=ANI
            )
        )
        preview = await app.next_kind("offer")
        await app.send(
            offer_response=pr_pb2.OfferResponse(
                offer_id=preview.offer_id, decision=pr_pb2.OFFER_DECISION_ACCEPT
            )
        )
        events = []
        while (event := await asyncio.wait_for(call.read(), 20)) is not grpc.aio.EOF:
            events.append(event.WhichOneof("event"))
        # The call passes through the queue (position 1, no wait) on its way to the agent.
        assert [e for e in events if e != "queued"] == ["match_decided", "offered", "connect"]
        app.call.cancel()

        def named(name: str) -> list[Any]:
            return [span for _, span in sink.spans() if span.name == name]

        route_name = "/accessline.routing.v1.RoutingService/RouteInboundCall"
        wanted = [
            route_name,
            "/accessline.callmatching.v1.CallMatchingService/MatchCall",
            "/accessline.numberdistribution.v1.NumberDistributionService/ReserveNumber",
            "accessline.agent.claim",
            "accessline.offer.deliver",
            "accessline.offer.answer",
            "/accessline.callmatching.v1.CallMatchingService/StartHandoff",
        ]
        await eventually(lambda: all(named(n) for n in wanted), timeout=20, what="spans exported")
        expected_metrics = {
            "accessline.match.decision.duration": "histogram",
            "accessline.match.handoff_to_call.duration": "histogram",
            "accessline.routing.call_to_accept.duration": "histogram",
            "accessline.match.outcomes": "sum",
            "accessline.numbers.reservations": "sum",
            "accessline.routing.offers": "sum",
        }
        seen = sink.metrics.seen  # type: ignore[attr-defined]
        await eventually(
            lambda: expected_metrics.items() <= seen.items(),
            timeout=20,
            what="metrics exported over OTLP",
        )
    finally:
        for channel in channels:
            await channel.close()

    assert_one_trace(sink, route_name)


def assert_one_trace(sink: Receiver, route_name: str) -> None:
    """The switch's call, the match, the claim, the delivery and the answer are one
    trace; the handoff (with its number's reservation) is another, linked from the match;
    no personal datum was exported."""

    def named(name: str) -> list[Any]:
        return [span for _, span in sink.spans() if span.name == name]

    [route] = [s for s in named(route_name) if s.kind == 2]  # the server side of the switch's call
    trace_id = route.trace_id
    server_match = [
        s for s in named("/accessline.callmatching.v1.CallMatchingService/MatchCall") if s.kind == 2
    ]
    reserve = [
        s
        for s in named("/accessline.numberdistribution.v1.NumberDistributionService/ReserveNumber")
        if s.kind == 2
    ]
    assert [s.trace_id for s in server_match] == [trace_id]
    assert {s.trace_id for s in named("accessline.agent.claim")} == {trace_id}
    assert {s.trace_id for s in named("accessline.offer.deliver")} == {trace_id}
    [answer] = named("accessline.offer.answer")
    assert answer.trace_id == trace_id

    [start] = [
        s
        for s in named("/accessline.callmatching.v1.CallMatchingService/StartHandoff")
        if s.kind == 2
    ]
    assert start.trace_id != trace_id
    assert start.trace_id in {s.trace_id for s in reserve}
    links = [(link.trace_id, link.span_id) for link in server_match[0].links]
    assert (start.trace_id, start.span_id) in links or any(t == start.trace_id for t, _ in links)

    attributes = {a.key: a.value.string_value for a in server_match[0].attributes}
    assert attributes["accessline.match.outcome"] == "MATCH_OUTCOME_MATCHED"
    assert attributes["accessline.pool"] == "traced"
    assert attributes["accessline.application"] == "bank"
    exported = b"".join(r.SerializeToString() for r in sink.requests)
    assert SECRET_CONTEXT.encode() not in exported
    assert ANI.encode() not in exported
    assert ANI[3:].encode() not in exported
