"""The Kubernetes manifests, proven without a cluster: every overlay renders with
`kubectl kustomize`, every resource validates against the Kubernetes schemas, and the
manifests agree with the code (ports, probes, settings, peers, network policies, etcd
membership). The dashboard's queries are test_dashboard.py's."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from accessline_server.cli import SERVICES, default_port, settings_type
from accessline_server.runtime.server import LIVENESS
from accessline_server.runtime.settings import ENV_PREFIX
from accessline_server.sipedge.settings import SipEdgeSettings
from tests.conftest import ROOT
from tests.support.kustomize import render_prod_with

KUBERNETES_VERSION = "1.32.0"
SECRET_STAND_IN = "a-value-of-the-operators-own-0123456789abcdef"
OVERLAYS = ["dev", "prod"]


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
        if doc["apiVersion"].startswith("cert-manager.io/"):
            continue  # a CRD's kinds: checked by test_certificates_... below
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
        env = environment(deployment, docs)
        assert ports == {
            "grpc": default_port(name),
            "metrics": default_port(name, "metrics_port"),
            "health": int(env["ACCESSLINE_HEALTH_PORT"]),
            # Connect and gRPC-Web where browsers come (the console, its links).
            **({"web": int(env["ACCESSLINE_WEB_PORT"])} if "ACCESSLINE_WEB_PORT" in env else {}),
        }
        assert ("web" in ports) == (name in ("presence", "notification"))
        assert int(env["ACCESSLINE_PORT"]) == ports["grpc"]
        assert int(env["ACCESSLINE_METRICS_PORT"]) == ports["metrics"]
        # The kubelet has no client certificate: it asks the plain-text health port.
        assert c["readinessProbe"]["grpc"] == {"port": ports["health"]}
        assert c["livenessProbe"]["grpc"] == {"port": ports["health"], "service": LIVENESS}
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
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
            k: v for k, v in ports.items() if k != "health"
        }
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
        # And every value the manifests give must load (a Secret's stands in as a value
        # of the operator's).
        values = {
            k: SECRET_STAND_IN if v == "<from secret>" else v
            for k, v in environment(deployment, docs).items()
        }
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


def _ingress_allows(
    policies: list[dict[str, Any]],
    source_labels: dict[str, str],
    target_labels: dict[str, str],
    port_names: set[str | int],
) -> bool:
    """Whether the target's ingress policies let a pod of `source_labels` (same
    namespace) in on one of `port_names` (a number or the container port's name)."""
    for policy in policies:
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        if not selector.items() <= target_labels.items():
            continue
        for rule in policy["spec"].get("ingress", []):
            ports = {p.get("port") for p in rule.get("ports", [])}
            if ports and not ports & port_names:
                continue
            for peer in rule.get("from", []):
                wanted = peer.get("podSelector", {}).get("matchLabels", {})
                if "podSelector" in peer and wanted.items() <= source_labels.items():
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
            named = {
                p["name"]
                for c in backing[0]["spec"]["template"]["spec"]["containers"]
                for p in c["ports"]
                if p["containerPort"] == int(port)
            }
            assert _ingress_allows(policies, labels, target_labels, {int(port), *named}), (
                f"{host} does not let {name} in on {port}"
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
    assert members == [f"etcd-{i}=https://etcd-{i}.etcd:2380" for i in range(replicas)]
    # Clients and peers over TLS, each side's certificate required.
    for side in ("", "PEER_"):
        assert env[f"ETCD_{side}CLIENT_CERT_AUTH"] == "true"
        assert env[f"ETCD_{side}TRUSTED_CA_FILE"].startswith("/etc/etcd/tls/")
    assert env["ETCD_LISTEN_CLIENT_URLS"].startswith("https://")
    assert replicas % 2 == 1
    assert env["ETCD_INITIAL_CLUSTER_STATE"] == "new"
    # The services know every member, so losing any one of them leaves a quorum to use.
    for deployment in service_deployments(rendered[overlay]).values():
        endpoints = environment(deployment, rendered[overlay])["ACCESSLINE_ETCD_ENDPOINTS"]
        assert endpoints.split(",") == [f"etcd-{i}.etcd:2379" for i in range(replicas)]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_grpc_port_admits_exactly_the_callers_its_protos_name(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    from accessline.access.v1 import access_pb2
    from accessline_server.runtime.identity import ROLE_NAMES, method_policy
    from tests.test_access import HOSTED

    docs = rendered[overlay]
    policies = list(of_kind(docs, "NetworkPolicy").values())
    for name, deployment in service_deployments(docs).items():
        target = deployment["spec"]["template"]["metadata"]["labels"]
        declared: set[str] = set()
        methods = [m for host, s in HOSTED if host == name for m in s.methods]
        for method in methods:
            policy = method_policy(method)
            declared |= {f"role:{ROLE_NAMES[r]}" for r in policy.roles}
            declared |= {
                "service:" + access_pb2.Service.Name(x).removeprefix("SERVICE_").lower()  # type: ignore[arg-type]
                for x in policy.services
            }
        admitted: set[str] = set()
        for policy in policies:
            selector = policy["spec"]["podSelector"].get("matchLabels", {})
            if not selector or not selector.items() <= target.items():
                continue
            for rule in policy["spec"].get("ingress", []):
                if "grpc" not in {p.get("port") for p in rule.get("ports", [])}:
                    continue
                assert "from" in rule, f"{name}: an ingress rule open to every pod"
                for peer in rule["from"]:
                    labels = peer["podSelector"]["matchLabels"]
                    if "accessline.io/caller" in labels:
                        admitted.add(f"role:{labels['accessline.io/caller']}")
                    else:
                        admitted.add(f"service:{labels['app.kubernetes.io/name']}")
        assert admitted == declared, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_mounts_its_own_certificate_with_its_name_and_spiffe_id(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    docs = rendered[overlay]
    certificates = {d["spec"]["secretName"]: d["spec"] for d in docs if d["kind"] == "Certificate"}
    for name, deployment in service_deployments(docs).items():
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        secret = volumes["tls"]["secret"]["secretName"]
        assert secret == f"accessline-tls-{name}"
        env = environment(deployment, docs)
        mount = next(
            m["mountPath"] for m in container(deployment)["volumeMounts"] if m["name"] == "tls"
        )
        for variable in ("TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CA_FILE", "ETCD_CA_FILE"):
            assert env[f"ACCESSLINE_{variable}"].startswith(mount + "/"), variable
        if overlay == "dev":  # cert-manager makes them; production may bring its own
            spec = certificates[secret]
            assert spec["uris"] == [f"spiffe://accessline/service/{name}"]
            assert name in spec["dnsNames"]  # the name peers check
            assert set(spec["usages"]) == {"server auth", "client auth"}
    etcd = of_kind(docs, "StatefulSet")["etcd"]["spec"]["template"]["spec"]
    assert {v["name"]: v for v in etcd["volumes"]}["tls"]["secret"]["secretName"] == (
        "accessline-tls-etcd"
    )
    if overlay == "dev":
        assert "*.etcd" in certificates["accessline-tls-etcd"]["dnsNames"]


def test_production_refuses_what_development_allows(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """Production runs as production (its settings refuse development keys and plain
    links) with its issuer's JWKS over HTTPS and every service auditing to the database;
    only the dev overlay runs as development."""
    for overlay, expected in (("prod", "production"), ("dev", "development")):
        for name, deployment in service_deployments(rendered[overlay]).items():
            env = environment(deployment, rendered[overlay])
            assert env["ACCESSLINE_ENVIRONMENT"] == expected, name
            assert "ACCESSLINE_INSECURE" not in env
            if overlay == "prod":
                assert env["ACCESSLINE_AUTH_JWKS_URL"].startswith("https://")
                assert env["ACCESSLINE_AUDIT_DSN"] == "<from secret>", name


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
    from accessline_server.cli import main

    with pytest.raises(SystemExit) as shown:
        main([*migrate["args"], "--help"])
    assert shown.value.code == 0
    # SQLite per pod stays the embedded and dev default.
    dev = container(service_deployments(rendered["dev"])["callmatching"])
    dev_dsn = {item["name"]: item for item in dev["env"]}["ACCESSLINE_HISTORY_DSN"]
    assert dev_dsn["value"].startswith("sqlite")


def test_the_sip_edge_component_renders_valid_and_agrees_with_the_adapter(
    tmp_path: Path,
) -> None:
    """The optional SIP edge: its Kamailio configuration is sip/kamailio.cfg, its
    resources validate, the adapter's variables are its settings and load, and Routing's
    port admits it (as the switch) while its pod reaches Routing."""
    component = ROOT / "k8s/components/sip-edge"
    assert (component / "kamailio.cfg").read_text() == (ROOT / "sip/kamailio.cfg").read_text()
    docs = render_prod_with(component, tmp_path)
    edge = of_kind(docs, "Deployment")["sip-edge"]
    for doc in docs:
        if doc["metadata"]["name"].startswith("sip-edge"):
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    pod = edge["spec"]["template"]
    assert pod["metadata"]["labels"]["accessline.io/caller"] == "switch"
    adapter = next(c for c in pod["spec"]["containers"] if c["name"] == "adapter")
    env = {e["name"]: e.get("value", SECRET_STAND_IN) for e in adapter["env"]}
    fields = {ENV_PREFIX + f.upper() for f in SipEdgeSettings.model_fields}
    assert set(env) <= fields
    settings = SipEdgeSettings.model_validate(
        {k.removeprefix(ENV_PREFIX).lower(): v for k, v in env.items()}
    )
    ports = {p["name"]: p["containerPort"] for p in adapter["ports"]}
    assert ports["health"] == settings.sipedge_health_port
    assert adapter["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "health"}
    assert adapter["livenessProbe"]["httpGet"] == {"path": "/live", "port": "health"}
    config = of_kind(docs, "ConfigMap")
    mounted = next(v for v in pod["spec"]["volumes"] if v["name"] == "kamailio-config")
    assert (
        config[mounted["configMap"]["name"]]["data"]["kamailio.cfg"]
        == (ROOT / "sip/kamailio.cfg").read_text()
    )
    callers = of_kind(docs, "NetworkPolicy")["routing-callers"]["spec"]["ingress"][0]["from"]
    assert {"accessline.io/caller": "switch"} in [
        c.get("podSelector", {}).get("matchLabels") for c in callers
    ]
    egress = of_kind(docs, "NetworkPolicy")["sip-edge"]["spec"]["egress"]
    assert any(
        rule.get("to", [{}])[0].get("podSelector", {}).get("matchLabels")
        == {"app.kubernetes.io/name": "routing"}
        for rule in egress
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_web_ports_admit_only_the_gateway(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    policies = list(of_kind(rendered[overlay], "NetworkPolicy").values())
    web_rules = [
        rule
        for policy in policies
        for rule in policy["spec"].get("ingress", [])
        if "web" in {p.get("port") for p in rule.get("ports", [])}
    ]
    assert web_rules, "no policy opens the web ports"
    for rule in web_rules:
        assert [peer["podSelector"]["matchLabels"] for peer in rule["from"]] == [
            {"accessline.io/web-gateway": "true"}
        ]
