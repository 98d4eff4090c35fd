"""Connect and gRPC-Web next to native gRPC, for browsers and for backends that speak
HTTP: every service a process serves (with health and reflection) on a second port,
through the same handlers and the same server interceptor as native gRPC, so a call over
HTTP is admitted (bearer token and access policy), screened, counted in flight and
against the stream limit, traced, audited, and refused with the same status and rich
details as it would be over gRPC.

The protocols are connectrpc's (the Connect project's Python runtime), served by
hypercorn: Connect (JSON or binary; unary over HTTP/1.1 or HTTP/2, server streams over
both, client and bidirectional streams over HTTP/2 only) and gRPC-Web (unary and server
streams). A caller over HTTP is identified by its bearer token only: there is no client
certificate, so the calls only services may make (NumberDistribution's reservations for
CallMatching, say) are refused over HTTP whatever the token. Browsers are let in from
the configured origins only (CORS)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc
from connectrpc.code import Code
from connectrpc.compat import google_protobuf_codecs
from connectrpc.errors import ConnectError, ErrorDetail
from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType
from connectrpc.request import RequestContext
from connectrpc.server import ConnectASGIApplication, Endpoint
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass
from google.rpc import status_pb2
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig
from protobuf.wkt import Any as AnyDetail

log = logging.getLogger("accessline.web")

# How long the rest of a request to a path not served is read after its 404.
UNKNOWN_PATH_DRAIN_SECONDS = 5.0
# A browser may cache a preflight's answer this long.
PREFLIGHT_MAX_AGE_SECONDS = 7200
# What a browser may send and read beyond the simple headers (Connect's and gRPC-Web's).
ALLOWED_HEADERS = (
    "authorization, content-type, connect-protocol-version, connect-timeout-ms,"
    " connect-accept-encoding, connect-content-encoding, grpc-timeout, x-grpc-web,"
    " x-user-agent, traceparent, tracestate, accessline-agent"
)
EXPOSED_HEADERS = "grpc-status, grpc-message, grpc-status-details-bin, connect-content-encoding"

# Where a status's rich details travel in gRPC's trailing metadata.
DETAILS_KEY = "grpc-status-details-bin"
_CODES = {
    status: Code[status.name] for status in grpc.StatusCode if status.name in Code.__members__
}
_CODES[grpc.StatusCode.CANCELLED] = Code.CANCELED
_IDEMPOTENCY = {
    descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS: IdempotencyLevel.NO_SIDE_EFFECTS,
    descriptor_pb2.MethodOptions.IDEMPOTENT: IdempotencyLevel.IDEMPOTENT,
}


class WebAbort(grpc.aio.AbortError):
    """A call over HTTP ended with a status (what `abort` raises in grpc.aio)."""

    def __init__(self, status: grpc.Status) -> None:
        super().__init__(status.details)
        self.status = status

    def connect_error(self) -> ConnectError:
        """The same status for the Connect runtime: code, message and rich details."""
        code = _CODES.get(self.status.code, Code.UNKNOWN)
        details: list[ErrorDetail] = []
        for key, value in self.status.trailing_metadata or ():
            if key == DETAILS_KEY:
                packed = status_pb2.Status.FromString(value)
                details = [
                    ErrorDetail(AnyDetail(type_url=d.type_url, value=d.value))
                    for d in packed.details
                ]
        return ConnectError(code, self.status.details or "", details)


@dataclass(frozen=True)
class _Status(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...] = ()


class WebCallContext:
    """The servicer context of a call that came over HTTP: what the handlers and the
    server interceptor ask of a grpc.aio context, answered from the HTTP request."""

    def __init__(self, ctx: RequestContext[Any, Any]) -> None:
        self._ctx = ctx
        self._metadata = tuple(
            (key.lower(), value)
            for key, value in ctx.request_headers.allitems()
            if not key.startswith(":")
        )
        timeout = ctx.timeout_ms
        self._deadline = None if timeout is None else time.monotonic() + timeout / 1000

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return f"http:{self._ctx.client_address or 'unknown'}"

    def auth_context(self) -> dict[str, list[bytes]]:
        # No client certificate over HTTP: the caller is its bearer token.
        return {}

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    async def send_initial_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        return None

    async def abort_with_status(self, status: grpc.Status) -> None:
        raise WebAbort(status)

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Sequence[tuple[str, str | bytes]] = (),
    ) -> None:
        raise WebAbort(_Status(code, details, tuple(trailing_metadata)))

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False


class _Handlers:
    """Collects the method handlers a generated `add_*_to_server` function registers."""

    def __init__(self) -> None:
        self.by_service: dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]] = {}

    def add_generic_rpc_handlers(self, handlers: Iterable[Any]) -> None:
        return None

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.by_service[service] = handlers


Intercept = Callable[
    [Callable[[grpc.HandlerCallDetails], Awaitable[Any]], grpc.HandlerCallDetails],
    Awaitable[Any],
]


class _Details:
    """What the interceptor is told of a method (the call's metadata is the context's)."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata: tuple[tuple[str, str | bytes], ...] = ()


def _method_info(service: ServiceDescriptor, name: str) -> MethodInfo[Any, Any]:
    method = service.methods_by_name[name]
    if method.client_streaming and method.server_streaming:
        kind = StreamType.BIDI_STREAM
    elif method.client_streaming:
        kind = StreamType.CLIENT_STREAM
    elif method.server_streaming:
        kind = StreamType.SERVER_STREAM
    else:
        kind = StreamType.UNARY
    level = _IDEMPOTENCY.get(method.GetOptions().idempotency_level, IdempotencyLevel.UNKNOWN)
    return MethodInfo(
        name=name,
        service_name=service.full_name,
        input=GetMessageClass(method.input_type),
        output=GetMessageClass(method.output_type),
        idempotency_level=level,
        stream_type=kind,
    )


def _screened(handler: grpc.RpcMethodHandler[Any, Any], message: Any) -> Any:
    """The message as the native server would hand it over: through the interceptor's
    deserializer, which screens it (times protobuf cannot hold, field limits)."""
    parse = handler.request_deserializer
    return message if parse is None else parse(message.SerializeToString())


async def _screened_stream(
    handler: grpc.RpcMethodHandler[Any, Any], requests: AsyncIterator[Any]
) -> AsyncIterator[Any]:
    async for message in requests:
        yield _screened(handler, message)


@contextlib.contextmanager
def _as_connect_error() -> Iterator[None]:
    """A status the call ended with, raised as the Connect runtime's error."""
    try:
        yield
    except WebAbort as abort:
        raise abort.connect_error() from None


def _endpoint(info: MethodInfo[Any, Any], handler: grpc.RpcMethodHandler[Any, Any]) -> Any:
    """The Connect endpoint of a method: the intercepted gRPC handler, called with the
    HTTP call's context; its status, if it ends with one, as a Connect error."""
    streamed_in = handler.stream_unary is not None or handler.stream_stream is not None
    behavior: Any = (
        handler.unary_unary or handler.stream_unary or handler.unary_stream or handler.stream_stream
    )

    def requests(received: Any) -> Any:
        if streamed_in:
            return _screened_stream(handler, received)
        return _screened(handler, received)

    if handler.unary_unary is not None or handler.stream_unary is not None:

        async def answer(received: Any, ctx: RequestContext[Any, Any]) -> Any:
            with _as_connect_error():
                return await behavior(requests(received), WebCallContext(ctx))

        one = Endpoint.client_stream if streamed_in else Endpoint.unary
        return one(method=info, function=answer)

    async def stream(received: Any, ctx: RequestContext[Any, Any]) -> AsyncIterator[Any]:
        with _as_connect_error():
            async for item in behavior(requests(received), WebCallContext(ctx)):
                yield item

    many = Endpoint.bidi_stream if streamed_in else Endpoint.server_stream
    return many(method=info, function=stream)


class _Application(ConnectASGIApplication[None]):
    """The Connect application of every method the process serves."""

    def __init__(self, endpoints: dict[str, Any], read_max_bytes: int) -> None:
        super().__init__(
            service=None,
            endpoints=lambda _: endpoints,
            read_max_bytes=read_max_bytes,
            codecs=google_protobuf_codecs(),
        )

    @property
    def path(self) -> str:
        return "/"


def application(found: dict[str, Any], read_max_bytes: int) -> Any:
    """The Connect application of the endpoints given. A path it does not serve is
    answered 404 at once, but the answer ends only once the client stopped sending (or
    after a few seconds): hypercorn, receiving data for an HTTP/2 stream it already
    ended, drops the whole connection with the client's other calls (pgjones/hypercorn
    #329), and `buf curl` asks for reflection v1, then v1alpha, on one connection."""
    connect = _Application(found, read_max_bytes)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in found:
            await connect(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 404, "headers": []})
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(UNKNOWN_PATH_DRAIN_SECONDS):
                while True:
                    message = await receive()
                    if message["type"] != "http.request" or not message.get("more_body"):
                        break
        await send({"type": "http.response.body", "body": b""})

    return app


async def endpoints(
    services: Sequence[tuple[Any, Callable[[Any, Any], None], ServiceDescriptor]],
    intercept: Intercept,
) -> dict[str, Any]:
    """Every method of the services given (servicer, `add_*_to_server`, descriptor),
    each handler wrapped by the server interceptor as the native server wraps it."""
    found: dict[str, Any] = {}
    for servicer, add_to_server, descriptor in services:
        handlers = _Handlers()
        add_to_server(servicer, handlers)
        for name, handler in handlers.by_service[descriptor.full_name].items():
            path = f"/{descriptor.full_name}/{name}"

            async def same(_: grpc.HandlerCallDetails, h: Any = handler) -> Any:
                return h

            wrapped = await intercept(same, cast("grpc.HandlerCallDetails", _Details(path)))
            found[path] = _endpoint(_method_info(descriptor, name), wrapped)
    return found


class Cors:
    """Lets browsers from the configured origins call (and read the statuses of) the
    application; a preflight from elsewhere is answered 403, and a request from
    elsewhere goes through without the headers a browser needs to hand it to its page."""

    def __init__(self, app: Any, origins: Iterable[str]) -> None:
        self._app = app
        self._origins = {o.rstrip("/") for o in origins}

    def _allowed(self, scope: dict[str, Any]) -> str:
        for key, value in scope.get("headers", ()):
            if key == b"origin":
                origin = value.decode("latin-1").rstrip("/")
                return origin if origin in self._origins or "*" in self._origins else ""
        return ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        origin = self._allowed(scope)
        if scope["method"] == "OPTIONS":
            status = 204 if origin else 403
            headers = [(b"vary", b"origin")]
            if origin:
                headers += [
                    (b"access-control-allow-origin", origin.encode()),
                    (b"access-control-allow-methods", b"POST, GET"),
                    (b"access-control-allow-headers", ALLOWED_HEADERS.encode()),
                    (b"access-control-max-age", str(PREFLIGHT_MAX_AGE_SECONDS).encode()),
                ]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        if not origin:
            await self._app(scope, receive, send)
            return

        async def with_cors(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [
                        *message.get("headers", ()),
                        (b"access-control-allow-origin", origin.encode()),
                        (b"access-control-expose-headers", EXPOSED_HEADERS.encode()),
                        (b"vary", b"origin"),
                    ],
                }
            await send(message)

        await self._app(scope, receive, with_cors)


class WebServer:
    """The HTTP port of a service process: hypercorn serving the Connect application,
    over TLS unless the process is insecure."""

    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        tls: tuple[str, str] | None,
        grace: float,
        *,
        reuse_port: bool = False,
    ) -> None:
        self._app = app
        self._host, self._port = host, port
        self._reuse_port = reuse_port  # shared by the workers of one host
        self._config = HypercornConfig()
        self._config.accesslog = None
        self._config.errorlog = logging.getLogger("accessline.web.server")
        self._config.graceful_timeout = grace
        # Streams live as long as their callers want (an agent's whole shift).
        self._config.keep_alive_timeout = 3600
        if tls is not None:
            self._config.certfile, self._config.keyfile = tls
            self._config.alpn_protocols = ["h2", "http/1.1"]
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> int:
        """Listens and serves; the port it got (the one configured, or a free one)."""
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self._reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self._host, self._port))
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        # hypercorn owns the socket from here (it listens, and closes it at the end).
        self._config.bind = [f"fd://{sock.detach()}"]
        self._task = asyncio.create_task(
            hypercorn_serve(self._app, self._config, shutdown_trigger=self._stop.wait),
            name="web-server",
        )
        return self.port

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


def tls_files(cert_file: str, key_file: str) -> tuple[str, str]:
    """The certificate and key the HTTP port presents (checked readable now, so a
    bad path stops the process at start with a clear error)."""
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert_file, key_file)
    return cert_file, key_file
