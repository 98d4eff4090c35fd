"""The Grafana dashboard of the dev overlay against the services themselves: every
query parses into metric and label names, and each one is a name a running service
exports once it has served the calls the panels are about."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.callmatching.v1 import call_matching_pb2_grpc as cm_grpc
from accessline.common.v1 import common_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2_grpc as nd_grpc
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.presence.v1 import presence_pb2_grpc as pr_grpc
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline.routing.v1 import routing_pb2_grpc as rt_grpc
from services.runtime.embedded_etcd import free_port
from tests.conftest import ROOT, ServiceProcess, connect, eventually, identity, wait_serving
from tests.support.scraping import scrape

DASHBOARD = ROOT / "k8s/overlays/dev/dashboards/accessline-match.json"


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def names_in(query: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an Accessline PromQL query uses."""
    labels: set[str] = set()
    for group in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", query):
        labels |= {g.strip() for g in group.split(",") if g.strip()}
    for selector in re.findall(r"\{([^}]*)\}", query):
        labels |= {m for m in re.findall(r"(\w+)\s*=", selector)}
    stripped = re.sub(r"\{[^}]*\}", "", re.sub(r"\b(?:by|on)\s*\([^)]*\)", "", query))
    metrics = set(re.findall(r"\baccessline_\w+", stripped))
    return metrics, labels - {"le"}


async def test_the_dashboard_queries_only_metrics_the_services_export(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    exported, labels = await exercised_and_scraped(service_factory, tmp_path)
    used_metrics: set[str] = set()
    used_labels: set[str] = set()
    for query in dashboard_queries():
        metrics, query_labels = names_in(query)
        assert metrics, query
        used_metrics |= metrics
        used_labels |= query_labels
    buckets = {m for m in used_metrics if m.endswith("_bucket")}
    assert used_metrics - exported == set()
    assert used_labels - labels == set()
    assert buckets == {
        "accessline_match_decision_duration_seconds_bucket",
        "accessline_match_handoff_to_call_duration_seconds_bucket",
        "accessline_routing_call_to_accept_duration_seconds_bucket",
    }


async def exercised_and_scraped(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path
) -> tuple[set[str], set[str]]:
    """The metric and label names the four call-path services export once they have
    served one of everything the dashboard shows."""
    ports = {
        name: free_port() for name in ("numberdistribution", "callmatching", "presence", "routing")
    }
    nd = service_factory(
        "services.numberdistribution", ACCESSLINE_METRICS_PORT=str(ports["numberdistribution"])
    )
    await wait_serving(nd)
    cm = service_factory(
        "services.callmatching",
        ACCESSLINE_METRICS_PORT=str(ports["callmatching"]),
        ACCESSLINE_NUMBERDISTRIBUTION_ADDRESS=nd.address,
        ACCESSLINE_HISTORY_DSN=f"sqlite+aiosqlite:///{tmp_path / 'history.db'}",
    )
    pr = service_factory("services.presence", ACCESSLINE_METRICS_PORT=str(ports["presence"]))
    await wait_serving(cm)
    await wait_serving(pr)
    rt = service_factory(
        "services.routing",
        ACCESSLINE_METRICS_PORT=str(ports["routing"]),
        ACCESSLINE_CALLMATCHING_ADDRESS=cm.address,
        ACCESSLINE_PRESENCE_ADDRESS=pr.address,
    )
    await wait_serving(rt)
    exported: set[str] = set()
    labels: set[str] = set()

    def collect() -> bool:
        for port in ports.values():
            names, found = scrape(port)
            exported.update(names)
            labels.update(found)
        return {"accessline_presence_channels", "accessline_routing_offers_total"} <= exported

    await one_of_everything(nd, cm, pr, rt, collect)
    return exported, labels


async def one_of_everything(
    nd: ServiceProcess,
    cm: ServiceProcess,
    pr: ServiceProcess,
    rt: ServiceProcess,
    collect: Callable[[], bool],
) -> None:
    """A handoff and its match, an exhausted pool, an agent online, a call routed to
    that agent; `collect` polled while the agent is still online."""
    async with (
        connect(nd.address, service="callmatching") as a,
        connect(cm.address, service="routing") as b,
        connect(pr.address) as c,
        connect(rt.address) as d,
    ):
        numbers: Any = nd_grpc.NumberDistributionServiceStub(a)
        matching: Any = cm_grpc.CallMatchingServiceStub(b)
        presence: Any = pr_grpc.PresenceServiceStub(c)
        await numbers.CreatePool(
            nd_pb2.CreatePoolRequest(
                pool=nd_pb2.Pool(pool_id="metrics", subjects=["m"], resource_group="metrics-team")
            )
        )
        await numbers.AddNumbers(
            nd_pb2.AddNumbersRequest(pool_id="metrics", numbers=["+33140009999"])
        )
        app = cm_pb2.Application(
            application_id="metrics", match_schema=common_pb2.MATCH_SCHEMA_NUMBER
        )
        await matching.RegisterApplication(cm_pb2.RegisterApplicationRequest(application=app))
        started = await matching.StartHandoff(
            cm_pb2.StartHandoffRequest(
                application_id="metrics",
                customer_id="c",
                context=common_pb2.ContextData(subject="m"),
            )
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await numbers.ReserveNumber(nd_pb2.ReserveNumberRequest(subject="m"))
        matched = await matching.MatchCall(
            cm_pb2.MatchCallRequest(call_id="m1", dnis=started.access_number)
        )
        assert matched.outcome == cm_pb2.MATCH_OUTCOME_MATCHED
        agent = pr_pb2.Agent(
            agent_id="metrics-agent",
            resource_groups=["metrics-team"],
            channels=[
                pr_pb2.ChannelConfig(
                    channel=common_pb2.CHANNEL_CHAT, address="a", available_on_login=True
                ),
                pr_pb2.ChannelConfig(
                    channel=common_pb2.CHANNEL_DESK_VOICE, address="b", available_on_login=True
                ),
            ],
        )
        await presence.RegisterAgent(pr_pb2.RegisterAgentRequest(agent=agent))
        agent_channel = connect(pr.address, identity().token("metrics-agent", "agent"))
        stream = pr_grpc.PresenceServiceStub(agent_channel).Connect()
        await stream.write(pr_pb2.ConnectRequest(login=pr_pb2.Login(agent_id="metrics-agent")))
        assert (await stream.read()).HasField("snapshot")
        routing: Any = rt_grpc.RoutingServiceStub(d)
        call = routing.RouteInboundCall(
            rt_pb2.RouteInboundCallRequest(call_id="m2", dnis=started.access_number)
        )
        while not (reply := await stream.read()).HasField("offer"):
            pass
        await stream.write(
            pr_pb2.ConnectRequest(
                offer_response=pr_pb2.OfferResponse(
                    offer_id=reply.offer.offer_id, decision=pr_pb2.OFFER_DECISION_ACCEPT
                )
            )
        )
        kinds = [event.WhichOneof("event") async for event in call]
        assert kinds[-1] == "connect"
        await eventually(collect, what="metrics scraped")
        stream.cancel()
