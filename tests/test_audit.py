"""The audit trail against real services: every change to pools, numbers, applications,
agents and the value rules, and every refused call, is one event in the database and the
log, with who, what, when, the outcome and the trace id; `accessline audit` lists them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
from tests.conftest import ROOT, ServiceProcess, connect, eventually, identity
from tests.support.stack import CallPath, call_path_services


def audit_cli(dsn: str, *args: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "accessline_server.cli", "audit", "--dsn", dsn, "--json", *args],
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'gen'}"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


async def changes_allowed_and_refused(services: CallPath) -> None:
    """An admin's changes on NumberDistribution, CallMatching and Presence, an app
    backend's change refused, an anonymous read refused, and an allowed read."""
    nd, cm, pr = services.nd, services.cm, services.pr
    admin = identity().token("olga", "admin")
    backend = identity().token("bank-backend", "app_backend", applications=["bank"])
    async with (
        connect(nd.address, admin) as as_admin,
        connect(nd.address, backend) as as_backend,
        connect(nd.address, "") as anonymous,
        connect(cm.address, admin) as cm_admin,
        connect(pr.address, admin) as pr_admin,
    ):
        numbers: Any = nd_grpc.NumberDistributionServiceStub(as_admin)
        await numbers.CreatePool(
            nd_pb2.CreatePoolRequest(pool=nd_pb2.Pool(pool_id="audited", subjects=["s"]))
        )
        await numbers.AddNumbers(
            nd_pb2.AddNumbersRequest(pool_id="audited", numbers=["+33140001111"])
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await nd_grpc.NumberDistributionServiceStub(as_backend).UpdatePool(
                nd_pb2.UpdatePoolRequest(pool=nd_pb2.Pool(pool_id="audited"))
            )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as nobody:
            await nd_grpc.NumberDistributionServiceStub(anonymous).GetPool(
                nd_pb2.GetPoolRequest(pool_id="audited")
            )
        assert nobody.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await cm_grpc.CallMatchingServiceStub(cm_admin).RegisterApplication(
            cm_pb2.RegisterApplicationRequest(
                application=cm_pb2.Application(
                    application_id="bank", match_schema=common_pb2.MATCH_SCHEMA_NUMBER
                )
            )
        )
        await pr_grpc.PresenceServiceStub(pr_admin).RegisterAgent(
            pr_pb2.RegisterAgentRequest(
                agent=pr_pb2.Agent(
                    agent_id="ann",
                    resource_groups=["g"],
                    channels=[
                        pr_pb2.ChannelConfig(channel=common_pb2.CHANNEL_DESK_VOICE, address="x")
                    ],
                )
            )
        )
        # Reads are not changes: an allowed GetPool is not audited.
        await numbers.GetPool(nd_pb2.GetPoolRequest(pool_id="audited"))


async def test_changes_and_refusals_are_audited_and_listed(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    dsn = f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"
    services = await call_path_services(service_factory, tmp_path, {"ACCESSLINE_AUDIT_DSN": dsn})
    nd = services.nd
    await changes_allowed_and_refused(services)

    expected = {
        ("pool.create", "audited", "OK", "olga"),
        ("numbers.add", "audited", "OK", "olga"),
        ("pool.update", "audited", "PERMISSION_DENIED", "bank-backend"),
        ("call.refused", "", "UNAUTHENTICATED", ""),
        ("application.register", "bank", "OK", "olga"),
        ("agent.register", "ann", "OK", "olga"),
        ("value_rules.load", "", "OK", ""),
    }

    def seen() -> set[tuple[str, str, str, str]]:
        return {
            (
                e["action"],
                e["target"] if e["action"] != "value_rules.load" else "",
                e["outcome"],
                e["subject"],
            )
            for e in audit_cli(dsn)
        }

    await eventually(lambda: seen() == expected, timeout=20, what="every event written")
    events = {e["action"]: e for e in audit_cli(dsn)}
    refused_event = events["pool.update"]
    assert refused_event["roles"] == "app_backend"
    assert refused_event["reason"] == "MISSING_ROLE"
    assert refused_event["method"].endswith("NumberDistributionService/UpdatePool")
    assert len(refused_event["trace_id"]) == 32
    assert events["value_rules.load"]["service"] == "routing"
    assert events["value_rules.load"]["target"].startswith("sha256:")
    # The refusals alone, as a security review asks for them.
    assert {e["outcome"] for e in audit_cli(dsn, "--denied")} == {
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
    }
    # Each is in the log too, as one structured line.
    await eventually(
        lambda: any('"action": "pool.update"' in line for line in nd.lines),
        what="the audit event in NumberDistribution's log",
    )
