"""One agent's session: a lease kept alive only while the app's stream is open and
heartbeating, per-channel presence and do-not-disturb, offers delivered and answered,
interactions ended."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from opentelemetry import trace

from accessline.common.v1 import common_pb2
from accessline.presence.storage.v1 import storage_pb2 as pr_store
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline_server.presence import keys
from accessline_server.presence import state as presence_state
from accessline_server.presence.answering import OfferAnswering
from accessline_server.presence.answers import end_ops
from accessline_server.presence.hub import Hub
from accessline_server.presence.roster import Sealing, public_presence
from accessline_server.runtime.clock import now_timestamp
from accessline_server.runtime.errors import (
    AccesslineError,
    FieldViolation,
    InvalidArgument,
    Unavailable,
)
from accessline_server.runtime.store import (
    Compare,
    Entry,
    EventKind,
    KeptLease,
    Op,
    Store,
    WatchEvent,
)
from accessline_server.runtime.telemetry import context_from

log = logging.getLogger("accessline.presence")
tracer = trace.get_tracer("accessline.presence")

C = common_pb2


def _channel_name(channel: int) -> str:
    return (
        C.Channel.Name(C.Channel.ValueType(channel))
        if channel in C.Channel.values()
        else str(channel)
    )


class SessionEnded(Exception):
    """Ends the Connect stream: `error` is the status to end it with, None for OK."""

    def __init__(self, error: AccesslineError | None = None, *, input_ended: bool = False) -> None:
        super().__init__(error.message if error else "session ended")
        self.error = error
        # The app's stream ended (a logout, or a client's cancellation as grpc reports
        # it to the reading task; see sessions.py).
        self.input_ended = input_ended


@dataclass
class Limits:
    lease_seconds: int
    heartbeat_timeout: float
    sealing: Sealing
    max_interaction: float = 12 * 3600.0
    login_timeout: float = 10.0
    not_ready_reasons: tuple[str, ...] = ()
    # How long an ended session can be resumed by the agent's next login.
    resume_seconds: float = 120.0


@dataclass
class AgentSession(OfferAnswering):
    """One agent app's live session on this replica."""

    store: Store
    hub: Hub
    limits: Limits
    agent: pr_pb2.Agent
    device: pr_pb2.Device
    outbox: asyncio.Queue[pr_pb2.ConnectResponse | SessionEnded] = field(
        default_factory=asyncio.Queue
    )
    session_id: str = field(default_factory=lambda: "as" + secrets.token_urlsafe(12))
    state: pr_store.StoredPresence = field(default_factory=pr_store.StoredPresence)
    revision: int = 0
    lease: KeptLease | None = None
    last_seen: float = field(default_factory=time.monotonic)
    delivered: set[str] = field(default_factory=set)
    # Open offers as the hub's watch (or the login's read) showed them, by id: an answer
    # is written against one without reading it again (its compare tells a change).
    offers_seen: dict[str, Entry[pr_store.StoredOffer]] = field(default_factory=dict)
    # The interactions the agent is on as this session wrote (or the login read) them,
    # by id: an end is written from one unread while its key is still that one.
    interactions_kept: dict[str, Entry[pr_store.StoredInteraction]] = field(default_factory=dict)
    replaced: bool = False
    resync_needed: asyncio.Event = field(default_factory=asyncio.Event)
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    background: set[asyncio.Task[None]] = field(default_factory=set)
    resume_token: str = ""
    resumed: bool = False
    # Told the reason each time the agent says why they are not ready (a metric).
    count_not_ready: Callable[[str], None] = lambda _: None

    # -- lifecycle --------------------------------------------------------------------

    async def open(self) -> None:
        lease_id = await self.store.grant_lease(self.limits.lease_seconds)
        self.lease = await self.store.keep_alive(lease_id, self.limits.lease_seconds)
        # Calls accepted in an earlier session and not ended: the agent is still on them.
        ongoing, _ = await self.store.get_prefix(
            keys.interactions(self.agent.agent_id), pr_store.StoredInteraction
        )
        self.state = presence_state.logged_in(
            self.agent, self.session_id, self.device, (e.value for e in ongoing)
        )
        working = [self.limits.sealing.ongoing(e.value) for e in ongoing]
        self.interactions_kept = {e.value.interaction_id: e for e in ongoing}
        previous = await self._to_resume()
        if previous is not None:
            presence_state.resumed(self.state, previous)
            self.resumed = True
        replaced = self.hub.sessions.get(self.agent.agent_id)
        if replaced is not None:
            replaced.replace(self.device)
        self.hub.sessions[self.agent.agent_id] = self
        # Overwrites a session of another replica too; that replica sees it and steps down.
        self.revision = await self.store.put(
            keys.presence(self.agent.agent_id), self.state, lease_id
        )
        self.send(
            pr_pb2.ConnectResponse(
                snapshot=pr_pb2.Snapshot(
                    agent=self.agent,
                    presence=self.public(),
                    agent_session_id=self.session_id,
                    resumed=self.resumed,
                    not_ready_reasons=self.limits.not_ready_reasons,
                    interactions=working,
                )
            )
        )
        await self._deliver_open_offers()
        log.info(
            "agent logged in",
            extra={
                "fields": {"agent_id": self.agent.agent_id, "agent_session_id": self.session_id}
            },
        )

    async def _end(self, interaction_id: str) -> None:
        """Writes the end of an interaction (the agent's presence as it is now): its
        record gone and, for a customer of an app, the survey invitation Notification
        sends (its published `surveys` module). From the interaction as this session
        kept it, with a compare that it is still that key; read when it is not."""
        kept = self.interactions_kept.pop(interaction_id, None)
        if kept is not None:
            created = Compare.created_at(kept.key, kept.meta.create_revision)
            with contextlib.suppress(_GuardFailed):
                await self._write(end_ops(kept, self.agent.agent_id), [created])
                return
        key = keys.interaction(self.agent.agent_id, interaction_id)
        found = await self.store.get(key, pr_store.StoredInteraction)
        await self._write(
            end_ops(found, self.agent.agent_id) if found is not None else [Op.delete(key)]
        )

    async def _to_resume(self) -> pr_store.StoredPresence | None:
        """The session the login resumes: the agent's presence while still that session's
        (its replica died, or the network dropped it and it has not ended yet), else what
        it left when it ended, for `resume_seconds`."""
        if not self.resume_token:
            return None
        for key in (keys.presence(self.agent.agent_id), keys.resume(self.agent.agent_id)):
            entry = await self.store.get(key, pr_store.StoredPresence)
            if entry is not None and entry.value.agent_session_id == self.resume_token:
                return entry.value
        return None

    async def _deliver_open_offers(self) -> None:
        entries, _ = await self.store.get_prefix(
            keys.offers(self.agent.agent_id), pr_store.StoredOffer
        )
        for entry in entries:
            self._seen(entry)
            self._offer_state(entry.value)

    def _seen(self, entry: Entry[pr_store.StoredOffer]) -> None:
        if entry.value.state == pr_store.OFFER_STATE_OPEN:
            self.offers_seen[entry.value.offer.offer_id] = entry
        else:
            self.offers_seen.pop(entry.value.offer.offer_id, None)

    def public(self) -> pr_pb2.AgentPresence:
        return public_presence(self.agent, self.state)

    def send(self, message: pr_pb2.ConnectResponse | SessionEnded) -> None:
        self.outbox.put_nowait(message)

    def replace(self, by: pr_pb2.Device) -> None:
        """Another login of this agent took over."""
        if not self.replaced:
            self.replaced = True
            self.send(pr_pb2.ConnectResponse(session_replaced=pr_pb2.SessionReplaced(by_device=by)))
            self.send(SessionEnded())

    async def close(self) -> None:
        """Ends the session: presence removed at once (unless replaced), open offers
        cancelled, lease released."""
        if self.hub.sessions.get(self.agent.agent_id) is self:
            del self.hub.sessions[self.agent.agent_id]
        if self.lease is not None:
            self.store.stop_keep_alive(self.lease)
        with contextlib.suppress(AccesslineError):
            if not self.replaced:
                # What the session leaves for the agent's next login to resume.
                kept = await self.store.shared_lease(self.limits.resume_seconds, window=10.0)
                await self.store.txn(
                    [Compare.modified_at(keys.presence(self.agent.agent_id), self.revision)],
                    [
                        Op.delete(keys.presence(self.agent.agent_id)),
                        Op.put(keys.resume(self.agent.agent_id), self.state, kept),
                    ],
                )
            if self.lease is not None:
                await self.store.revoke_lease(self.lease.id)
        log.info(
            "agent session ended",
            extra={
                "fields": {"agent_id": self.agent.agent_id, "agent_session_id": self.session_id}
            },
        )

    # -- events from etcd -------------------------------------------------------------

    def on_presence(self, event: WatchEvent) -> None:
        if event.kind == EventKind.DELETE:
            # Before this session's first write is answered (revision 0), a deletion is of
            # the key of the session it replaces (that session's lease released as it
            # ends), not this session's loss.
            if self.revision and event.revision > self.revision and not self.replaced:
                self.send(
                    SessionEnded(
                        Unavailable(
                            "the agent session ended (unregistered or lease lost)",
                            reason="SESSION_LOST",
                        )
                    )
                )
            return
        stored = event.decode(pr_store.StoredPresence)
        if stored.agent_session_id != self.session_id:
            self.replace(stored.device)

    def on_offer(self, event: WatchEvent) -> None:
        if event.kind == EventKind.DELETE:
            before = event.decode_prev(pr_store.StoredOffer)
            if before is not None:
                self.offers_seen.pop(before.offer.offer_id, None)
            if (
                before is not None
                and before.state == pr_store.OFFER_STATE_OPEN
                and before.offer.offer_id in self.delivered
            ):
                self.delivered.discard(before.offer.offer_id)
                self.send(
                    pr_pb2.ConnectResponse(
                        offer_cancelled=pr_pb2.OfferCancelled(
                            offer_id=before.offer.offer_id,
                            reason=pr_pb2.OFFER_CANCEL_REASON_TIMED_OUT,
                        )
                    )
                )
            return
        entry = Entry(event.key, event.decode(pr_store.StoredOffer), event.meta)
        self._seen(entry)
        self._offer_state(entry.value)

    def on_interaction_gone(self, event: WatchEvent) -> None:
        """An interaction's key vanished while the agent was still on it: the caller was
        gone before the call reached the agent (its lease ended, or the router took the
        call out). The agent is free again and the app is told."""
        interaction_id = event.key.rsplit("/", 1)[1]
        self.interactions_kept.pop(interaction_id, None)
        if interaction_id not in self.state.interactions:
            return  # ended by the agent
        before = event.decode_prev(pr_store.StoredInteraction)
        task = asyncio.get_running_loop().create_task(
            self._caller_gone(interaction_id, before.offer_id if before is not None else "")
        )
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _caller_gone(self, interaction_id: str, offer_id: str) -> None:
        async with self.write_lock:
            if not presence_state.interaction_ended(self.state, interaction_id):
                return
            self.send(
                pr_pb2.ConnectResponse(
                    offer_cancelled=pr_pb2.OfferCancelled(
                        offer_id=offer_id, reason=pr_pb2.OFFER_CANCEL_REASON_CALLER_GONE
                    )
                )
            )
            try:
                await self._write_locked()
            except SessionEnded as ended:
                self.send(ended)
            except AccesslineError as exc:
                log.warning("could not free agent %s: %s", self.agent.agent_id, exc)

    def _offer_state(self, stored: pr_store.StoredOffer) -> None:
        offer_id = stored.offer.offer_id
        if stored.state == pr_store.OFFER_STATE_OPEN and offer_id not in self.delivered:
            if stored.offer.deadline.ToNanoseconds() <= time.time_ns():
                return
            self.delivered.add(offer_id)
            with tracer.start_as_current_span(
                "accessline.offer.deliver",
                context=context_from(stored.trace.traceparent, stored.trace.tracestate),
                attributes={"accessline.agent": self.agent.agent_id},
            ):
                self.send(pr_pb2.ConnectResponse(offer=self.limits.sealing.shown_offer(stored)))
        elif stored.state == pr_store.OFFER_STATE_CANCELLED and offer_id in self.delivered:
            self.delivered.discard(offer_id)
            self.send(
                pr_pb2.ConnectResponse(
                    offer_cancelled=pr_pb2.OfferCancelled(
                        offer_id=offer_id, reason=stored.cancel_reason
                    )
                )
            )
            if stored.cancel_reason == pr_pb2.OFFER_CANCEL_REASON_NO_ANSWER_LIMIT:
                task = asyncio.get_running_loop().create_task(self._set_not_ready())
                self.background.add(task)
                task.add_done_callback(self.background.discard)

    async def _set_not_ready(self) -> None:
        """Redirect on no answer: the agent let too many offers time out, so every channel
        is set not ready until the agent makes it available again."""
        presence_state.not_ready(self.state)
        try:
            await self._write()
        except SessionEnded as ended:
            self.send(ended)
        except AccesslineError as exc:
            log.warning("could not set agent %s not ready: %s", self.agent.agent_id, exc)

    # -- messages from the app --------------------------------------------------------

    def _channel(self, channel: C.Channel.ValueType, field_name: str) -> pr_store.StoredChannel:
        for stored in self.state.channels:
            if stored.channel == channel:
                return stored
        raise InvalidArgument(
            [
                FieldViolation(
                    field_name,
                    f"channel {_channel_name(channel)} is not configured for this agent",
                )
            ]
        )

    async def _write(self, also: Sequence[Op] = (), guard: Sequence[Compare] = ()) -> None:
        async with self.write_lock:
            await self._write_locked(also, guard)

    async def _write_locked(self, also: Sequence[Op] = (), guard: Sequence[Compare] = ()) -> None:
        """Writes the agent's presence (with `also`, only while `guard` holds:
        _GuardFailed, nothing written, when it does not)."""
        self.state.updated_at.CopyFrom(now_timestamp())
        assert self.lease is not None
        key = keys.presence(self.agent.agent_id)
        for _ in range(2):
            result = await self.store.txn(
                [Compare.modified_at(key, self.revision), *guard],
                [Op.put(key, self.state, self.lease.id), *also],
            )
            if result.succeeded:
                break
            # Changed since this session last wrote it: replaced or lost, or an earlier
            # write of this session that etcd applied without its answer reaching it (an
            # election, a timeout). Only this session writes its presence: then write on.
            revision = (await self._own_presence()).meta.mod_revision
            if guard and revision == self.revision:
                raise _GuardFailed
            self.revision = revision
        else:
            raise self._lost()
        self.revision = result.revision
        self.send(
            pr_pb2.ConnectResponse(
                presence_confirmed=pr_pb2.PresenceConfirmed(presence=self.public())
            )
        )

    def _lost(self) -> SessionEnded:
        self.replaced = True
        return SessionEnded(Unavailable("this session was replaced or lost", reason="SESSION_LOST"))

    async def _own_presence(self) -> Entry[pr_store.StoredPresence]:
        """The agent's presence in etcd while it is this session's; the session ends when
        it is not (replaced by another login, or its lease lost)."""
        current = await self.store.get(keys.presence(self.agent.agent_id), pr_store.StoredPresence)
        if current is None or current.value.agent_session_id != self.session_id:
            raise self._lost()
        return current

    async def resync(self) -> None:
        """Takes the presence as etcd holds it (after a write whose answer was lost: it
        may or may not have been applied), while it is this session's."""
        async with self.write_lock:
            current = await self._own_presence()
            self.state, self.revision = current.value, current.meta.mod_revision

    async def handle(self, message: pr_pb2.ConnectRequest) -> None:
        self.last_seen = time.monotonic()
        kind = message.WhichOneof("message")
        if kind == "login":
            raise InvalidArgument([FieldViolation("login", "the session is already logged in")])
        if kind == "heartbeat":
            self.send(
                pr_pb2.ConnectResponse(
                    heartbeat_ack=pr_pb2.HeartbeatAck(server_time=now_timestamp())
                )
            )
        elif kind == "set_channel_presence":
            change = message.set_channel_presence
            channel = self._channel(change.channel, "set_channel_presence.channel")
            self._check_reason("set_channel_presence", change.reason_code, not change.available)
            presence_state.set_available(self.state, channel, change.available, change.reason_code)
            await self._write()
        elif kind == "set_do_not_disturb":
            dnd = message.set_do_not_disturb
            self._check_reason("set_do_not_disturb", dnd.reason_code, dnd.enabled)
            presence_state.set_do_not_disturb(self.state, dnd.enabled, dnd.reason_code)
            await self._write()
        elif kind == "offer_response":
            await self._answer(message.offer_response)
        elif kind == "end_interaction":
            interaction = message.end_interaction.interaction_id
            if not interaction or len(interaction) > 64:
                raise InvalidArgument(
                    [FieldViolation("end_interaction.interaction_id", "must be 1 to 64 characters")]
                )
            if not presence_state.interaction_ended(self.state, interaction):
                # Already ended (an app repeating itself after a reconnect): nothing to
                # change, the presence as it is confirms it.
                self.send(
                    pr_pb2.ConnectResponse(
                        presence_confirmed=pr_pb2.PresenceConfirmed(presence=self.public())
                    )
                )
                return
            await self._end(interaction)
        else:
            raise InvalidArgument(
                [FieldViolation("message", "must be one of the ConnectRequest messages")]
            )

    def _check_reason(self, message: str, code: str, not_ready: bool) -> None:
        """A not-ready reason is one of the configured ones, given only when the agent
        becomes not ready; counted."""
        if not code:
            return
        if not not_ready:
            raise InvalidArgument(
                [FieldViolation(f"{message}.reason_code", "is given only when not ready")]
            )
        if code not in self.limits.not_ready_reasons:
            allowed = ", ".join(self.limits.not_ready_reasons) or "none configured"
            raise InvalidArgument(
                [FieldViolation(f"{message}.reason_code", f"must be one of: {allowed}")]
            )
        self.count_not_ready(code)


class _GuardFailed(Exception):
    """A session's write was refused by its guard (the presence was as the session had it)."""
