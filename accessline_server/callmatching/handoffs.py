"""The handoff: a customer's app asks for a number to call, and a session waits for the
call under the number's reservation lease, its context and code sealed."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opentelemetry import propagate

from accessline.callmatching.storage.v1 import storage_pb2 as cm_store
from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.common.v1 import common_pb2
from accessline.numberdistribution.storage.v1 import storage_pb2 as nd_store
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline_server.callmatching import instructions, keys
from accessline_server.callmatching.applications import Applications
from accessline_server.callmatching.crypto import SessionCrypto
from accessline_server.callmatching.hints import NumberHints
from accessline_server.callmatching.sessions import (
    DEFAULT_MAX_CODE_ATTEMPTS,
    NEEDS_ANI,
    NEEDS_CODE,
    Limits,
    Sessions,
)
from accessline_server.notification import events
from accessline_server.numberdistribution import reservations
from accessline_server.runtime import identity
from accessline_server.runtime.clock import seconds, timestamp
from accessline_server.runtime.errors import (
    Aborted,
    AccesslineError,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)
from accessline_server.runtime.kept import Kept
from accessline_server.runtime.phone import NumberFormatError, normalize_number
from accessline_server.runtime.store import Compare, Entry, Op, Store

if TYPE_CHECKING:
    from accessline.numberdistribution.v1.number_distribution_pb2_grpc import (
        NumberDistributionServiceAsyncStub,
    )
    from accessline_server.callmatching.journey.reads import Journey

log = logging.getLogger("accessline.callmatching")


# Starts of one handoff over, each with the application read afresh, when it changed
# under the one before.
APPLICATION_ATTEMPTS = 3


class ApplicationChanged(Exception):
    """The application changed since the version a handoff used (nothing was stored)."""


@dataclass(frozen=True)
class Handoff:
    application_id: str
    customer_id: str
    context: common_pb2.ContextData
    device_can_dial: bool
    device_can_send_dtmf: bool
    ani_hint: str
    default_region: str
    ttl: float | None
    idempotency_key: str


def _digests(request: Handoff) -> tuple[bytes, bytes]:
    """(customer, whole request) digests that an idempotency key is bound to."""
    customer = hashlib.sha256(request.customer_id.encode()).digest()
    whole = hashlib.sha256()
    for part in (
        request.customer_id.encode(),
        request.context.SerializeToString(deterministic=True),
        request.ani_hint.encode(),
        request.default_region.encode(),
    ):
        whole.update(len(part).to_bytes(4, "big") + part)
    return customer, whole.digest()


class Handoffs:
    """Starting and cancelling handoffs."""

    def __init__(
        self,
        store: Store,
        numbers: NumberDistributionServiceAsyncStub,
        crypto: SessionCrypto,
        limits: Limits,
        applications: Applications,
        sessions: Sessions,
        clock: Callable[[], float] = time.time,
        journey: Journey | None = None,
        hints: NumberHints | None = None,
    ) -> None:
        self._journey = journey
        # Where this replica's sessions wait, for its MatchCall (hints.py).
        self._hints = hints if hints is not None else NumberHints()
        self._store = store
        self._numbers = numbers
        self._crypto = crypto
        self._limits = limits
        self._applications = applications
        self._sessions = sessions
        self._clock = clock
        # Handoffs their apps gave up on, being finished and cancelled.
        self._ending = Kept()

    async def start(self, request: Handoff) -> cm_pb2.StartHandoffResponse:
        """Checks the request against its application, reserves a number (through
        NumberDistribution's contract) and stores the session, fenced by the reservation,
        in one transaction; a repeated request with its idempotency key gets the first
        answer. The application is the version this replica last read: the session's
        transaction holds only while it is still that one, and a refusal its rules made
        stands only once it is read again unchanged; else the handoff starts over with
        the application as it is.

        A request its app gives up on (cancelled, its deadline past) is finished all the
        same, nothing half written, then cancelled, its number given back: the app never
        learnt it. With an idempotency key it is kept, for the app to ask again."""
        starting = asyncio.ensure_future(self._start_any(request))
        try:
            return await asyncio.shield(starting)
        except asyncio.CancelledError:
            self._ending.start(self._given_up(starting, request))
            raise

    async def _given_up(
        self, starting: asyncio.Future[cm_pb2.StartHandoffResponse], request: Handoff
    ) -> None:
        try:
            started = await starting
        except Exception:  # noqa: BLE001 - refused or failed: as for an app still waiting
            return
        if not request.idempotency_key:
            with contextlib.suppress(AccesslineError):
                await self.cancel(started.session_id)
            log.info(
                "handoff given up by its app", extra={"fields": {"session_id": started.session_id}}
            )

    async def _start_any(self, request: Handoff) -> cm_pb2.StartHandoffResponse:
        app = await self._applications.recent(request.application_id)
        for _ in range(APPLICATION_ATTEMPTS):
            try:
                return await self._start(app, request)
            except ApplicationChanged:
                app = await self._applications.fresh(request.application_id)
        raise Aborted(
            f"application {request.application_id} kept changing while the handoff started; retry",
            reason="APPLICATION_CHANGING",
        )

    async def _start(
        self, entry: Entry[cm_pb2.Application], request: Handoff
    ) -> cm_pb2.StartHandoffResponse:
        app = entry.value
        try:
            ani_hash = self._checked_ani_hash(app, request)
        except InvalidArgument:
            if await self._applications.changed(entry):
                raise ApplicationChanged from None
            raise
        idempotency_key = (
            keys.idempotency(app.application_id, request.idempotency_key)
            if request.idempotency_key
            else ""
        )
        if idempotency_key:
            replay = await self._replay(idempotency_key, request)
            if replay is not None:
                return replay
        # The customer's open transactions are read while the number is reserved.
        started = asyncio.get_running_loop().time()
        read = (
            self._journey.read_open_transactions(request.application_id, request.customer_id)
            if self._journey is not None
            else None
        )
        reserved = await self._reserve_for(entry, request, idempotency_key)
        # NumberDistribution may have answered an earlier attempt of this same request.
        session_id = reserved.reservation.session_id
        record, fence = await self._held(reserved)
        context = await self._with_open_transactions(request, read, started)
        session = self._new_session(
            app, request, context, session_id, record, fence, ani_hash, reserved
        )
        replay = await self._store_session(session, fence, idempotency_key, request, entry)
        if replay is not None:
            return replay
        self._hints.note(record.number, session_id, record.pool_id)
        if self._journey is not None:
            self._journey.record_handoff(request.application_id, session_id, request)
        log.info(
            "handoff started",
            extra={
                "fields": {
                    "session_id": session_id,
                    "application_id": app.application_id,
                    "pool_id": record.pool_id,
                }
            },
        )
        return instructions.answer(session, reserved.access_code)

    def _checked_ani_hash(self, app: cm_pb2.Application, request: Handoff) -> bytes:
        """The keyed hash of the caller's number the application matches by (empty when
        it does not); INVALID_ARGUMENT naming every field the application's rules miss."""
        violations = [
            FieldViolation(
                f"context.attributes[{k}]", f"is required by application {app.application_id}"
            )
            for k in app.required_context_keys
            if k not in request.context.attributes
        ]
        ani_hash = b""
        if app.match_schema in NEEDS_ANI:
            if not request.ani_hint:
                violations.append(
                    FieldViolation(
                        "ani_hint", "is required: the application matches the caller's number"
                    )
                )
            else:
                try:
                    ani = normalize_number(
                        request.ani_hint, request.default_region or self._limits.default_region
                    )
                    ani_hash = self._crypto.ani_hash(ani)
                except NumberFormatError as exc:
                    violations.append(FieldViolation("ani_hint", str(exc)))
        if violations:
            raise InvalidArgument(violations)
        return ani_hash

    async def _reserve_for(
        self, entry: Entry[cm_pb2.Application], request: Handoff, idempotency_key: str
    ) -> nd_pb2.ReserveNumberResponse:
        """A number for a new session (with a code when the application matches by one),
        reserved by NumberDistribution; a pool that issues no codes to an application
        that needs them is FAILED_PRECONDITION, its number released at once."""
        app = entry.value
        schema = app.match_schema
        ttl = (
            request.ttl
            if request.ttl is not None
            else app.default_session_ttl.ToNanoseconds() / 1e9
        )
        reserve = nd_pb2.ReserveNumberRequest(
            subject=request.context.subject,
            segment=request.context.customer_segment,
            want_access_code=schema in NEEDS_CODE,
            session_id="s" + secrets.token_urlsafe(15),
            idempotency_key=f"cm:{idempotency_key}" if idempotency_key else "",
        )
        reserve.ttl.FromNanoseconds(int(ttl * 1e9))
        if schema == common_pb2.MATCH_SCHEMA_NUMBER:
            # Only the quarantine keeps a late caller from the number's next customer.
            reserve.min_quarantine.FromNanoseconds(int(self._limits.late_call_window * 1e9))
        if request.context.HasField("location"):
            reserve.device_location.CopyFrom(request.context.location)
        reserved = await self._numbers.ReserveNumber(reserve)
        reservation = reserved.reservation
        if schema in NEEDS_CODE and not reserved.access_code:
            await self._release(reservation.reservation_id)
            if await self._applications.changed(entry):
                raise ApplicationChanged
            raise FailedPrecondition(
                f"pool {reservation.pool_id} issues no access codes, but application"
                f" {app.application_id} matches calls by code",
                reason="POOL_WITHOUT_CODES",
                metadata={"pool_id": reservation.pool_id, "application_id": app.application_id},
            )
        return reserved

    async def _held(
        self, reserved: nd_pb2.ReserveNumberResponse
    ) -> tuple[nd_store.StoredReservation, int]:
        """The reservation as stored and its fencing token, as NumberDistribution's
        answer gives them; read from etcd when the answer has none (a replica of an
        earlier version, during a rolling upgrade). ABORTED when it ended already."""
        if reserved.HasField("stored") and reserved.fencing_revision:
            return reserved.stored, reserved.fencing_revision
        found = await reservations.read_reservation(
            self._store, reserved.reservation.reservation_id
        )
        if found is None:
            raise Aborted(
                "the reservation ended before the session was stored; retry",
                reason="RESERVATION_GONE",
            )
        return found[0], found[1].create_revision

    async def _with_open_transactions(
        self,
        request: Handoff,
        read: asyncio.Future[list[common_pb2.OpenTransaction]] | None,
        started: float,
    ) -> common_pb2.ContextData:
        """The context to seal: the app's, with the customer's open transactions from
        their journey (`read` since `started`; none when the history database does not
        answer at once: a handoff never waits long on it)."""
        context = common_pb2.ContextData()
        context.CopyFrom(request.context)
        del context.open_transactions[:]
        if read is not None and self._journey is not None:
            found = await self._journey.open_transactions_by(read, started)
            context.open_transactions.extend(found)
        return context

    def _new_session(
        self,
        app: cm_pb2.Application,
        request: Handoff,
        context: common_pb2.ContextData,
        session_id: str,
        record: nd_store.StoredReservation,
        fence: int,
        ani_hash: bytes,
        reserved: nd_pb2.ReserveNumberResponse,
    ) -> cm_store.StoredSession:
        """The session as stored: context and code sealed, the reservation it is fenced
        by, the trace of the handoff to continue when the call arrives."""
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return cm_store.StoredSession(
            session_id=session_id,
            application_id=app.application_id,
            customer_id=request.customer_id,
            sealed_context=self._crypto.seal(context.SerializeToString(), session_id),
            reservation=record,
            reservation_revision=fence,
            match_schema=app.match_schema,
            skip_ivr=app.skip_ivr_on_match,
            survey_after_call=app.survey_after_call,
            ani_hash=ani_hash,
            sealed_access_code=self._crypto.seal(reserved.access_code.encode(), session_id)
            if reserved.access_code
            else b"",
            handoff_requested_at=timestamp(self._clock()),
            expires_at=record.expires_at,
            handoff_trace=common_pb2.TraceContext(
                traceparent=carrier.get("traceparent", ""), tracestate=carrier.get("tracestate", "")
            ),
            max_code_attempts=app.max_code_attempts or DEFAULT_MAX_CODE_ATTEMPTS,
            device_can_dial=request.device_can_dial,
            device_can_send_dtmf=request.device_can_send_dtmf,
        )

    async def _store_session(
        self,
        session: cm_store.StoredSession,
        fence: int,
        idempotency_key: str,
        request: Handoff,
        app: Entry[cm_pb2.Application],
    ) -> cm_pb2.StartHandoffResponse | None:
        """Writes the session (and its idempotency record) if the reservation still
        holds and the application is still the version `app`; None when stored, the
        first answer when a concurrent repeat of the request stored its own;
        ApplicationChanged (the number given back) when the application changed, ABORTED
        when the reservation ended meanwhile."""
        record = session.reservation
        app_key = keys.app(app.value.application_id)
        compares = [
            reservations.still_held(record, fence),
            Compare.modified_at(app_key, app.meta.mod_revision),
        ]
        ops = [Op.put(keys.session(session.session_id), session, record.lease_id)]
        failure = [Op.get(app_key)]
        if idempotency_key:
            customer_digest, request_digest = _digests(request)
            compares.append(Compare.absent(idempotency_key))
            ops.append(
                Op.put(
                    idempotency_key,
                    cm_store.HandoffIdempotency(
                        session_id=session.session_id,
                        customer_digest=customer_digest,
                        request_digest=request_digest,
                    ),
                    record.lease_id,
                )
            )
            failure.append(Op.get(idempotency_key))
        result = await self._store.txn(compares, ops, failure)
        if result.succeeded:
            return None
        if idempotency_key and result.first(1) is not None:
            replay = await self._replay(idempotency_key, request)
            if replay is not None:
                return replay
        now = result.first(0)
        if now is None or now.meta.mod_revision != app.meta.mod_revision:
            await self._release(record.reservation_id)
            raise ApplicationChanged
        raise Aborted(
            "the reservation ended before the session was stored; retry",
            reason="RESERVATION_GONE",
        )

    async def _release(self, reservation_id: str) -> None:
        await self._numbers.ReleaseNumber(
            nd_pb2.ReleaseNumberRequest(reservation_id=reservation_id)
        )

    async def _replay(
        self, idempotency_key: str, request: Handoff
    ) -> cm_pb2.StartHandoffResponse | None:
        """The answer already given to this idempotency key, when this is the same
        request again; a key reused by another customer or for another request is
        refused, naming the key."""
        entry = await self._store.get(idempotency_key, cm_store.HandoffIdempotency)
        if entry is None:
            return None
        record = entry.value
        customer, whole = _digests(request)
        if record.customer_digest and not hmac.compare_digest(record.customer_digest, customer):
            raise AlreadyExists(
                f"idempotency key {request.idempotency_key!r} was used by another customer",
                reason="IDEMPOTENCY_KEY_TAKEN",
                metadata={"idempotency_key": request.idempotency_key},
            )
        if record.request_digest and not hmac.compare_digest(record.request_digest, whole):
            raise FailedPrecondition(
                f"idempotency key {request.idempotency_key!r} was used for another request",
                reason="IDEMPOTENCY_KEY_REUSED",
                metadata={"idempotency_key": request.idempotency_key},
            )
        stored = await self._store.get(keys.session(entry.value.session_id), cm_store.StoredSession)
        if stored is None:
            return None
        session = stored.value
        code = (
            self._crypto.unseal(session.sealed_access_code, session.session_id).decode()
            if session.sealed_access_code
            else ""
        )
        return instructions.answer(session, code)

    async def cancel(self, session_id: str) -> None:
        entry = await self._store.get(keys.session(session_id), cm_store.StoredSession)
        if entry is None:
            raise NotFound(f"session {session_id} is not waiting", reason="SESSION_NOT_FOUND")
        session = entry.value
        identity.require_application(session.application_id, f"session {session_id}")
        now = self._clock()
        if seconds(session.expires_at) <= now:
            raise FailedPrecondition(
                f"session {session_id} already expired", reason="SESSION_EXPIRED"
            )
        told = await events.event_ops(
            self._store,
            events.HANDOFF_CANCELLED,
            session.application_id,
            {"session_id": session_id, "customer_id": session.customer_id},
            now,
        )
        ok = await self._sessions.end(
            session,
            entry.meta.mod_revision,
            cm_pb2.SESSION_STATE_CANCELLED,
            "",
            now,
            also_do=told,
        )
        if not ok:
            raise NotFound(f"session {session_id} is not waiting", reason="SESSION_NOT_FOUND")
        if self._journey is not None:
            self._journey.record_session_end(session.application_id, session_id, "CANCELLED", now)
