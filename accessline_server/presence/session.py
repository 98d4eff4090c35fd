"""One agent's session: a lease kept alive only while the app's stream is open and
heartbeating, per-channel presence and do-not-disturb, offers delivered and answered,
interactions ended."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from opentelemetry import trace

from accessline.common.v1 import common_pb2
from accessline.presence.storage.v1 import storage_pb2 as pr_store
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline_server.presence import keys, offers
from accessline_server.presence import state as presence_state
from accessline_server.presence.answers import accept_ops, already_answered, refusal_of
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


@dataclass
class AgentSession:
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
    replaced: bool = False
    resync_needed: asyncio.Event = field(default_factory=asyncio.Event)
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    background: set[asyncio.Task[None]] = field(default_factory=set)

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
        previous = self.hub.sessions.get(self.agent.agent_id)
        if previous is not None:
            previous.replace(self.device)
        self.hub.sessions[self.agent.agent_id] = self
        # Overwrites a session of another replica too; that replica sees it and steps down.
        self.revision = await self.store.put(
            keys.presence(self.agent.agent_id), self.state, lease_id
        )
        self.send(
            pr_pb2.ConnectResponse(
                snapshot=pr_pb2.Snapshot(
                    agent=self.agent, presence=self.public(), agent_session_id=self.session_id
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

    async def _deliver_open_offers(self) -> None:
        entries, _ = await self.store.get_prefix(
            keys.offers(self.agent.agent_id), pr_store.StoredOffer
        )
        for entry in entries:
            self._offer_state(entry.value)

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
                await self.store.txn(
                    [Compare.modified_at(keys.presence(self.agent.agent_id), self.revision)],
                    [Op.delete(keys.presence(self.agent.agent_id))],
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
            if event.revision > self.revision and not self.replaced:
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
        self._offer_state(event.decode(pr_store.StoredOffer))

    def on_interaction_gone(self, event: WatchEvent) -> None:
        """An interaction's key vanished while the agent was still on it: the caller was
        gone before the call reached the agent (its lease ended, or the router took the
        call out). The agent is free again and the app is told."""
        interaction_id = event.key.rsplit("/", 1)[1]
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

    async def _write(self, also: Sequence[Op] = ()) -> None:
        async with self.write_lock:
            await self._write_locked(also)

    async def _write_locked(self, also: Sequence[Op] = ()) -> None:
        self.state.updated_at.CopyFrom(now_timestamp())
        assert self.lease is not None
        key = keys.presence(self.agent.agent_id)
        for _ in range(2):
            result = await self.store.txn(
                [Compare.modified_at(key, self.revision)],
                [Op.put(key, self.state, self.lease.id), *also],
            )
            if result.succeeded:
                break
            # Changed since this session last wrote it: replaced or lost, or an earlier
            # write of this session that etcd applied without its answer reaching it (an
            # election, a timeout). Only this session writes its presence: then write on.
            self.revision = (await self._own_presence()).meta.mod_revision
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
            presence_state.set_available(self.state, channel, change.available)
            await self._write()
        elif kind == "set_do_not_disturb":
            presence_state.set_do_not_disturb(self.state, message.set_do_not_disturb.enabled)
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
            await self._write([Op.delete(keys.interaction(self.agent.agent_id, interaction))])
        else:
            raise InvalidArgument(
                [FieldViolation("message", "must be one of the ConnectRequest messages")]
            )

    async def _answer(self, response: pr_pb2.OfferResponse) -> None:
        if response.decision not in (pr_pb2.OFFER_DECISION_ACCEPT, pr_pb2.OFFER_DECISION_DECLINE):
            raise InvalidArgument(
                [FieldViolation("offer_response.decision", "must be ACCEPT or DECLINE")]
            )
        if not response.offer_id or len(response.offer_id) > 64:
            raise InvalidArgument(
                [FieldViolation("offer_response.offer_id", "must be 1 to 64 characters")]
            )
        entry = await self.store.get(
            keys.offer(self.agent.agent_id, response.offer_id), pr_store.StoredOffer
        )
        parent = (
            context_from(entry.value.trace.traceparent, entry.value.trace.tracestate)
            if entry
            else None
        )
        # The agent's answer joins the trace of the call that made the offer.
        with tracer.start_as_current_span(
            "accessline.offer.answer",
            context=parent,
            attributes={
                "accessline.agent": self.agent.agent_id,
                "accessline.offer.decision": pr_pb2.OfferDecision.Name(response.decision)
                if response.decision in pr_pb2.OfferDecision.values()
                else "UNKNOWN",
            },
        ):
            await self._answer_offer(response, entry)

    def _recorded(self, response: pr_pb2.OfferResponse) -> None:
        self.send(
            pr_pb2.ConnectResponse(
                offer_response_recorded=pr_pb2.OfferResponseRecorded(
                    offer_id=response.offer_id, decision=response.decision
                )
            )
        )

    async def _answer_offer(
        self, response: pr_pb2.OfferResponse, entry: Entry[pr_store.StoredOffer] | None
    ) -> None:
        """Records the agent's accept or decline of an offer in one transaction (an
        accept with the agent busy and the interaction started), or tells the agent why
        not."""

        def refuse(reason: pr_pb2.OfferRefusal.ValueType) -> None:
            self.send(
                pr_pb2.ConnectResponse(
                    offer_response_refused=pr_pb2.OfferResponseRefused(
                        offer_id=response.offer_id, reason=reason
                    )
                )
            )

        if entry is not None and already_answered(response, entry.value):
            self._recorded(response)
            return
        refusal = refusal_of(response, entry, self._channel, self.state.do_not_disturb)
        if refusal is not None or entry is None:
            refuse(refusal or pr_pb2.OFFER_REFUSAL_UNKNOWN_OFFER)
            return
        stored = entry.value
        accept = response.decision == pr_pb2.OFFER_DECISION_ACCEPT
        channel_id = response.accept_channel or stored.offer.channel
        async with self.write_lock:
            also: tuple[list[Compare], list[Op]] = ([], [])
            lasts = 0
            busy: pr_store.StoredPresence | None = None
            if accept:
                assert self.lease is not None
                lasts = await self.store.shared_lease(self.limits.max_interaction, window=60.0)
                compares, ops, busy = accept_ops(
                    self.state,
                    stored,
                    channel_id,
                    agent_id=self.agent.agent_id,
                    presence=(self.lease.id, self.revision),
                    lasts=lasts,
                )
                also = (compares, ops)
            written = await offers.set_offer_state(
                self.store,
                entry,
                pr_store.OFFER_STATE_ACCEPTED if accept else pr_store.OFFER_STATE_DECLINED,
                accepted_channel=channel_id if accept else C.CHANNEL_UNSPECIFIED,
                interaction_lease=lasts if accept else 0,
                also=also,
            )
            if not written:
                refuse(pr_pb2.OFFER_REFUSAL_NO_LONGER_OPEN)
                return
            self.delivered.discard(response.offer_id)
            self._recorded(response)
            if busy is not None:
                # The accept's transaction wrote the presence as read (its compare): it is
                # `busy` now, at the transaction's revision.
                self.state, self.revision = busy, written
                self.send(
                    pr_pb2.ConnectResponse(
                        presence_confirmed=pr_pb2.PresenceConfirmed(presence=self.public())
                    )
                )
