"""The gRPC server bootstrap every service runs on: health (NOT_SERVING while etcd is
unreachable), reflection, interceptors, and a graceful shutdown on SIGTERM/SIGINT that
stops accepting, drains in-flight calls, ends streams and flushes telemetry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import grpc
import uvloop
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry.metrics import Observation

from accessline_server.runtime import reflection, web
from accessline_server.runtime.access import Access, observers
from accessline_server.runtime.audit import AuditTrail, observer
from accessline_server.runtime.errors import AccesslineError
from accessline_server.runtime.identity import Authorizer, JwksKeys, TokenVerifier, acting_as
from accessline_server.runtime.interceptor import ErrorInterceptor, InFlight
from accessline_server.runtime.logs import setup_logging
from accessline_server.runtime.pages import Pages, Site
from accessline_server.runtime.peers import peer_channel
from accessline_server.runtime.settings import ServiceSettings, SettingsError, load_settings
from accessline_server.runtime.store import EtcdTls, Store
from accessline_server.runtime.telemetry import (
    Telemetry,
    client_interceptors,
    setup_telemetry,
)
from accessline_server.runtime.tls import channel_credentials, check_production, server_credentials
from accessline_server.runtime.validation import invalid_times
from accessline_server.runtime.workers import supervise, worker_index

log = logging.getLogger("accessline.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
# Health service name that answers SERVING while the process runs, whatever etcd does.
LIVENESS = "liveness"
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# A stopping server closes once no call has been in flight for this long: calls already
# received but still queued in the transport are picked up and answered meanwhile.
DRAIN_QUIET_SECONDS = 0.2
# Biggest message a client may send; field limits are checked inside, this stops abuse
# before a request is even parsed.
MAX_RECEIVE_MESSAGE_BYTES = 4 * 1024 * 1024


def open_store(settings: ServiceSettings) -> Store:
    """The process's etcd store, on every configured member, over TLS when configured."""
    tls = None
    if settings.etcd_ca_file:
        tls = EtcdTls(
            ca=Path(settings.etcd_ca_file).read_bytes(),
            cert=Path(settings.etcd_cert_file).read_bytes() if settings.etcd_cert_file else None,
            key=Path(settings.etcd_key_file).read_bytes() if settings.etcd_key_file else None,
            server_name=settings.etcd_server_name,
        )
    return Store(
        settings.etcd_endpoint_list,
        settings.etcd_prefix,
        settings.etcd_timeout_seconds,
        tls=tls,
        reconnect_backoff_max=settings.etcd_reconnect_backoff_max_seconds,
        group_commit=settings.etcd_group_commit,
    )


def accessline_version() -> str:
    try:
        return version("accessline")
    except PackageNotFoundError:
        return "0.0.0+unknown"


# The context a servicer method is given (requests and responses are typed by the
# method's own signature).
ServicerContext = grpc.aio.ServicerContext[Any, Any]


HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"]


class HealthServicer(health.aio.HealthServicer):
    """The standard health service, with `List` (grpcio's answers UNIMPLEMENTED): every
    name it answers for and its status, as `Check` would give them."""

    async def List(self, request: Any, context: Any) -> Any:
        # The health stubs predate List: its messages are looked up, untyped.
        listed: Any = health_pb2.HealthListResponse  # type: ignore[attr-defined]
        statuses = dict(self._server_status)  # type: ignore[attr-defined]
        return listed(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in statuses.items()
            }
        )


@dataclass(frozen=True)
class Registration:
    """One gRPC service a process serves: its servicer, the generated `add_*_to_server`
    function and the service's descriptor (for health and reflection)."""

    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    descriptor: ServiceDescriptor


@dataclass
class RuntimeContext:
    """What the runtime hands a service when it builds its servicers."""

    settings: ServiceSettings
    store: Store
    telemetry: Telemetry
    # Set when shutdown begins: streams should send their last message and return.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    # Channels to other services, closed by the runtime on shutdown.
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    # Run after the server stopped and before etcd is closed, last registered first.
    cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # The process's health service, for components with a health of their own.
    health: Any = None
    # Static pages the web port serves: path prefix (ending with "/") to site.
    web_pages: dict[str, Site] = field(default_factory=dict)
    # This service's certificate for its peers (mutual TLS); None when insecure.
    credentials: grpc.ChannelCredentials | None = None
    # The audit trail (set by the runtime before the services are built).
    audit: AuditTrail = field(default_factory=lambda: AuditTrail("", create_schema=False))

    def on_stop(self, cleanup: Callable[[], Awaitable[None]]) -> None:
        self.cleanups.append(cleanup)

    async def report_health(self, component: str, serving: bool) -> None:
        """Health of a component the service can work without (checked by its own name
        in the health service; the server's overall status does not follow it)."""
        if self.health is not None:
            await self.health.set(component, SERVING if serving else NOT_SERVING)

    def channel(self, address: str, service: ServiceDescriptor) -> grpc.aio.Channel:
        """An instrumented channel to a peer service's replicas (trace context
        propagates), balanced and retried as its contract allows (see peers.py)."""
        ch = peer_channel(
            address, service, self.peer_timeout, client_interceptors(), self.credentials
        )
        self.channels.append(ch)
        return ch

    @property
    def peer_timeout(self) -> float:
        """The deadline of a call to another service: a few etcd requests' worth."""
        return self.settings.etcd_timeout_seconds * 2


Builder = Callable[[RuntimeContext], Awaitable[Sequence[Registration]]]


@dataclass(frozen=True)
class ServiceSpec:
    """A service process: its short name (used in logs, metrics and the OTel service
    name) and the builder of its servicers."""

    name: str
    build: Builder


class ServiceRuntime:
    """Runs one service process's gRPC server until it is told to stop."""

    def __init__(self, spec: ServiceSpec, settings: ServiceSettings) -> None:
        self.spec = spec
        self.settings = settings
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._health = HealthServicer()
        self._service_names: list[str] = []
        self._context: RuntimeContext | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._etcd_ok: bool | None = None
        self._errors = ErrorInterceptor(InFlight(settings.max_streams), screen=invalid_times)
        self._stopping_started = False
        self._jwks: JwksKeys | None = None
        self._probes: grpc.aio.Server | None = None
        self._web: web.WebServer | None = None
        self._authorizer = self._make_authorizer()

    @property
    def context(self) -> RuntimeContext:
        assert self._context is not None, "start() first"
        return self._context

    async def start(self) -> int:
        settings = self.settings
        telemetry = setup_telemetry(
            self.spec.name,
            accessline_version(),
            metrics_host=settings.host,
            metrics_port=settings.metrics_port + (worker_index() or 0)
            if settings.metrics_port
            else 0,
            sample_ratio=settings.trace_sample_ratio,
        )
        check_production(settings)
        store = open_store(settings)
        await store.connect()
        self._context = RuntimeContext(
            settings=settings,
            store=store,
            telemetry=telemetry,
            health=self._health,
            credentials=None if settings.insecure else channel_credentials(settings),
        )
        trail = AuditTrail(
            settings.audit_dsn.get_secret_value(),
            create_schema=settings.environment == "development",
            on_health=self._audit_health,
            meter=telemetry.meter("accessline.audit"),
        )
        await trail.start()
        self._context.audit = trail
        self._context.on_stop(trail.stop)
        registrations = await self.spec.build(self._context)
        self._authorizer.register(reg.descriptor for reg in registrations)
        self._errors.admit = self._admit
        access = Access(telemetry.meter("accessline.rpc"), log_calls=settings.access_log)
        self._errors.observe = observers(access, observer(trail, self._authorizer))

        telemetry.meter("accessline.runtime").create_observable_gauge(
            "accessline.etcd.reachable",
            callbacks=[lambda _: self._observe_etcd()],
            description="1 while etcd answers this replica's health checks, 0 while it does not",
        )
        server = self._grpc_server(registrations)
        if settings.health_port:
            await self._start_probe_server()
        if settings.web_port:
            await self._start_web_server(registrations)
        # Not serving until etcd has answered once.
        await self._set_health(NOT_SERVING)
        await server.start()
        self._server = server
        # Kubernetes' liveness probe asks for this name: alive even while etcd is away.
        await self._health.set(LIVENESS, SERVING)
        await self._check_etcd()
        self._monitor = asyncio.create_task(self._monitor_etcd(), name="etcd-health")
        log.info(
            "serving",
            extra={
                "fields": {
                    "address": f"{settings.host}:{self.port}",
                    "services": self._service_names,
                }
            },
        )
        return self.port

    def _grpc_server(self, registrations: Sequence[Registration]) -> grpc.aio.Server:
        """The gRPC server with the services, health and reflection, listening on the
        configured port (TLS unless insecure); `port` is set to the port it got."""
        settings = self.settings
        server = grpc.aio.server(
            interceptors=[self._errors],
            options=[
                ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
                # Shared by the workers of one host; otherwise a port taken is an error.
                ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
            ],
        )
        for reg in registrations:
            reg.add_to_server(reg.servicer, server)
            self._service_names.append(reg.descriptor.full_name)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        for servicer, add, _ in reflection.registrations(
            [*self._service_names, HEALTH_SERVICE.full_name]
        ):
            add(servicer, server)
        address = f"{settings.host}:{settings.port}"
        if settings.insecure:
            log.warning(
                "ACCESSLINE_INSECURE is set: plain-text gRPC, and no caller is authenticated"
            )
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, server_credentials(settings))
        if self.port == 0:
            raise OSError(f"cannot listen on {settings.host}:{settings.port}")
        return server

    def _make_authorizer(self) -> Authorizer:
        settings = self.settings
        if settings.insecure:
            return Authorizer(None, {}, insecure=True)
        keys = JwksKeys(
            settings.auth_jwks_url,
            ca_file=settings.auth_jwks_ca_file,
            refuse_development=settings.environment == "production",
        )
        self._jwks = keys
        verifier = TokenVerifier(
            keys,
            issuer=settings.auth_issuer,
            audience=settings.auth_audience,
            algorithms=tuple(a.strip() for a in settings.auth_algorithms.split(",")),
            leeway=settings.auth_clock_skew_seconds,
        )
        return Authorizer(verifier, {})

    async def _audit_health(self, ok: bool) -> None:
        await self.context.report_health("audit", ok)

    async def _admit(self, method: str, context: Any, request: Any) -> None:
        # The call's own task holds the caller until the call ends: nothing to undo.
        acting_as(await self._authorizer.admit(method, context, request))

    async def _start_probe_server(self) -> None:
        """The health service alone, in plain text, for probes that cannot do mutual TLS.
        It tells whether the service is up, nothing more."""
        probes = grpc.aio.server(
            options=[("grpc.so_reuseport", 1 if self.settings.workers > 1 else 0)]
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, probes)
        address = f"{self.settings.host}:{self.settings.health_port}"
        if probes.add_insecure_port(address) == 0:
            raise OSError(f"cannot listen on {address}")
        await probes.start()
        self._probes = probes

    async def _start_web_server(self, registrations: Sequence[Registration]) -> None:
        """The same services, health and reflection over Connect and gRPC-Web (web.py),
        through the same interceptor as the gRPC port."""
        settings = self.settings
        served: list[tuple[Any, Any, Any]] = [
            (reg.servicer, reg.add_to_server, reg.descriptor) for reg in registrations
        ]
        served += [
            (self._health, health_pb2_grpc.add_HealthServicer_to_server, HEALTH_SERVICE),
            *reflection.registrations([*self._service_names, HEALTH_SERVICE.full_name]),
        ]
        app = web.application(
            await web.endpoints(served, self._errors.intercept_service),
            MAX_RECEIVE_MESSAGE_BYTES,
        )
        for prefix, site in self.context.web_pages.items():
            app = Pages(app, prefix, site)
        app = web.Cors(app, [o.strip() for o in settings.web_cors_origins.split(",") if o.strip()])
        tls = None
        if not settings.insecure:
            tls = web.tls_files(
                settings.web_tls_cert_file or settings.tls_cert_file,
                settings.web_tls_key_file or settings.tls_key_file,
            )
        self._web = web.WebServer(
            app,
            settings.host,
            settings.web_port,
            tls,
            settings.shutdown_grace_seconds,
            reuse_port=settings.workers > 1,
        )
        await self._web.start()

    async def _set_health(self, status: int) -> None:
        for name in ["", *self._service_names]:
            await self._health.set(name, status)

    def _observe_etcd(self) -> list[Observation]:
        return [] if self._etcd_ok is None else [Observation(int(self._etcd_ok))]

    async def _check_etcd(self) -> None:
        try:
            await self.context.store.ping()
            ok = True
        except AccesslineError as exc:
            ok = False
            if self._etcd_ok is not False:
                log.warning(
                    "etcd unreachable; health is NOT_SERVING",
                    extra={"fields": {"error": exc.message}},
                )
        if ok and self._etcd_ok is not True:
            log.info("etcd reachable; health is SERVING")
        if ok != self._etcd_ok:
            self._etcd_ok = ok
            await self._set_health(SERVING if ok else NOT_SERVING)

    async def _monitor_etcd(self) -> None:
        interval = self.settings.etcd_health_interval_seconds
        while not self.context.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.context.stopping.wait(), interval)
            if not self.context.stopping.is_set():
                await self._check_etcd()

    async def stop(self) -> None:
        """Graceful shutdown that loses nothing: NOT_SERVING at once while calls are
        still served for the drain delay (load balancers move away); then streams are
        told to finish, every call received is answered within the grace period, new
        ones are refused, and etcd is closed and telemetry flushed last."""
        if self._context is None or self._stopping_started:
            await self._stopped.wait()
            return
        self._stopping_started = True
        grace = self.settings.shutdown_grace_seconds
        delay = self.settings.shutdown_drain_delay_seconds
        log.info(
            "shutting down",
            extra={"fields": {"grace_seconds": grace, "drain_delay_seconds": delay}},
        )
        await self._health.enter_graceful_shutdown()
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        if delay:
            await asyncio.sleep(delay)
        # From now on a new call is answered UNAVAILABLE with a retry delay, and every call
        # already taken is answered before the server closes.
        self._errors.in_flight.closed = True
        self.context.stopping.set()
        started = time.monotonic()
        if not await self._errors.in_flight.drained(DRAIN_QUIET_SECONDS, grace):
            log.warning(
                "calls still in flight at the end of the grace period",
                extra={"fields": {"in_flight": self._errors.in_flight.count}},
            )
        if self._server is not None:
            await self._server.stop(max(0.0, grace - (time.monotonic() - started)))
        if self._web is not None:
            await self._web.stop()
        if self._probes is not None:
            await self._probes.stop(0)
        if self._jwks is not None:
            await self._jwks.close()
        for cleanup in reversed(self.context.cleanups):
            await cleanup()
        for channel in self.context.channels:
            await channel.close()
        # What lives only as long as this replica (calls it holds, streams it serves) ends
        # now rather than when the lease would run out.
        with contextlib.suppress(AccesslineError):
            await self.context.store.release_process_lease()
        await self.context.store.close()
        log.info("stopped")
        self.context.telemetry.tracer_provider.force_flush()
        self.context.telemetry.meter_provider.force_flush()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def serve(spec: ServiceSpec, settings: ServiceSettings) -> None:
    """Runs a service until SIGTERM or SIGINT, then shuts it down gracefully."""
    runtime = ServiceRuntime(spec, settings)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    await runtime.start()
    await stop_requested.wait()
    await runtime.stop()


def run(spec: ServiceSpec, settings_type: type[ServiceSettings]) -> None:
    """Entry point of a service process: bad settings exit with status 2 and a message
    naming each bad variable."""
    try:
        settings = load_settings(settings_type)
    except SettingsError as exc:
        print(f"accessline {spec.name}: {exc}", file=sys.stderr)
        sys.exit(2)
    worker = worker_index()
    setup_logging(spec.name, settings.log_level, worker)
    if settings.workers > 1 and worker is None:
        sys.exit(supervise(settings.workers))
    loop_factory = uvloop.new_event_loop if settings.event_loop == "uvloop" else None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(spec, settings))
    except SettingsError as exc:
        print(f"accessline {spec.name}: {exc}", file=sys.stderr)
        sys.exit(2)
    # Spans and metrics queued during shutdown go out last.
    telemetry = setup_telemetry(spec.name, accessline_version())
    telemetry.shutdown()
