"""The alert rules: valid for Prometheus (`promtool check rules`), right on the series of
their unit tests (`promtool test rules`), the same in the Prometheus Operator's
PrometheusRule, rendered with the monitoring component, and each with a runbook in the
README. test_prometheus.py evaluates them against running services."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from tests.support.kustomize import render_prod_with

MONITORING = ROOT / "k8s/components/monitoring"
RULES = MONITORING / "accessline.rules.yml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is not on this machine: `make check` installs Debian's prometheus")
    return subprocess.run([found, *args], capture_output=True, text=True, check=False)


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_the_rules_are_valid_for_prometheus() -> None:
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


def test_each_alert_fires_on_its_unit_test_series_and_only_there() -> None:
    done = promtool("test", "rules", str(MONITORING / "accessline.test.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\w+)", (MONITORING / "accessline.test.yml").read_text()))
    assert tested == {rule["alert"] for rule in alert_rules()}


def test_the_prometheus_rule_holds_the_same_groups() -> None:
    docs = list(yaml.safe_load_all((MONITORING / "prometheusrule.yaml").read_text()))
    assert len(docs) == 1
    assert docs[0]["kind"] == "PrometheusRule"
    assert docs[0]["spec"] == yaml.safe_load(RULES.read_text())


def test_the_monitoring_component_renders_a_service_monitor_of_every_service(
    tmp_path: Path,
) -> None:
    docs = render_prod_with(MONITORING, tmp_path)
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert len(monitors) == 1
    selected = set(monitors[0]["spec"]["selector"]["matchExpressions"][0]["values"])
    services = {
        d["metadata"]["labels"]["app.kubernetes.io/name"]
        for d in docs
        if d["kind"] == "Service"
        and any(p["name"] == "metrics" for p in d["spec"]["ports"])
        and d["metadata"]["name"] != "otel-collector"
    }
    assert selected == services
    assert [d["kind"] for d in docs].count("PrometheusRule") == 1


def test_every_alert_has_a_runbook_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    headings = set(re.findall(r"^#### Runbook: (\w+)$", readme, re.MULTILINE))
    for rule in alert_rules():
        assert rule["alert"] in headings
        assert rule["annotations"]["runbook"] == f"README.md#runbook-{rule['alert'].lower()}"
