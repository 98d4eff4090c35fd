"""The shared runtime in a real process: graceful shutdown on SIGTERM, health that
follows etcd, etcd outages reported as UNAVAILABLE with retry info, and settings errors
that name the bad variable."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2_grpc as nd_grpc
from accessline.presence.v1 import presence_pb2, presence_pb2_grpc
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from accessline_server.runtime.settings import ServiceSettings, SettingsError, load_settings
from tests.conftest import (
    ROOT,
    ServiceProcess,
    connect,
    error_details,
    eventually,
    health_status,
    identity,
    wait_serving,
)

PROBE = "tests.support.probe_service"
Factory = Callable[..., ServiceProcess]


async def test_sigterm_drains_an_in_flight_call_and_refuses_new_ones(
    service_factory: Factory,
) -> None:
    probe = service_factory(
        PROBE,
        PROBE_WORK_SECONDS="1.5",
        ACCESSLINE_SHUTDOWN_GRACE_SECONDS="20",
        ACCESSLINE_SHUTDOWN_DRAIN_DELAY_SECONDS="0",
    )
    await wait_serving(probe)
    async with connect(probe.address) as channel:
        stub: Any = nd_grpc.NumberDistributionServiceStub(channel)
        in_flight = asyncio.ensure_future(
            stub.GetPool(nd_pb2.GetPoolRequest(pool_id="lyon"), timeout=30)
        )
        await probe.wait_for_log("GetPool in flight")

        probe.signal(signal.SIGTERM)
        await probe.wait_for_log("shutting down")
        async with connect(probe.address) as fresh:
            late: Any = nd_grpc.NumberDistributionServiceStub(fresh)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await late.GetPool(nd_pb2.GetPoolRequest(pool_id="paris"), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # A clean refusal the caller can retry elsewhere, not a cut call.
        assert error_details(refused.value)["ErrorInfo"].reason == "SERVER_STOPPING"
        assert error_details(refused.value)["RetryInfo"].retry_delay.ToNanoseconds() > 0

        reply = await in_flight
    assert reply.pool.pool_id == "lyon"
    assert await probe.wait_exit() == 0
    done = [i for i, line in enumerate(probe.lines) if "GetPool done" in line]
    stopped = [i for i, line in enumerate(probe.lines) if '"stopped"' in line]
    assert done
    assert stopped
    assert done[0] < stopped[0]


async def test_sigterm_under_48_concurrent_calls_answers_every_call_received(
    service_factory: Factory,
) -> None:
    probe = service_factory(
        PROBE,
        PROBE_WORK_SECONDS="0.3",
        ACCESSLINE_SHUTDOWN_GRACE_SECONDS="20",
        ACCESSLINE_SHUTDOWN_DRAIN_DELAY_SECONDS="5",
    )
    await wait_serving(probe)
    async with connect(probe.address) as channel:
        stub: Any = nd_grpc.NumberDistributionServiceStub(channel)
        calls = [
            asyncio.ensure_future(stub.GetPool(nd_pb2.GetPoolRequest(pool_id=f"p{i}"), timeout=30))
            for i in range(48)
        ]
        await probe.wait_for_log("GetPool in flight")
        probe.signal(signal.SIGTERM)
        answers = await asyncio.gather(*calls, return_exceptions=True)
        failed = [a.code() for a in answers if isinstance(a, grpc.aio.AioRpcError)]
        assert failed == []
        assert sorted(a.pool.pool_id for a in answers) == sorted(f"p{i}" for i in range(48))
        # Within the drain delay the server reports NOT_SERVING and still serves.
        health: Any = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        late = await stub.GetPool(nd_pb2.GetPoolRequest(pool_id="late"), timeout=30)
        assert late.pool.pool_id == "late"
    assert await probe.wait_exit() == 0


async def test_a_client_that_cancels_is_logged_at_debug_not_as_an_error(
    service_factory: Factory,
) -> None:
    probe = service_factory(PROBE, PROBE_WORK_SECONDS="5", ACCESSLINE_LOG_LEVEL="DEBUG")
    await wait_serving(probe)
    async with connect(probe.address) as channel:
        stub: Any = nd_grpc.NumberDistributionServiceStub(channel)
        unary = stub.GetPool(nd_pb2.GetPoolRequest(pool_id="lyon"), timeout=30)
        await probe.wait_for_log("GetPool in flight")
        unary.cancel()
        presence: Any = presence_pb2_grpc.PresenceServiceStub(channel)
        watch = presence.WatchPresence(presence_pb2.WatchPresenceRequest())
        await watch.read()
        await probe.wait_for_log("WatchPresence open")
        watch.cancel()
    probe.signal(signal.SIGTERM)
    assert await probe.wait_exit() == 0
    logged = await probe.whole_log()
    errors = [line for line in logged if '"level": "ERROR"' in line or "Traceback" in line]
    assert errors == []


async def test_calls_cancelled_in_flight_by_the_hundred_never_bring_the_server_down(
    service_factory: Factory,
) -> None:
    """A switch hanging up calls, agents' apps closing: each call's end is observed (the
    audit trail, the span) after gRPC has dropped the call. Found as a crash (SIGSEGV)
    of Routing under load, when the peer was read from a finished call's context."""
    probe = service_factory(PROBE, PROBE_WORK_SECONDS="5")
    await wait_serving(probe)
    async with connect(probe.address) as channel:
        stub: Any = nd_grpc.NumberDistributionServiceStub(channel)
        presence: Any = presence_pb2_grpc.PresenceServiceStub(channel)
        for _ in range(4):
            calls = [stub.GetPool(nd_pb2.GetPoolRequest(pool_id=f"p{i}")) for i in range(60)]
            streams = [
                presence.WatchPresence(presence_pb2.WatchPresenceRequest()) for _ in range(60)
            ]
            await asyncio.gather(*(s.read() for s in streams))
            for call in (*calls, *streams):
                call.cancel()
        # Still serving, and it stops cleanly.
        assert await health_status(probe.address) == health_pb2.HealthCheckResponse.SERVING
    probe.signal(signal.SIGTERM)
    assert await probe.wait_exit() == 0


async def test_a_replica_holds_at_most_its_maximum_of_streams(service_factory: Factory) -> None:
    probe = service_factory(PROBE, ACCESSLINE_MAX_STREAMS="3")
    await wait_serving(probe)
    async with connect(probe.address) as channel:
        presence: Any = presence_pb2_grpc.PresenceServiceStub(channel)
        # Opened all at once: the limit is checked and counted in one step.
        watches = [presence.WatchPresence(presence_pb2.WatchPresenceRequest()) for _ in range(8)]
        answers = await asyncio.gather(*(w.read() for w in watches), return_exceptions=True)
        refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
        assert len(refused) == 5
        assert {r.code() for r in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert error_details(refused[0])["RetryInfo"].retry_delay.ToNanoseconds() > 0
        # A unary call is not a stream: still served.
        stub: Any = nd_grpc.NumberDistributionServiceStub(channel)
        assert (await stub.GetPool(nd_pb2.GetPoolRequest(pool_id="p"), timeout=10)).pool
        # One closes, one more opens.
        open_ones = [
            w for w, a in zip(watches, answers, strict=True) if not isinstance(a, Exception)
        ]
        open_ones[0].cancel()

        async def another() -> bool:
            late = presence.WatchPresence(presence_pb2.WatchPresenceRequest())
            try:
                return bool((await late.read()).HasField("snapshot"))
            except grpc.aio.AioRpcError:
                return False
            finally:
                late.cancel()

        await eventually(another, what="a stream once another closed")
        for watch in open_ones[1:]:
            watch.cancel()


async def test_sigterm_ends_open_streams_and_tells_health_watchers(
    service_factory: Factory,
) -> None:
    probe = service_factory(PROBE, ACCESSLINE_SHUTDOWN_GRACE_SECONDS="20")
    await wait_serving(probe)
    async with connect(probe.address) as channel:
        presence: Any = presence_pb2_grpc.PresenceServiceStub(channel)
        health: Any = health_pb2_grpc.HealthStub(channel)
        watch = presence.WatchPresence(presence_pb2.WatchPresenceRequest())
        health_watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        first = await watch.read()
        assert first.HasField("snapshot")
        assert (await health_watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        await probe.wait_for_log("WatchPresence open")

        probe.signal(signal.SIGTERM)
        last = await asyncio.wait_for(watch.read(), timeout=15)
        assert last.change.agent_id == "last-before-shutdown"
        assert await asyncio.wait_for(watch.read(), timeout=15) is grpc.aio.EOF
        assert await watch.code() == grpc.StatusCode.OK
        assert (await health_watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    # The stream ended by itself, well before the 20 s grace would have cut it.
    assert await probe.wait_exit(timeout=15) == 0


async def test_health_follows_etcd_and_calls_fail_as_unavailable_while_it_is_down(
    private_etcd: EmbeddedEtcd, service_factory: Factory
) -> None:
    probe = service_factory(
        PROBE,
        etcd_endpoints=private_etcd.endpoint,
        ACCESSLINE_ETCD_HEALTH_INTERVAL_SECONDS="0.2",
        ACCESSLINE_ETCD_TIMEOUT_SECONDS="1",
    )
    await wait_serving(probe)
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    full_name = nd_pb2.DESCRIPTOR.services_by_name["NumberDistributionService"].full_name

    private_etcd.stop()
    await eventually(
        lambda: _status_is(probe.address, full_name, not_serving),
        what="NOT_SERVING while etcd is down",
    )
    assert await health_status(probe.address) == not_serving

    async with connect(probe.address) as channel:
        stub: Any = nd_grpc.NumberDistributionServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetPoolStats(nd_pb2.GetPoolStatsRequest(pool_id="lyon"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    status = rpc_status.from_call(caught.value)
    assert status is not None
    kinds = {d.TypeName(): d for d in status.details}
    retry = error_details_pb2.RetryInfo()
    assert kinds["google.rpc.RetryInfo"].Unpack(retry)
    assert retry.retry_delay.ToNanoseconds() > 0
    info = error_details_pb2.ErrorInfo()
    assert kinds["google.rpc.ErrorInfo"].Unpack(info)
    assert info.reason == "ETCD_UNAVAILABLE"

    private_etcd.start()
    await private_etcd.wait_ready()
    await wait_serving(probe)
    assert await health_status(probe.address, full_name) == health_pb2.HealthCheckResponse.SERVING


async def _status_is(address: str, service: str, want: int) -> bool:
    return await health_status(address, service) == want


def test_settings_reject_bad_values_naming_each_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCESSLINE_PORT", "99999")
    monkeypatch.setenv("ACCESSLINE_ETCD_ENDPOINTS", "etcd-without-port")
    monkeypatch.setenv("ACCESSLINE_ETCD_PREFIX", "no-leading-slash/")
    monkeypatch.setenv("ACCESSLINE_LOG_LEVEL", "chatty")
    with pytest.raises(SettingsError) as caught:
        load_settings(ServiceSettings)
    message = str(caught.value)
    for name in (
        "ACCESSLINE_PORT",
        "ACCESSLINE_ETCD_ENDPOINTS",
        "ACCESSLINE_ETCD_PREFIX",
        "ACCESSLINE_LOG_LEVEL",
    ):
        assert name in message
    assert "'99999'" in message
    assert "host:port" in message


def test_settings_defaults_work_for_the_embedded_run(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("ACCESSLINE_"):
            monkeypatch.delenv(name)
    # Alone, the defaults refuse to run without TLS and tokens, naming what is missing...
    with pytest.raises(SettingsError) as refused:
        load_settings(ServiceSettings)
    for name in ("ACCESSLINE_TLS_CERT_FILE", "ACCESSLINE_AUTH_JWKS_URL"):
        assert name in str(refused.value)
    # ...and with what `make up` gives its services (the development identity) they run.
    for name, value in identity().env("numberdistribution").items():
        monkeypatch.setenv(name, value)
    settings = load_settings(ServiceSettings)
    assert settings.etcd_endpoint_list == ["127.0.0.1:2379"]
    assert settings.log_level == "INFO"
    assert settings.environment == "development"


def test_a_service_with_bad_settings_exits_with_status_2_and_no_traceback() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'gen'}",
        "ACCESSLINE_PORT": "-1",
        "ACCESSLINE_SHUTDOWN_GRACE_SECONDS": "forever",
    }
    done = subprocess.run(
        [sys.executable, "-m", "accessline_server.routing"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "ACCESSLINE_PORT" in done.stderr
    assert "ACCESSLINE_SHUTDOWN_GRACE_SECONDS" in done.stderr
    assert "Traceback" not in done.stderr


def production(**overrides: str) -> dict[str, str]:
    """Settings of a production NumberDistribution, but for what `overrides` change."""
    env = {
        **identity().env("numberdistribution"),
        "ACCESSLINE_ENVIRONMENT": "production",
        "ACCESSLINE_AUTH_JWKS_URL": "https://issuer.example.invalid/jwks.json",
        "ACCESSLINE_ETCD_CA_FILE": str(identity().files.ca),
        "ACCESSLINE_ETCD_CERT_FILE": str(identity().files.cert("numberdistribution")),
        "ACCESSLINE_ETCD_KEY_FILE": str(identity().files.key("numberdistribution")),
        "ACCESSLINE_AUDIT_DSN": "postgresql+asyncpg://audit@db.example.invalid/accessline",
        "ACCESSLINE_NUMBERS_SECRET": "a-secret-of-the-operators-own-0123456789",
        **overrides,
    }
    return {k: v for k, v in env.items() if v}


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"ACCESSLINE_AUTH_JWKS_URL": "http://issuer.example.invalid/jwks.json"}, "https"),
        ({"ACCESSLINE_ETCD_CERT_FILE": "", "ACCESSLINE_ETCD_KEY_FILE": ""}, "ETCD_CERT_FILE"),
        ({"ACCESSLINE_AUDIT_DSN": ""}, "ACCESSLINE_AUDIT_DSN"),
        ({"ACCESSLINE_NUMBERS_SECRET": ""}, "ACCESSLINE_NUMBERS_SECRET"),
        ({"ACCESSLINE_TLS_CERT_FILE": ""}, "ACCESSLINE_TLS_CERT_FILE"),
    ],
    ids=["jwks over http", "etcd without a certificate", "no audit", "dev secret", "no tls"],
)
def test_production_settings_refuse_what_development_allows(
    monkeypatch: pytest.MonkeyPatch, overrides: dict[str, str], named: str
) -> None:
    from accessline_server.numberdistribution.settings import NumberDistributionSettings

    for name in list(os.environ):
        if name.startswith("ACCESSLINE_"):
            monkeypatch.delenv(name)
    for name, value in production().items():
        monkeypatch.setenv(name, value)
    load_settings(NumberDistributionSettings)  # the complete production settings load
    for name in overrides:
        monkeypatch.delenv(name, raising=False)
    for name, value in production(**overrides).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as refused:
        load_settings(NumberDistributionSettings)
    assert named in str(refused.value)
    # ACCESSLINE_INSECURE is the one explicit way to run without TLS and tokens.
    monkeypatch.setenv("ACCESSLINE_INSECURE", "true")
    if named in ("https", "ETCD_CERT_FILE", "ACCESSLINE_TLS_CERT_FILE"):
        load_settings(NumberDistributionSettings)
    else:  # secrets and the audit trail are not relaxed by it
        with pytest.raises(SettingsError):
            load_settings(NumberDistributionSettings)


def test_a_production_service_refuses_the_development_ca() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'gen'}",
        **production(),
    }
    done = subprocess.run(
        [sys.executable, "-m", "accessline_server.numberdistribution"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "ACCESSLINE_TLS_CA_FILE is the development CA" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "module",
    [
        "accessline_server.numberdistribution",
        "accessline_server.callmatching",
        "accessline_server.presence",
        "accessline_server.routing",
        "accessline_server.notification",
    ],
)
async def test_a_service_started_while_etcd_is_down_waits_for_it_and_then_serves(
    private_etcd: EmbeddedEtcd, service_factory: Factory, module: str
) -> None:
    """A service started before etcd can be reached (a cluster still electing, a node
    booting) reports NOT_SERVING and serves once etcd is back, instead of exiting
    (Notification's delivery worker asked etcd for its lease at start, and exited)."""
    private_etcd.stop()
    service = service_factory(
        module,
        etcd_endpoints=private_etcd.endpoint,
        ACCESSLINE_ETCD_TIMEOUT_SECONDS="1",
    )
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING

    async def waiting() -> bool:
        assert service.process.poll() is None, "\n".join(service.lines[-20:])
        try:
            return await health_status(service.address) == not_serving
        except grpc.aio.AioRpcError:
            return False

    await eventually(waiting, timeout=30, what="NOT_SERVING while etcd is down")
    private_etcd.start()
    await private_etcd.wait_ready()
    await wait_serving(service)
