"""The server interceptor every service runs: each call is admitted (authentication and
authorization), its request screened (undecodable bytes, times protobuf cannot hold,
field limits), counted in flight (so a stopping server answers every call it received,
and a replica holds at most its maximum of streams), traced, and whatever it raises
becomes a gRPC status with rich details (errors.py): never a traceback to the caller."""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import DecodeError

from accessline_server.runtime.errors import (
    AccesslineError,
    FieldViolation,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
    to_status,
)
from accessline_server.runtime.telemetry import end_server_span, start_server_span

Req = TypeVar("Req")
Resp = TypeVar("Resp")

log = logging.getLogger("accessline.errors")


def _internal(method: str, exc: BaseException) -> AccesslineError:
    # The traceback goes to the log (with the trace id); the caller gets no internals.
    log.error("unexpected error in %s", method, exc_info=exc)
    err = AccesslineError("internal error; the server log has the details", reason="INTERNAL")
    err.code = grpc.StatusCode.INTERNAL
    return err


def _translate(method: str, exc: Exception) -> AccesslineError:
    if isinstance(exc, AccesslineError):
        return exc
    if isinstance(exc, NotImplementedError):
        return Unimplemented(f"{method} is not implemented yet", reason="NOT_IMPLEMENTED")
    return _internal(method, exc)


Behavior = Callable[..., Any]


class InFlight:
    """Counts the calls being handled, so that a stopping server answers every call it
    has received before it closes (grpc.aio cancels calls it has not picked up yet)."""

    def __init__(self, max_streams: int = 0) -> None:
        self.count = 0
        # Streams (server or bidirectional) open now, and how many a replica holds at most.
        self.streams = 0
        self.max_streams = max_streams
        # Set once the server stops taking calls: a new one is answered UNAVAILABLE.
        self.closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._last_start = -math.inf

    def enter(self) -> None:
        self.count += 1
        self._last_start = time.monotonic()
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def drained(self, quiet: float, timeout: float) -> bool:
        """Waits until no call is in flight and none has started for `quiet` seconds (the
        calls queued in the transport are picked up meanwhile); False at the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._idle.wait(), left)
            except TimeoutError:
                return False
            since = time.monotonic() - self._last_start
            if since >= quiet and self.count == 0:
                return True
            await asyncio.sleep(min(quiet - since, max(0.0, deadline - time.monotonic())))


def _stopping() -> Unavailable:
    return Unavailable(
        "the server is shutting down; retry on another replica",
        reason="SERVER_STOPPING",
        retry_after=1.0,
    )


class Undecodable:
    """Stands in for a request that does not parse, or holds a time protobuf cannot
    represent: refused with INVALID_ARGUMENT before any servicer code sees it."""

    def __init__(self, error: InvalidArgument) -> None:
        self.error = error


Screen = Callable[[Any], list[FieldViolation]]
# Admits a call (authentication and authorization) before its handler runs, or raises
# the refusal. Each call runs in an asyncio task of its own, so whatever it sets in
# context variables (the caller) ends with the call.
Admit = Callable[[str, Any, Any], Awaitable[None]]


async def _open(method: str, context: Any, request: Any) -> None:
    return None


def _tolerant(deserializer: Callable[[bytes], Any] | None, screen: Screen) -> Any:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            message = deserializer(data)
        except DecodeError:
            return Undecodable(
                InvalidArgument(
                    [FieldViolation("request", "is not a valid message of this method")],
                    reason="UNDECODABLE_REQUEST",
                )
            )
        bad = screen(message)
        return Undecodable(InvalidArgument(bad)) if bad else message

    return parse


async def _screened(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A client stream's messages; one that does not parse ends the call."""
    async for item in requests:
        if isinstance(item, Undecodable):
            raise item.error
        yield item


def _admit(request: Any, in_flight: InFlight) -> AccesslineError | None:
    if in_flight.closed:
        return _stopping()
    if isinstance(request, Undecodable):
        return request.error
    return None


def _open_stream(in_flight: InFlight) -> AccesslineError | None:
    """Counts a new stream, or refuses it when the replica holds its maximum (checked
    and counted in one step: nothing else runs between the two)."""
    if in_flight.max_streams and in_flight.streams >= in_flight.max_streams:
        return ResourceExhausted(
            f"this replica holds its maximum of {in_flight.max_streams} streams;"
            " retry, or another replica",
            reason="TOO_MANY_STREAMS",
            retry_after=5.0,
        )
    in_flight.streams += 1
    return None


def _requests(request_or_iterator: Any, streaming: bool) -> Any:
    return _screened(request_or_iterator) if streaming else request_or_iterator


@dataclass(frozen=True)
class Finished:
    """A call as it ended, for the interceptor's observer (the audit trail): the
    request is None for a client stream, or one that did not parse."""

    method: str
    code: grpc.StatusCode
    reason: str
    request: Any
    peer: str
    trace_id: str
    # Seconds from the call's arrival in the interceptor to its end.
    duration: float


Observer = Callable[[Finished], None]


class _Call:
    """What the wrapper of one call keeps: its span and the code it ends with."""

    def __init__(
        self,
        method: str,
        context: grpc.aio.ServicerContext[Any, Any],
        request: Any,
        observe: Observer | None,
    ) -> None:
        self.method = method
        self.context = context
        # Read now: a context must not be asked anything once its call is over (a
        # cancelled call's context is gone in gRPC's core).
        self.peer = context.peer() if observe is not None else ""
        self.request = None if isinstance(request, Undecodable) else request
        self.observe = observe
        self.started = time.perf_counter()
        self.span = start_server_span(method, context.invocation_metadata())
        self.code = grpc.StatusCode.OK
        self.reason = ""

    async def refuse(self, error: AccesslineError) -> None:
        self.code = error.code
        self.reason = error.reason
        await self.context.abort_with_status(to_status(error))

    def end(self) -> None:
        end_server_span(self.span, self.code)
        if self.observe is not None:
            trace_id = self.span.get_span_context().trace_id
            self.observe(
                Finished(
                    self.method,
                    self.code,
                    self.reason,
                    self.request,
                    self.peer,
                    f"{trace_id:032x}" if trace_id else "",
                    time.perf_counter() - self.started,
                )
            )


async def _entered(
    call: _Call, request: Any, in_flight: InFlight, admit: Admit, method: str, streaming: bool
) -> None:
    """Refuses the call before its handler runs: the replica is stopping, the request
    does not parse, the caller is not allowed."""
    refused = _admit(request, in_flight)
    if refused is None:
        try:
            await admit(method, call.context, None if streaming else request)
        except AccesslineError as error:
            refused = error
    if refused is not None:
        await call.refuse(refused)


def _wrap_unary_response(
    method: str,
    behavior: Behavior,
    in_flight: InFlight,
    streaming: bool,
    admit: Admit,
    observe: Observer | None,
) -> Behavior:
    async def handler(request_or_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        call = _Call(method, context, None if streaming else request_or_iterator, observe)
        try:
            await _entered(call, request_or_iterator, in_flight, admit, method, streaming)
            if streaming:
                await context.send_initial_metadata(())  # admitted (see the stream case)
            in_flight.enter()
            try:
                result = behavior(_requests(request_or_iterator, streaming), context)
                if inspect.isawaitable(result):
                    result = await result
                return result
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - the one edge where every error becomes a status
                await call.refuse(_translate(method, exc))
            finally:
                in_flight.leave()
        except asyncio.CancelledError:
            call.code = grpc.StatusCode.CANCELLED
            raise
        finally:
            call.end()

    return handler


def _wrap_stream_response(
    method: str,
    behavior: Behavior,
    in_flight: InFlight,
    streaming: bool,
    admit: Admit,
    observe: Observer | None,
) -> Behavior:
    async def handler(
        request_or_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        call = _Call(method, context, None if streaming else request_or_iterator, observe)
        try:
            await _entered(call, request_or_iterator, in_flight, admit, method, streaming)
            refused = _open_stream(in_flight)
            if refused is not None:
                await call.refuse(refused)
            if streaming:
                # Admitted: say so at once. A client that waits for the initial metadata
                # before its first write learns a refusal as the status the server sent;
                # one that writes first may be told INTERNAL by its own library when the
                # refusal arrives during the write (grpc/grpc#36066).
                await context.send_initial_metadata(())
            in_flight.enter()
            try:
                result = behavior(_requests(request_or_iterator, streaming), context)
                if inspect.isawaitable(result):
                    result = await result
                if result is not None:
                    async for item in result:
                        yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - the one edge where every error becomes a status
                await call.refuse(_translate(method, exc))
            finally:
                in_flight.streams -= 1
                in_flight.leave()
        except (asyncio.CancelledError, GeneratorExit):
            call.code = grpc.StatusCode.CANCELLED
            raise
        finally:
            call.end()

    return handler


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns domain errors raised by servicers into rich statuses, and anything
    unexpected into a logged INTERNAL without internals for the caller; counts the calls
    in flight for a graceful stop."""

    def __init__(self, in_flight: InFlight | None = None, screen: Screen | None = None) -> None:
        self.in_flight = in_flight or InFlight()
        self._screen: Screen = screen or (lambda _: [])
        # Set by the runtime once it knows the services it serves and their policies.
        self.admit: Admit = _open
        # Told of every call as it ends (the per-RPC metrics, the access log, the audit
        # trail).
        self.observe: Observer | None = None

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Req, Resp] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Req, Resp] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        codec: dict[str, Any] = {
            "request_deserializer": _tolerant(handler.request_deserializer, self._screen),
            "response_serializer": handler.response_serializer,
        }
        wrapped: Any
        if handler.unary_unary is not None:
            wrapped = grpc.unary_unary_rpc_method_handler(
                _wrap_unary_response(
                    method, handler.unary_unary, self.in_flight, False, self.admit, self.observe
                ),
                **codec,
            )
        elif handler.stream_unary is not None:
            wrapped = grpc.stream_unary_rpc_method_handler(
                _wrap_unary_response(
                    method, handler.stream_unary, self.in_flight, True, self.admit, self.observe
                ),
                **codec,
            )
        elif handler.unary_stream is not None:
            wrapped = grpc.unary_stream_rpc_method_handler(
                _wrap_stream_response(
                    method, handler.unary_stream, self.in_flight, False, self.admit, self.observe
                ),
                **codec,
            )
        elif handler.stream_stream is not None:
            wrapped = grpc.stream_stream_rpc_method_handler(
                _wrap_stream_response(
                    method, handler.stream_stream, self.in_flight, True, self.admit, self.observe
                ),
                **codec,
            )
        else:
            return handler
        return cast("grpc.RpcMethodHandler[Req, Resp]", wrapped)
