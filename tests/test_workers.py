"""Several worker processes of one service on one port (`ACCESSLINE_WORKERS`), as real
processes against a real etcd: the kernel spreads connections over the workers, a
SIGTERM stops them all, and a worker that dies takes the others down with it."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import pytest

from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2_grpc as nd_grpc
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from accessline_server.runtime.settings import ServiceSettings, SettingsError, load_settings
from tests.conftest import ServiceProcess, connect, identity, spawn_service, wait_serving
from tests.support.waiting import eventually

MODULE = "accessline_server.numberdistribution"


def logged(service: ServiceProcess, message: str) -> list[dict[str, Any]]:
    found = []
    for line in list(service.lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("message") == message:
            found.append(entry)
    return found


def workers_serving(service: ServiceProcess) -> set[int]:
    return {e["worker"] for e in logged(service, "serving")}


async def two_workers(etcd: EmbeddedEtcd, prefix: str) -> tuple[ServiceProcess, dict[str, Any]]:
    """The service started with two workers, both serving; its supervisor's log line."""
    service = spawn_service(MODULE, etcd.endpoint, prefix, ACCESSLINE_WORKERS="2")
    try:
        await wait_serving(service)
        await eventually(lambda: workers_serving(service) == {0, 1}, what="both workers")
    except BaseException:
        service.stop()
        raise
    (supervisor,) = logged(service, "supervising workers")
    return service, supervisor


async def test_workers_share_the_port_and_stop_together_on_sigterm(
    etcd: EmbeddedEtcd, prefix: str
) -> None:
    service, supervisor = await two_workers(etcd, prefix)
    try:
        assert len(supervisor["pids"]) == 2
        # Each new connection is one the kernel gives to either worker.
        for _ in range(24):
            async with connect(service.address) as channel:
                stub: Any = nd_grpc.NumberDistributionServiceStub(channel)
                await stub.ListPools(nd_pb2.ListPoolsRequest(), timeout=10)
        answered = {e.get("worker") for e in logged(service, "call") if "ListPools" in e["method"]}
        assert answered == {0, 1}
        service.signal(signal.SIGTERM)
        assert await service.wait_exit() == 0
        assert {e.get("worker") for e in logged(service, "stopped")} == {0, 1}
    finally:
        service.stop()


async def test_a_worker_that_dies_takes_the_others_down_with_it(
    etcd: EmbeddedEtcd, prefix: str
) -> None:
    service, supervisor = await two_workers(etcd, prefix)
    try:
        os.kill(supervisor["pids"][0], signal.SIGKILL)
        assert await service.wait_exit() == 128 + signal.SIGKILL
        (told,) = logged(service, "a worker exited on its own; stopping the others")
        assert told["pid"] == supervisor["pids"][0]
        assert len(logged(service, "stopped")) == 1  # the other, stopped as asked
    finally:
        service.stop()


def test_several_workers_need_a_fixed_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers on "any free port" would each get a port of their own: refused."""
    for name, value in identity().env("numberdistribution").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ACCESSLINE_PORT", "0")
    monkeypatch.setenv("ACCESSLINE_WORKERS", "2")
    with pytest.raises(SettingsError) as caught:
        load_settings(ServiceSettings)
    assert "ACCESSLINE_WORKERS above 1 needs a fixed ACCESSLINE_PORT" in str(caught.value)
    monkeypatch.setenv("ACCESSLINE_PORT", "50099")
    assert load_settings(ServiceSettings).workers == 2
