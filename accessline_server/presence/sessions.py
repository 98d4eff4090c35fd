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
    NotFound,
    PermissionDenied,
    Unavailable,
)
from accessline_server.runtime.store import Store
from accessline_server.runtime.validation import Violations

log = logging.getLogger("accessline.presence")
# How long an agent's stream that ended waits for grpc to say it was cancelled (a broken
# connection) before it counts as a logout (the sessions-ended metric's `closed`).
INPUT_END_SETTLE_SECONDS = 0.5
tracer = trace.get_tracer("accessline.presence")

C = common_pb2


def check_login(login: pr_pb2.Login, v: Violations, field: str = "login") -> None:
    v.text(f"{field}.agent_id", login.agent_id, 64, required=True)
    v.text(f"{field}.device.device_id", login.device.device_id, 128)
    v.text(f"{field}.device.platform", login.device.platform, 64)
    v.text(f"{field}.device.app_version", login.device.app_version, 64)
    v.text(f"{field}.resume_token", login.resume_token, 64)


def check_message(message: pr_pb2.ConnectRequest, v: Violations, field: str) -> None:
    """The sizes of a session's message (what it means is the session's to check)."""
    presence, dnd = message.set_channel_presence, message.set_do_not_disturb
    v.text(f"{field}.set_channel_presence.reason_code", presence.reason_code, 32)
    v.text(f"{field}.set_do_not_disturb.reason_code", dnd.reason_code, 32)
    if message.HasField("login"):
        check_login(message.login, v, f"{field}.login")
    v.text(f"{field}.offer_response.offer_id", message.offer_response.offer_id, 64)
    v.text(f"{field}.end_interaction.interaction_id", message.end_interaction.interaction_id, 64)


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
        meter = meter or metrics.get_meter("accessline.presence")
        # The sessions open on this replica, by id (for SendSessionMessage).
        self._open: dict[str, AgentSession] = {}
        self._not_ready = meter.create_counter(
            "accessline.presence.not_ready",
            unit="{change}",
            description="Agents becoming not ready (a channel made unavailable, or"
            " do-not-disturb) with a reason, by reason code",
        )
        self._ended = meter.create_counter(
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
        v = Violations()
        check_login(login, v)
        v.raise_if_any()
        caller = identity.current()
        if not caller.unchecked and caller.subject != login.agent_id:
            # An agent logs in as themselves only: the token's subject.
            raise PermissionDenied("the token is not this agent's", reason="NOT_THIS_AGENT")
        agent = await self._directory.get(login.agent_id)
        session = AgentSession(
            self._store,
            self._hub,
            self._limits,
            agent,
            login.device,
            resume_token=login.resume_token,
            count_not_ready=lambda code: self._not_ready.add(
                1, {"accessline.not_ready.reason": code}
            ),
        )
        reader: asyncio.Task[None] | None = None
        watchdog: asyncio.Task[None] | None = None
        how = "dropped"  # unless the session says how it ended: the stream broke
        try:
            await session.open()
            self._open[session.session_id] = session
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
            self._open.pop(session.session_id, None)
            self._ended.add(1, {"accessline.session.end": how})
            for task in (reader, watchdog):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await session.close()

    async def open_session(
        self, login: pr_pb2.Login, stopping: asyncio.Event
    ) -> AsyncIterator[pr_pb2.ConnectResponse]:
        """A session whose app cannot send a stream: the login opens it, its messages
        come by `send`."""

        async def login_only() -> AsyncIterator[pr_pb2.ConnectRequest]:
            yield pr_pb2.ConnectRequest(login=login)
            await asyncio.Event().wait()  # until the session ends

        async for message in self.connect(login_only(), stopping):
            yield message

    async def send(self, session_id: str, message: pr_pb2.ConnectRequest) -> None:
        """One message of a session open on this replica, from its own agent. A message
        it cannot take is refused to the caller and the session goes on; one that ends
        the session (it was replaced or lost) ends it."""
        session = self._open.get(session_id)
        caller = identity.current()
        if session is None or (not caller.unchecked and caller.subject != session.agent.agent_id):
            raise NotFound(
                "no open session of this agent with this id on this server; open one"
                " (OpenSession) resuming this one",
                reason="SESSION_NOT_FOUND",
            )
        try:
            await self._handle(session, message)
        except SessionEnded as ended:
            session.send(ended)
            raise ended.error or Unavailable("the session ended", reason="SESSION_LOST") from None

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
