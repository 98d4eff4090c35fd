"""The Kubernetes manifests, proven without a cluster: every overlay renders with
`kubectl kustomize`, every resource validates against the Kubernetes schemas, and the
manifests agree with the code (ports, probes, settings, peers, network policies, etcd
membership, and the dashboard's metric names against what the services export)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.callmatching.v1 import call_matching_pb2_grpc as cm_grpc
from accessline.common.v1 import common_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2_grpc as nd_grpc
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.presence.v1 import presence_pb2_grpc as pr_grpc
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline.routing.v1 import routing_pb2_grpc as rt_grpc
from services.cli import SERVICES, default_port, settings_type
from services.presence.settings import DEVELOPMENT_SECRET
from services.presence.tokens import agent_token
from services.runtime.embedded_etcd import free_port
from services.runtime.server import LIVENESS
from services.runtime.settings import ENV_PREFIX
from tests.conftest import ROOT, ServiceProcess, eventually, wait_serving

KUBERNETES_VERSION = "1.32.0"
OVERLAYS = ["dev", "prod"]
DASHBOARD = ROOT / "k8s/overlays/dev/dashboards/accessline-match.json"


def render(overlay: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail(
            "kubectl is not on this machine: the manifests are rendered with `kubectl kustomize`"
            " (kubectl 1.14 or newer, which embeds kustomize)"
        )
    done = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "k8s/overlays" / overlay)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, f"kubectl kustomize {overlay} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def service_deployments(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n: d for n, d in of_kind(docs, "Deployment").items() if n in SERVICES}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    return containers[0]


def environment(deployment: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, str]:
    """Every variable a service container gets: its ConfigMaps, then its own env."""
    c = container(deployment)
    maps = of_kind(docs, "ConfigMap")
    out: dict[str, str] = {}
    for source in c.get("envFrom", []):
        out.update(maps[source["configMapRef"]["name"]]["data"])
    for item in c.get("env", []):
        out[item["name"]] = item.get("value", "<from secret>")
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_resource_validates_against_the_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    failures = []
    for doc in rendered[overlay]:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")
    assert failures == []
    kinds = {d["kind"] for d in rendered[overlay]}
    assert {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "StatefulSet",
        "NetworkPolicy",
        "ConfigMap",
    } <= kinds


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_and_probes_match_the_services_defaults(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    docs = rendered[overlay]
    deployments = service_deployments(docs)
    assert set(deployments) == set(SERVICES)
    services = of_kind(docs, "Service")
    for name, deployment in deployments.items():
        c = container(deployment)
        assert c["args"] == ["serve", name]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"grpc": default_port(name), "metrics": default_port(name, "metrics_port")}
        env = environment(deployment, docs)
        assert int(env["ACCESSLINE_PORT"]) == ports["grpc"]
        assert int(env["ACCESSLINE_METRICS_PORT"]) == ports["metrics"]
        assert c["readinessProbe"]["grpc"] == {"port": ports["grpc"]}
        assert c["livenessProbe"]["grpc"] == {"port": ports["grpc"], "service": LIVENESS}
        spec = deployment["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] > float(
            env["ACCESSLINE_SHUTDOWN_GRACE_SECONDS"]
        ) + float(env.get("ACCESSLINE_SHUTDOWN_DRAIN_DELAY_SECONDS", "0"))
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        service = services[name]
        assert (
            service["spec"]["selector"].items()
            <= deployment["spec"]["template"]["metadata"]["labels"].items()
        )
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports
    pdbs = of_kind(docs, "PodDisruptionBudget")
    assert set(SERVICES) | {"etcd"} <= set(pdbs)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_environment_variable_is_a_real_setting(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    docs = rendered[overlay]
    unknown = []
    for name, deployment in service_deployments(docs).items():
        fields = {ENV_PREFIX + f.upper() for f in settings_type(name).model_fields}
        for variable in environment(deployment, docs):
            if variable.startswith("OTEL_"):
                continue  # standard OpenTelemetry settings, read by the SDK
            if variable not in fields:
                unknown.append(f"{name}: {variable}")
        # And every value the manifests give must load.
        values = {k: v for k, v in environment(deployment, docs).items() if v != "<from secret>"}
        settings_type(name).model_validate(
            {
                k.removeprefix(ENV_PREFIX).lower(): v
                for k, v in values.items()
                if k.startswith(ENV_PREFIX)
            }
        )
    assert unknown == []


def _policy_allows(
    policies: list[dict[str, Any]],
    source_labels: dict[str, str],
    target_labels: dict[str, str],
    port: int,
) -> bool:
    for policy in policies:
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        if not selector.items() <= source_labels.items():
            continue
        for rule in policy["spec"].get("egress", []):
            ports = {p.get("port") for p in rule.get("ports", [])}
            if ports and port not in ports:
                continue
            peers = rule.get("to")
            if peers is None:
                return True
            for peer in peers:
                wanted = peer.get("podSelector", {}).get("matchLabels", {})
                if "podSelector" in peer and wanted.items() <= target_labels.items():
                    return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_peer_a_service_calls_exists_and_is_reachable(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    docs = rendered[overlay]
    services = of_kind(docs, "Service")
    deployments = {**of_kind(docs, "Deployment"), **of_kind(docs, "StatefulSet")}
    policies = list(of_kind(docs, "NetworkPolicy").values())
    checked = 0
    for name, deployment in service_deployments(docs).items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        for variable, value in environment(deployment, docs).items():
            if not (variable.endswith("_ADDRESS") or variable == "ACCESSLINE_ETCD_ENDPOINTS"):
                continue
            # Members of a StatefulSet are named `{pod}.{headless service}`.
            host, port = value.split(",")[0].rsplit(":", 1)
            host = host.split(".")[-1]
            assert host in services, f"{name}: {variable} names {host}, which is no Service"
            target = services[host]
            assert int(port) in {p["port"] for p in target["spec"]["ports"]}, (
                f"{name}: {variable} port"
            )
            backing = [
                d
                for d in deployments.values()
                if target["spec"]["selector"].items()
                <= d["spec"]["template"]["metadata"]["labels"].items()
            ]
            assert backing, f"{host} selects no pods"
            target_labels = backing[0]["spec"]["template"]["metadata"]["labels"]
            assert _policy_allows(policies, labels, target_labels, int(port)), (
                f"{name} may not reach {host}:{port}"
            )
            checked += 1
    assert checked >= len(SERVICES) + 1  # etcd for each, plus CallMatching's NumberDistribution


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_etcd_membership_matches_its_replicas(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    etcd = of_kind(rendered[overlay], "StatefulSet")["etcd"]
    env = {e["name"]: e.get("value") for e in container(etcd)["env"]}
    members = env["ETCD_INITIAL_CLUSTER"].split(",")
    replicas = etcd["spec"]["replicas"]
    assert members == [f"etcd-{i}=http://etcd-{i}.etcd:2380" for i in range(replicas)]
    assert replicas % 2 == 1
    assert env["ETCD_INITIAL_CLUSTER_STATE"] == "new"
    # The services know every member, so losing any one of them leaves a quorum to use.
    for deployment in service_deployments(rendered[overlay]).values():
        endpoints = environment(deployment, rendered[overlay])["ACCESSLINE_ETCD_ENDPOINTS"]
        assert endpoints.split(",") == [f"etcd-{i}.etcd:2379" for i in range(replicas)]


def test_secrets_the_services_read_are_provided_in_dev(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["dev"]
    secrets = of_kind(docs, "Secret")
    for deployment in service_deployments(docs).values():
        for item in container(deployment).get("env", []):
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in secrets[ref["name"]]["data"]


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


def scrape(port: int) -> tuple[set[str], set[str]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    metrics, labels = set(), set()
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = re.match(r"[a-zA-Z_:][\w:]*", line)
        assert name is not None
        metrics.add(name.group(0))
        labels |= set(re.findall(r"(\w+)=\"", line))
    return metrics, labels


async def test_the_dashboard_queries_only_metrics_the_services_export(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
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
    # One of everything the dashboard shows: a handoff and its match, an exhausted pool,
    # an agent online, a call routed to that agent.
    async with (
        grpc.aio.insecure_channel(nd.address) as a,
        grpc.aio.insecure_channel(cm.address) as b,
        grpc.aio.insecure_channel(pr.address) as c,
        grpc.aio.insecure_channel(rt.address) as d,
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
        stream = presence.Connect()
        token = agent_token(DEVELOPMENT_SECRET.encode(), "metrics-agent")
        await stream.write(
            pr_pb2.ConnectRequest(login=pr_pb2.Login(agent_id="metrics-agent", auth_token=token))
        )
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

        exported: set[str] = set()
        labels: set[str] = set()

        def collect() -> bool:
            for port in ports.values():
                names, found = scrape(port)
                exported.update(names)
                labels.update(found)
            return {"accessline_presence_channels", "accessline_routing_offers_total"} <= exported

        await eventually(collect, what="metrics scraped")
        stream.cancel()

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


def test_prod_shares_the_match_history_in_postgresql_migrated_once_per_deploy(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["prod"]
    matching = container(service_deployments(docs)["callmatching"])
    env = {item["name"]: item for item in matching["env"]}
    dsn = env["ACCESSLINE_HISTORY_DSN"]
    assert "value" not in dsn
    assert dsn["valueFrom"]["secretKeyRef"] == {"name": "accessline-history", "key": "dsn"}
    assert env["ACCESSLINE_HISTORY_MIGRATE"]["value"] == "false"
    job = of_kind(docs, "Job")["history-migrate"]
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    migrate = container(job)
    assert migrate["args"] == ["history", "migrate"]
    assert {e["name"]: e for e in migrate["env"]}["ACCESSLINE_HISTORY_DSN"] == dsn
    # The command the Job runs exists, with what it is given.
    from services.cli import main

    with pytest.raises(SystemExit) as shown:
        main([*migrate["args"], "--help"])
    assert shown.value.code == 0
    # SQLite per pod stays the embedded and dev default.
    dev = container(service_deployments(rendered["dev"])["callmatching"])
    dev_dsn = {item["name"]: item for item in dev["env"]}["ACCESSLINE_HISTORY_DSN"]
    assert dev_dsn["value"].startswith("sqlite")
