"""The agent sessions of a Presence replica: `Connect` streams opened, one session per
agent across replicas, closed on the way out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from opentelemetry import metrics, trace

from accessline.common.v1 import common_pb2
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline_server.presence.directory import Directory
from accessline_server.presence.hub import Hub
from accessline_server.presence.session import AgentSession, Limits, SessionEnded
from accessline_server.runtime import identity
from accessline_server.runtime.errors import (
    AccesslineError,
    DeadlineExceeded,
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
    Unavailable,
)
from accessline_server.runtime.store import (
    Store,
)

log = logging.getLogger("accessline.presence")
# How long an agent's stream that ended waits for grpc to say it was cancelled (a broken
# connection) before it counts as a logout (the sessions-ended metric's `closed`).
INPUT_END_SETTLE_SECONDS = 0.5
tracer = trace.get_tracer("accessline.presence")

C = common_pb2


class Sessions:
    """Runs Connect streams: login, then messages up and events down until the end."""

    def __init__(
        self,
        store: Store,
        hub: Hub,
        directory: Directory,
        limits: Limits,
        meter: metrics.Meter | None = None,
    ) -> None:
        self._store = store
        self._hub = hub
        self._directory = directory
        self._limits = limits
        self._ended = (meter or metrics.get_meter("accessline.presence")).create_counter(
            "accessline.presence.sessions.ended",
            unit="{session}",
            description="Agent sessions ended, by how: closed (the app logged out or ended"
            " its stream), dropped (the stream broke), or the error's reason",
        )

    async def connect(
        self, requests: AsyncIterator[pr_pb2.ConnectRequest], stopping: asyncio.Event
    ) -> AsyncIterator[pr_pb2.ConnectResponse]:
        await self._hub.ready(5.0)
        iterator = requests.__aiter__()
        try:
            first = await asyncio.wait_for(iterator.__anext__(), self._limits.login_timeout)
        except (StopAsyncIteration, TimeoutError):
            raise InvalidArgument(
                [FieldViolation("login", "the first message must be a login")]
            ) from None
        if first.WhichOneof("message") != "login":
            raise InvalidArgument([FieldViolation("login", "the first message must be a login")])
        login = first.login
        if not login.agent_id or len(login.agent_id) > 64:
            raise InvalidArgument([FieldViolation("login.agent_id", "must be 1 to 64 characters")])
        caller = identity.current()
        if not caller.unchecked and caller.subject != login.agent_id:
            # An agent logs in as themselves only: the token's subject.
            raise PermissionDenied("the token is not this agent's", reason="NOT_THIS_AGENT")
        agent = await self._directory.get(login.agent_id)
        session = AgentSession(self._store, self._hub, self._limits, agent, login.device)
        reader: asyncio.Task[None] | None = None
        watchdog: asyncio.Task[None] | None = None
        how = "dropped"  # unless the session says how it ended: the stream broke
        try:
            await session.open()
            reader = asyncio.create_task(self._read(iterator, session))
            watchdog = asyncio.create_task(self._watch(session, stopping))
            while True:
                item = await session.outbox.get()
                if isinstance(item, SessionEnded):
                    if item.error is not None:
                        how = item.error.reason or "error"
                        raise item.error
                    if item.input_ended:
                        # A client that cancels its stream (the connection broke) is seen
                        # by the reading task as an end of input, and this task is
                        # cancelled a moment later by grpc: a logout is one only if that
                        # does not come (otherwise `how` stays "dropped").
                        await asyncio.sleep(INPUT_END_SETTLE_SECONDS)
                    how = "closed"
                    return
                yield item
        finally:
            self._ended.add(1, {"accessline.session.end": how})
            for task in (reader, watchdog):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await session.close()

    async def _read(
        self, iterator: AsyncIterator[pr_pb2.ConnectRequest], session: AgentSession
    ) -> None:
        try:
            async for message in iterator:
                await self._handle(session, message)
            session.send(SessionEnded(input_ended=True))
        except SessionEnded as ended:
            session.send(ended)
        except AccesslineError as error:
            session.send(SessionEnded(error))

    async def _handle(self, session: AgentSession, message: pr_pb2.ConnectRequest) -> None:
        """Handles one message of the app; when etcd cannot take it (unreachable, or no
        answer in time, as in a leader election), tries again once the store answers,
        from the presence as etcd holds it, for as long as the session's lease could
        outlive the outage. The app is not cut off for what is no fault of its own."""
        deadline = time.monotonic() + self._limits.lease_seconds
        resync = False
        while True:
            try:
                if resync:
                    await session.resync()
                await session.handle(message)
                return
            except (Unavailable, DeadlineExceeded) as exc:
                delay = exc.retry_after or 1.0
                if time.monotonic() + delay > deadline:
                    raise
                log.info(
                    "agent message waits for etcd",
                    extra={"fields": {"agent_id": session.agent.agent_id, "error": exc.reason}},
                )
                await asyncio.sleep(delay)
                resync = True

    async def _watch(self, session: AgentSession, stopping: asyncio.Event) -> None:
        """Ends the session when the app goes silent, the lease is lost or the server stops;
        resyncs offers after the hub missed events."""
        assert session.lease is not None
        while True:
            if stopping.is_set():
                session.send(
                    SessionEnded(
                        Unavailable(
                            "the server is shutting down; reconnect",
                            reason="SERVER_STOPPING",
                            retry_after=1.0,
                        )
                    )
                )
                return
            if session.lease.lost.is_set():
                session.send(
                    SessionEnded(
                        Unavailable(
                            "the agent session's lease was lost; reconnect",
                            reason="SESSION_LOST",
                            retry_after=1.0,
                        )
                    )
                )
                return
            if time.monotonic() - session.last_seen > self._limits.heartbeat_timeout:
                session.send(
                    SessionEnded(
                        Unavailable("no heartbeat from the agent app", reason="HEARTBEAT_TIMEOUT")
                    )
                )
                return
            if session.resync_needed.is_set():
                session.resync_needed.clear()
                with contextlib.suppress(AccesslineError):
                    await session._deliver_open_offers()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    stopping.wait(), min(1.0, self._limits.heartbeat_timeout / 4)
                )
