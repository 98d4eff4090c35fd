"""The Grafana dashboard of the dev overlay and the alert rules against a real
Prometheus (Debian's) scraping the five services while the demo plays and one of
everything else happens: every panel's query returns data with plausible values (the
caller's match latency within what the demo itself measured), and every alert rule
evaluates without error."""

from __future__ import annotations

import asyncio
import io
import json
import math
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from rich.console import Console

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.callmatching.v1 import call_matching_pb2_grpc as cm_grpc
from accessline.common.v1 import common_pb2
from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline.notification.v1 import notification_pb2_grpc as nt_grpc
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2_grpc as nd_grpc
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.presence.v1 import presence_pb2_grpc as pr_grpc
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline.routing.v1 import routing_pb2_grpc as rt_grpc
from accessline_server.demo import Access, Addresses, play
from accessline_server.routing.measures import MATCH_BUCKETS
from accessline_server.runtime.embedded_etcd import free_port
from tests.conftest import ROOT, ServiceProcess, connect, eventually, identity, wait_serving
from tests.support.push_servers import PushServers, make_credentials
from tests.support.stack import ROUTING_ENV

DASHBOARD = ROOT / "k8s/overlays/dev/dashboards/accessline-match.json"
RULES = ROOT / "k8s/components/monitoring/accessline.rules.yml"
# The dashboard's variables as "All" selects them.
VARIABLES = {"$job": "accessline", "$service": ".*", "$pool": ".*", "$group": ".*"}


def dashboard_queries() -> dict[str, list[str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    out: dict[str, list[str]] = {}
    for panel in dashboard["panels"]:
        queries = []
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            queries.append(expr)
        out[panel["title"]] = queries
    return out


class Prometheus:
    """Debian's Prometheus on a free port, scraping the given metrics ports every
    second as job "accessline" (the label `service` naming each), with the alert rules."""

    def __init__(self, folder: Path, targets: dict[str, int]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is not on this machine: `make check` installs Debian's")
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {
                    "job_name": "accessline",
                    "static_configs": [
                        {"targets": [f"127.0.0.1:{port}"], "labels": {"service": name}}
                        for name, port in targets.items()
                    ],
                }
            ],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(folder / "prometheus.log").open("w"),
        )

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as answer:  # noqa: S310 - http to loopback
            body = json.loads(answer.read())
        assert body["status"] == "success", body
        return body["data"]

    def values(self, query: str) -> list[float]:
        """The instant values of a query now (NaN dropped)."""
        found = self.api("query", query=query)["result"]
        values = [float(item["value"][1]) for item in found]
        return [v for v in values if not math.isnan(v)]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


async def services_with_metrics(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path, push_env: dict[str, str]
) -> tuple[dict[str, ServiceProcess], dict[str, int]]:
    """The five services, each with a metrics port."""
    ports = {
        name: free_port()
        for name in ("numberdistribution", "callmatching", "presence", "routing", "notification")
    }

    def start(name: str, **env: str) -> ServiceProcess:
        return service_factory(
            f"accessline_server.{name}", ACCESSLINE_METRICS_PORT=str(ports[name]), **env
        )

    nd, pr, nt = start("numberdistribution"), start("presence"), start("notification", **push_env)
    await wait_serving(nd)
    cm = start(
        "callmatching",
        ACCESSLINE_NUMBERDISTRIBUTION_ADDRESS=nd.address,
        ACCESSLINE_HISTORY_DSN=f"sqlite+aiosqlite:///{tmp_path / 'history.db'}",
    )
    for service in (pr, nt, cm):
        await wait_serving(service)
    rt = start(
        "routing",
        ACCESSLINE_CALLMATCHING_ADDRESS=cm.address,
        ACCESSLINE_PRESENCE_ADDRESS=pr.address,
        ACCESSLINE_NOTIFICATION_ADDRESS=nt.address,
        **ROUTING_ENV,
    )
    await wait_serving(rt)
    return {"numberdistribution": nd, "callmatching": cm, "presence": pr, "routing": rt,
            "notification": nt}, ports  # fmt: skip


@pytest.fixture
async def push_env(tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    """A local APNs (the push provider the notification goes to)."""
    port = free_port()
    servers = PushServers(make_credentials(tmp_path, port))
    stop = asyncio.Event()
    task = asyncio.create_task(servers.run(port, stop))
    creds = servers.credentials
    yield {
        "ACCESSLINE_APNS_URL": f"https://127.0.0.1:{port}",
        "ACCESSLINE_APNS_KEY_FILE": str(creds.apns_key_file),
        "ACCESSLINE_APNS_KEY_ID": "KEY123",
        "ACCESSLINE_APNS_TEAM_ID": "TEAM456",
        "ACCESSLINE_APNS_TOPIC": "com.example.bank",
        "ACCESSLINE_PUSH_CA_FILE": str(creds.ca_file),
    }
    servers.release.set()
    stop.set()
    await task


async def test_every_dashboard_query_returns_plausible_data_from_a_real_prometheus(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path, push_env: dict[str, str]
) -> None:
    services, ports = await services_with_metrics(service_factory, tmp_path, push_env)
    prometheus = Prometheus(tmp_path, ports)
    try:
        # Every service scraped once before the load: the counters' rates then see it.
        await eventually(
            lambda: prometheus.values('sum(up{job="accessline"})') == [5.0],
            timeout=30,
            what="prometheus scraping every service",
        )
        nd, cm, pr, rt = (services[n] for n in ("numberdistribution", "callmatching",
                                                 "presence", "routing"))  # fmt: skip
        await one_of_everything(nd, cm, pr, rt)
        # Scraped before the demo: the series it made exist, so the demo's calls are a
        # rise within the panels' windows (a series' first sample is no rise).
        matches = 'sum(accessline_match_outcomes_total{job="accessline"})'
        await eventually(lambda: prometheus.values(matches) == [2.0], timeout=30, what="matches")
        await push_one(services["notification"])
        tally = await play(
            Addresses(nd.address, cm.address, rt.address, pr.address),
            calls=16,
            agents=3,
            concurrency=4,
            live=False,
            access=Access(identity().files),
            console=Console(file=io.StringIO()),
        )
        # one_of_everything matched two calls (MatchCall, then a routed call)
        total = float(2 + tally.calls_started)
        await eventually(
            lambda: prometheus.values(matches) == [total], timeout=30, what="every match scraped"
        )
        for title, queries in dashboard_queries().items():
            for query in queries:
                await eventually(lambda q=query: prometheus.values(q), timeout=30, what=title)
        check_plausible(prometheus, tally.to_match)
        rules = prometheus.api("rules")["groups"][0]["rules"]
        assert {r["health"] for r in rules} == {"ok"}, [r.get("lastError") for r in rules]
    finally:
        prometheus.stop()
        # Before the push provider goes away (its connections close first).
        await services["notification"].stop_async()


def check_plausible(prometheus: Prometheus, to_match: list[float]) -> None:
    """Values a working system must show: the caller's match latency within the buckets
    around what the demo measured at the switch, one leader, shares within 0 and 1."""
    (p50,) = prometheus.values(
        "histogram_quantile(0.5, sum by (le) (rate("
        'accessline_routing_match_duration_seconds_bucket{job="accessline"}[5m])))'
    )
    lowest, highest = min(to_match), max(to_match)
    below = max([0.0] + [b for b in MATCH_BUCKETS if b <= lowest / 2])
    above = min([b for b in MATCH_BUCKETS if b >= highest] + [math.inf])
    assert below <= p50 <= above, (p50, lowest, highest)
    assert prometheus.values('sum(accessline_routing_leader{job="accessline"})') == [1.0]
    shares = prometheus.values(
        dashboard_queries()["Pool utilisation (reserved share of numbers)"][0]
    )
    assert all(0 <= share <= 1 for share in shares)
    assert prometheus.values('min(accessline_etcd_reachable{job="accessline"})') == [1.0]
    assert prometheus.values('min(accessline_match_history_up{job="accessline"})') == [1.0]


async def push_one(nt: ServiceProcess) -> None:
    """A notification pushed to one APNs device, so the push panels have an attempt."""
    async with connect(nt.address) as channel:
        stub: Any = nt_grpc.NotificationServiceStub(channel)
        await stub.RegisterDevice(
            nt_pb2.RegisterDeviceRequest(
                device=nt_pb2.Device(
                    customer_id="metrics-customer",
                    application_id="bank",
                    platform=nt_pb2.PLATFORM_APNS,
                    push_token="a1" * 32,
                    locale="fr-FR",
                )
            )
        )
        await stub.Publish(
            nt_pb2.PublishRequest(
                event_type=nt_pb2.EVENT_TYPE_AGENT_AVAILABLE,
                customer_id="metrics-customer",
                title="An agent is free",
                body="Open the app to call now.",
            )
        )


async def one_of_everything(
    nd: ServiceProcess,
    cm: ServiceProcess,
    pr: ServiceProcess,
    rt: ServiceProcess,
) -> None:
    """A handoff and its match, an exhausted pool, an agent online, a call routed to
    that agent."""
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
        stream.cancel()
