"""The rules of call matching: applications and their schemas, the handoff session that
waits for the call under its number's reservation lease, and the match of a voice call
to it — exactly once, in one etcd transaction that consumes the session, ends the
reservation and starts the number's quarantine. No gRPC here but the NumberDistribution
client it is given."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opentelemetry import metrics, propagate, trace

from accessline.callmatching.storage.v1 import storage_pb2 as cm_store
from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.common.v1 import common_pb2
from accessline.numberdistribution.storage.v1 import storage_pb2 as nd_store
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from services.callmatching import failures, keys
from services.callmatching.crypto import SessionCrypto
from services.callmatching.history import MatchHistory
from services.numberdistribution import reservations
from services.runtime import identity
from services.runtime.clock import seconds, timestamp
from services.runtime.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)
from services.runtime.phone import NumberFormatError, display_number, normalize_number
from services.runtime.store import Compare, Entry, KeyMeta, Op, Store
from services.runtime.telemetry import span_context_from

if TYPE_CHECKING:
    from accessline.numberdistribution.v1.number_distribution_pb2_grpc import (
        NumberDistributionServiceAsyncStub,
    )

log = logging.getLogger("accessline.callmatching")
tracer = trace.get_tracer("accessline.callmatching")

DEFAULT_SESSION_TTL = 300.0
# Histogram buckets in seconds: a decision takes milliseconds, a customer dials in seconds.
DECISION_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
HANDOFF_BUCKETS = [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0]
DEFAULT_MAX_CODE_ATTEMPTS = 3
# A right call retries its final transaction while wrong codes keep changing the session;
# they can do so at most max_code_attempts (at most 20) times before it locks.
MAX_MATCH_ROUNDS = 24

NEEDS_ANI = {common_pb2.MATCH_SCHEMA_NUMBER_ANI, common_pb2.MATCH_SCHEMA_NUMBER_ANI_CODE}
NEEDS_CODE = {common_pb2.MATCH_SCHEMA_NUMBER_CODE, common_pb2.MATCH_SCHEMA_NUMBER_ANI_CODE}
# Outcomes counted in the failure buckets (failures.py).
FAILURES = {
    cm_pb2.MATCH_OUTCOME_NO_RESERVATION,
    cm_pb2.MATCH_OUTCOME_ANI_MISMATCH,
    cm_pb2.MATCH_OUTCOME_CODE_MISMATCH,
    cm_pb2.MATCH_OUTCOME_LOCKED_OUT,
    cm_pb2.MATCH_OUTCOME_EXPIRED,
    cm_pb2.MATCH_OUTCOME_STALE_CODE,
}


def _rate_limited(resource_group: str = "") -> cm_pb2.MatchCallResponse:
    """RATE_LIMITED, with the number's group: the call goes on unmatched, routed there."""
    return cm_pb2.MatchCallResponse(
        outcome=cm_pb2.MATCH_OUTCOME_RATE_LIMITED, resource_group=resource_group
    )


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


def guess_success_probability(code_length: int, max_attempts: int) -> float:
    """Chance that someone guessing codes on one reservation hits it before it locks:
    at most `max_attempts` distinct guesses among 10**code_length codes."""
    return float(min(1.0, max_attempts / 10**code_length))


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


@dataclass(frozen=True)
class Call:
    call_id: str
    dnis: str
    ani: str
    dtmf: str
    arrived_at: float | None
    default_region: str


@dataclass
class Limits:
    session_retention: float
    failures: failures.FailureLimits
    default_region: str
    late_call_window: float = 60.0


def _candidate(
    resolved: nd_pb2.ResolveNumberResponse,
) -> tuple[nd_pb2.ResolvedReservation | None, cm_pb2.MatchOutcome.ValueType]:
    """The reservation a call to the resolved number is for, or None and why: nothing
    reserved (or expired), or on a shared number no reservation whose code matched."""
    if not resolved.reservations:
        return None, (
            cm_pb2.MATCH_OUTCOME_EXPIRED
            if resolved.expired_reservations
            else cm_pb2.MATCH_OUTCOME_NO_RESERVATION
        )
    candidates = list(resolved.reservations)
    if len(candidates) > 1:
        # A shared number: only the code tells the reservations apart.
        candidates = [r for r in candidates if r.code_check == nd_pb2.CODE_CHECK_MATCH]
        if not candidates:
            return None, (
                cm_pb2.MATCH_OUTCOME_STALE_CODE
                if resolved.reservations[0].code_check == nd_pb2.CODE_CHECK_SPENT
                else cm_pb2.MATCH_OUTCOME_CODE_MISMATCH
            )
    return candidates[0], cm_pb2.MATCH_OUTCOME_MATCHED


class CallMatching:
    """Handoff sessions and call matching on one etcd, safe to run as several replicas."""

    def __init__(
        self,
        store: Store,
        numbers: NumberDistributionServiceAsyncStub,
        crypto: SessionCrypto,
        history: MatchHistory,
        limits: Limits,
        *,
        meter: metrics.Meter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._numbers = numbers
        self._crypto = crypto
        self._history = history
        self._limits = limits
        self._clock = clock
        meter = meter or metrics.get_meter("accessline.callmatching")
        self._outcomes = meter.create_counter(
            "accessline.match.outcomes", unit="{call}", description="Match decisions by outcome"
        )
        self._decision = meter.create_histogram(
            "accessline.match.decision.duration",
            unit="s",
            description="From the call's arrival to the match decision",
            explicit_bucket_boundaries_advisory=DECISION_BUCKETS,
        )
        self._waited = meter.create_histogram(
            "accessline.match.handoff_to_call.duration",
            unit="s",
            description="From the handoff request to the call's arrival, for matched calls",
            explicit_bucket_boundaries_advisory=HANDOFF_BUCKETS,
        )

    # -- applications -----------------------------------------------------------------

    async def register_application(self, app: cm_pb2.Application) -> cm_pb2.Application:
        stored = cm_pb2.Application()
        stored.CopyFrom(app)
        if not stored.HasField("default_session_ttl"):
            stored.default_session_ttl.FromSeconds(int(DEFAULT_SESSION_TTL))
        if not stored.max_code_attempts:
            stored.max_code_attempts = DEFAULT_MAX_CODE_ATTEMPTS
        await self._store.put(keys.app(app.application_id), stored)
        return stored

    async def get_application(self, application_id: str) -> cm_pb2.Application:
        entry = await self._store.get(keys.app(application_id), cm_pb2.Application)
        if entry is None:
            raise NotFound(
                f"application {application_id} is not registered",
                reason="APPLICATION_NOT_FOUND",
                metadata={"application_id": application_id},
            )
        return entry.value

    async def list_applications(
        self, page_size: int, page_token: str
    ) -> tuple[list[cm_pb2.Application], str]:
        entries, _ = await self._store.get_prefix(
            keys.APPS,
            cm_pb2.Application,
            limit=page_size + 1,
            start_after=keys.app(page_token) if page_token else None,
        )
        apps = [e.value for e in entries[:page_size]]
        return apps, apps[-1].application_id if len(entries) > page_size else ""

    # -- handoff ----------------------------------------------------------------------

    async def start_handoff(self, request: Handoff) -> cm_pb2.StartHandoffResponse:
        """Checks the request against its application, reserves a number (through
        NumberDistribution's contract) and stores the session, fenced by the reservation,
        in one transaction; a repeated request with its idempotency key gets the first
        answer."""
        app = await self.get_application(request.application_id)
        ani_hash = self._checked_ani_hash(app, request)
        idempotency_key = (
            keys.idempotency(app.application_id, request.idempotency_key)
            if request.idempotency_key
            else ""
        )
        if idempotency_key:
            replay = await self._replay(idempotency_key, request)
            if replay is not None:
                return replay
        reserved = await self._reserve_for(app, request, idempotency_key)
        # NumberDistribution may have answered an earlier attempt of this same request.
        session_id = reserved.reservation.session_id
        found = await reservations.read_reservation(
            self._store, reserved.reservation.reservation_id
        )
        if found is None:
            raise Aborted(
                "the reservation ended before the session was stored; retry",
                reason="RESERVATION_GONE",
            )
        record, meta = found
        session = self._new_session(app, request, session_id, record, meta, ani_hash, reserved)
        replay = await self._store_session(session, meta, idempotency_key, request)
        if replay is not None:
            return replay
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
        return self._handoff_answer(session, reserved.access_code)

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
        self, app: cm_pb2.Application, request: Handoff, idempotency_key: str
    ) -> nd_pb2.ReserveNumberResponse:
        """A number for a new session (with a code when the application matches by one),
        reserved by NumberDistribution; a pool that issues no codes to an application
        that needs them is FAILED_PRECONDITION, its number released at once."""
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
            await self._numbers.ReleaseNumber(
                nd_pb2.ReleaseNumberRequest(reservation_id=reservation.reservation_id)
            )
            raise FailedPrecondition(
                f"pool {reservation.pool_id} issues no access codes, but application"
                f" {app.application_id} matches calls by code",
                reason="POOL_WITHOUT_CODES",
                metadata={"pool_id": reservation.pool_id, "application_id": app.application_id},
            )
        return reserved

    def _new_session(
        self,
        app: cm_pb2.Application,
        request: Handoff,
        session_id: str,
        record: nd_store.StoredReservation,
        meta: KeyMeta,
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
            sealed_context=self._crypto.seal(request.context.SerializeToString(), session_id),
            reservation=record,
            reservation_revision=meta.create_revision,
            match_schema=app.match_schema,
            skip_ivr=app.skip_ivr_on_match,
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
        meta: KeyMeta,
        idempotency_key: str,
        request: Handoff,
    ) -> cm_pb2.StartHandoffResponse | None:
        """Writes the session (and its idempotency record) if the reservation still
        holds; None when stored, the first answer when a concurrent repeat of the request
        stored its own; ABORTED when the reservation ended meanwhile."""
        record = session.reservation
        compares = [reservations.still_held(record, meta.create_revision)]
        ops = [Op.put(keys.session(session.session_id), session, record.lease_id)]
        failure: list[Op] = []
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
        if idempotency_key and result.first() is not None:
            replay = await self._replay(idempotency_key, request)
            if replay is not None:
                return replay
        raise Aborted(
            "the reservation ended before the session was stored; retry",
            reason="RESERVATION_GONE",
        )

    def _handoff_answer(
        self, session: cm_store.StoredSession, code: str
    ) -> cm_pb2.StartHandoffResponse:
        number = session.reservation.number
        shown = display_number(number)
        dial = number
        if code and session.device_can_send_dtmf:
            dial = f"{number},,{code}#"
        text = f"Call {shown}"
        if code:
            text += f" and, when asked, key in {code} followed by #"
        display = cm_pb2.DisplayInstructions(
            number_display=shown, code_display=code, text=text + "."
        )
        return cm_pb2.StartHandoffResponse(
            session_id=session.session_id,
            access_number=number,
            access_code=code,
            expires_at=session.expires_at,
            dial_string=dial if session.device_can_dial else "",
            display=display,
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
        return self._handoff_answer(session, code)

    async def cancel_handoff(self, session_id: str) -> None:
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
        ok = await self._end(
            session, entry.meta.mod_revision, cm_pb2.SESSION_STATE_CANCELLED, "", now
        )
        if not ok:
            raise NotFound(f"session {session_id} is not waiting", reason="SESSION_NOT_FOUND")

    async def _end(
        self,
        session: cm_store.StoredSession,
        revision: int,
        state: int,
        call_id: str,
        now: float,
        also_if: Sequence[Compare] = (),
        also_do: Sequence[Op] = (),
    ) -> bool:
        """In one transaction: the session is consumed (if unchanged since read and
        `also_if` holds), its reservation ends, its number goes into quarantine, the
        outcome is kept, and `also_do` is done."""
        compares, ops, _ = await reservations.release_ops(
            self._store, session.reservation, session.reservation_revision, now
        )
        outcome = cm_store.StoredOutcome(
            session_id=session.session_id,
            state=state,  # type: ignore[arg-type]
            merged_session_id=session.session_id if state == cm_pb2.SESSION_STATE_MATCHED else "",
            call_id=call_id,
            ended_at=timestamp(now),
            application_id=session.application_id,
        )
        retention = await self._store.shared_lease(self._limits.session_retention, window=10.0)
        compares += [Compare.modified_at(keys.session(session.session_id), revision), *also_if]
        ops += [
            Op.delete(keys.session(session.session_id)),
            Op.put(keys.outcome(session.session_id), outcome, retention),
            *also_do,
        ]
        result = await self._store.txn(compares, ops)
        return result.succeeded

    async def get_session(self, session_id: str) -> cm_pb2.GetSessionResponse:
        result = await self._store.txn(
            [], [Op.get(keys.session(session_id)), Op.get(keys.outcome(session_id))]
        )
        waiting, ended = result.gets
        if waiting:
            session = cm_store.StoredSession.FromString(waiting[0][1])
            identity.require_application(session.application_id, f"session {session_id}")
            state = (
                cm_pb2.SESSION_STATE_WAITING_FOR_CALL
                if seconds(session.expires_at) > self._clock()
                else cm_pb2.SESSION_STATE_EXPIRED
            )
            return cm_pb2.GetSessionResponse(
                session_id=session_id,
                state=state,
                expires_at=session.expires_at,
                application_id=session.application_id,
            )
        if ended:
            outcome = cm_store.StoredOutcome.FromString(ended[0][1])
            identity.require_application(outcome.application_id, f"session {session_id}")
            return cm_pb2.GetSessionResponse(
                session_id=session_id,
                state=outcome.state,
                merged_session_id=outcome.merged_session_id,
                call_id=outcome.call_id,
                expires_at=outcome.ended_at,
                application_id=outcome.application_id,
            )
        raise NotFound(
            f"session {session_id} is unknown, or ended longer ago than the retention period",
            reason="SESSION_NOT_FOUND",
        )

    # -- matching ---------------------------------------------------------------------

    async def match_call(self, call: Call) -> cm_pb2.MatchCallResponse:
        arrived = call.arrived_at if call.arrived_at is not None else self._clock()
        region = call.default_region or self._limits.default_region
        try:
            dnis = normalize_number(call.dnis, region)
        except NumberFormatError as exc:
            raise InvalidArgument([FieldViolation("dnis", str(exc))]) from None
        try:
            ani = normalize_number(call.ani, region) if call.ani else ""
        except NumberFormatError:
            ani = ""  # "anonymous", "restricted" and the like: withheld
        ani_hash = self._crypto.ani_hash(ani) if ani else b""
        attempt = cm_pb2.MatchAttempt(
            attempt_id="a" + secrets.token_urlsafe(15),
            call_id=call.call_id,
            access_number=dnis,
            ani_hash=ani_hash.hex(),
            call_arrived_at=timestamp(arrived),
        )
        span = trace.get_current_span()
        response = await self._decide(call, dnis, ani_hash, attempt)
        now = self._clock()
        attempt.outcome = response.outcome
        attempt.decided_at.CopyFrom(timestamp(now))
        self._history.record(attempt)
        labels = {"accessline.match.outcome": cm_pb2.MatchOutcome.Name(response.outcome)}
        if attempt.application_id:
            labels["accessline.application"] = attempt.application_id
        self._outcomes.add(1, labels)
        self._decision.record(max(0.0, now - arrived), labels)
        if response.outcome == cm_pb2.MATCH_OUTCOME_MATCHED and attempt.HasField(
            "handoff_requested_at"
        ):
            self._waited.record(max(0.0, arrived - seconds(attempt.handoff_requested_at)), labels)
        span.set_attribute("accessline.match.outcome", labels["accessline.match.outcome"])
        span.set_attribute(
            "accessline.match.schema", common_pb2.MatchSchema.Name(attempt.match_schema)
        )
        if attempt.application_id:
            span.set_attribute("accessline.application", attempt.application_id)
        if attempt.pool_id:
            span.set_attribute("accessline.pool", attempt.pool_id)
        log.info(
            "call match decided",
            extra={
                "fields": {
                    "call_id": call.call_id,
                    "outcome": labels["accessline.match.outcome"],
                    "session_id": attempt.session_id,
                }
            },
        )
        return response

    async def _decide(
        self, call: Call, dnis: str, ani_hash: bytes, attempt: cm_pb2.MatchAttempt
    ) -> cm_pb2.MatchCallResponse:
        """The decision, told only when the attempt's failure buckets are below their
        limits: a failure is answered only once counted, a match commits only while the
        buckets are below their limits (see failures.py)."""
        buckets = self._limits.failures.buckets(ani_hash, dnis)
        if await failures.full(self._store, buckets):
            # The number's group only (no digits: nothing is checked, nothing is told).
            resolved = await self._numbers.ResolveNumber(
                nd_pb2.ResolveNumberRequest(dialled_number=dnis)
            )
            attempt.pool_id = resolved.pool_id
            return _rate_limited(resolved.resource_group)
        response, counted = await self._judge(call, dnis, ani_hash, attempt, buckets)
        window = self._limits.failures.window
        if (
            response.outcome in FAILURES
            and not counted
            and not await failures.count(self._store, buckets, window)
        ):
            return _rate_limited(response.resource_group)
        return response

    async def _judge(
        self,
        call: Call,
        dnis: str,
        ani_hash: bytes,
        attempt: cm_pb2.MatchAttempt,
        buckets: tuple[failures.Bucket, ...],
    ) -> tuple[cm_pb2.MatchCallResponse, bool]:
        """The decision and whether its failure is counted already."""
        resolved = await self._numbers.ResolveNumber(
            nd_pb2.ResolveNumberRequest(dialled_number=dnis, dtmf_digits=call.dtmf)
        )
        attempt.pool_id = resolved.pool_id
        unmatched = cm_pb2.MatchCallResponse(resource_group=resolved.resource_group)
        chosen, outcome = _candidate(resolved)
        if chosen is None:
            unmatched.outcome = outcome
            return unmatched, False
        entry = await self._store.get(
            keys.session(chosen.reservation.session_id), cm_store.StoredSession
        )
        if entry is None:
            unmatched.outcome = cm_pb2.MATCH_OUTCOME_NO_RESERVATION
            return unmatched, False
        session = entry.value
        self._note_session(session, attempt, unmatched)
        now = self._clock()
        refused = self._mismatch(session, ani_hash, chosen, now)
        if refused is not None:
            unmatched.outcome = refused
            return unmatched, False
        if session.match_schema in NEEDS_CODE and chosen.code_check != nd_pb2.CODE_CHECK_MATCH:
            unmatched.outcome = await self._wrong_code(
                session, entry.meta.mod_revision, call.call_id, now, buckets
            )
            return unmatched, True
        consumed, limited = await self._consume(entry, call, now, buckets)
        if limited:
            return _rate_limited(resolved.resource_group), True
        if consumed is None:
            unmatched.outcome = cm_pb2.MATCH_OUTCOME_NO_RESERVATION
            return unmatched, False
        return self._matched(consumed, resolved.resource_group), False

    @staticmethod
    def _note_session(
        session: cm_store.StoredSession,
        attempt: cm_pb2.MatchAttempt,
        unmatched: cm_pb2.MatchCallResponse,
    ) -> None:
        """The session the call is judged against, in its attempt record and answer; the
        voice call's trace points at the data-session request that prepared it."""
        handoff = span_context_from(
            session.handoff_trace.traceparent, session.handoff_trace.tracestate
        )
        if handoff is not None:
            trace.get_current_span().add_link(handoff, {"accessline.link": "handoff"})
        attempt.session_id = session.session_id
        attempt.application_id = session.application_id
        attempt.match_schema = session.match_schema
        attempt.handoff_requested_at.CopyFrom(session.handoff_requested_at)
        unmatched.match_schema = session.match_schema
        unmatched.handoff_requested_at.CopyFrom(session.handoff_requested_at)

    def _mismatch(
        self,
        session: cm_store.StoredSession,
        ani_hash: bytes,
        chosen: nd_pb2.ResolvedReservation,
        now: float,
    ) -> cm_pb2.MatchOutcome.ValueType | None:
        """Why the call cannot match the session, short of a wrong code (which is
        counted): expired, the caller's number withheld or another, or a spent code."""
        if seconds(session.expires_at) <= now:
            return cm_pb2.MATCH_OUTCOME_EXPIRED
        if session.match_schema in NEEDS_ANI:
            if not ani_hash:
                return cm_pb2.MATCH_OUTCOME_ANI_WITHHELD
            if not self._crypto.same(ani_hash, session.ani_hash):
                return cm_pb2.MATCH_OUTCOME_ANI_MISMATCH
        if session.match_schema in NEEDS_CODE and chosen.code_check == nd_pb2.CODE_CHECK_SPENT:
            # The code of an ended session on this number: a late caller, whom nothing
            # is counted against the session waiting on the number now.
            return cm_pb2.MATCH_OUTCOME_STALE_CODE
        return None

    async def _consume(
        self,
        entry: Entry[cm_store.StoredSession],
        call: Call,
        now: float,
        buckets: tuple[failures.Bucket, ...],
    ) -> tuple[cm_store.StoredSession | None, bool]:
        """Consumes the session for this call, with its reservation, in one
        transaction: (the session consumed or None when another call had it, whether a
        failure bucket filled meanwhile)."""
        session, revision = entry.value, entry.meta.mod_revision
        for _ in range(MAX_MATCH_ROUNDS):
            if await self._end(
                session,
                revision,
                cm_pb2.SESSION_STATE_MATCHED,
                call.call_id,
                now,
                failures.below(buckets),
            ):
                return session, False
            # The session changed since it was read: consumed by another call (maybe on
            # another replica), or only a wrong code counted on it, which must not keep
            # the right caller out; or a failure bucket filled meanwhile. Decide again on
            # what is there now.
            full, fresh = await self._fresh(session.session_id, buckets)
            if full:
                return None, True
            if fresh is None or fresh.value.reservation.reservation_id != (
                session.reservation.reservation_id
            ):
                return None, False
            session, revision = fresh.value, fresh.meta.mod_revision
        return None, False

    def _matched(
        self, session: cm_store.StoredSession, resource_group: str
    ) -> cm_pb2.MatchCallResponse:
        """The answer to a matched call: the session's context unsealed."""
        context = common_pb2.ContextData.FromString(
            self._crypto.unseal(session.sealed_context, session.session_id)
        )
        return cm_pb2.MatchCallResponse(
            outcome=cm_pb2.MATCH_OUTCOME_MATCHED,
            session_id=session.session_id,
            application_id=session.application_id,
            customer_id=session.customer_id,
            context=context,
            skip_ivr=session.skip_ivr,
            match_schema=session.match_schema,
            resource_group=resource_group,
            handoff_trace=session.handoff_trace,
            handoff_requested_at=session.handoff_requested_at,
        )

    async def _wrong_code(
        self,
        session: cm_store.StoredSession,
        revision: int,
        call_id: str,
        now: float,
        buckets: tuple[failures.Bucket, ...],
    ) -> cm_pb2.MatchOutcome.ValueType:
        """Counts a wrong code on the session and in the failure buckets, in one
        transaction; at the session's limit it is locked and its number released.
        RATE_LIMITED (nothing counted) when a bucket is full."""
        limits = self._limits.failures
        while True:
            counts = failures.below(buckets)
            bump = await failures.count_ops(self._store, buckets, limits.window)
            attempts = session.failed_code_attempts + 1
            if attempts >= session.max_code_attempts:
                if await self._end(
                    session, revision, cm_pb2.SESSION_STATE_LOCKED, call_id, now, counts, bump
                ):
                    log.warning(
                        "session locked after wrong access codes",
                        extra={"fields": {"session_id": session.session_id}},
                    )
                    return cm_pb2.MATCH_OUTCOME_LOCKED_OUT
            else:
                counted = cm_store.StoredSession()
                counted.CopyFrom(session)
                counted.failed_code_attempts = attempts
                key = keys.session(session.session_id)
                result = await self._store.txn(
                    [*counts, Compare.modified_at(key, revision)],
                    [*bump, Op.put(key, counted, session.reservation.lease_id)],
                )
                if result.succeeded:
                    return cm_pb2.MATCH_OUTCOME_CODE_MISMATCH
            # A concurrent attempt changed the session, or filled a bucket.
            full, fresh = await self._fresh(session.session_id, buckets)
            if full:
                return cm_pb2.MATCH_OUTCOME_RATE_LIMITED
            if fresh is None or fresh.value.reservation.reservation_id != (
                session.reservation.reservation_id
            ):
                # The session ended meanwhile (matched, locked or cancelled): nothing of
                # it is left to guess; the wrong code counts in the buckets alone.
                if await failures.count(self._store, buckets, limits.window):
                    return cm_pb2.MATCH_OUTCOME_NO_RESERVATION
                return cm_pb2.MATCH_OUTCOME_RATE_LIMITED
            session, revision = fresh.value, fresh.meta.mod_revision

    async def _fresh(
        self, session_id: str, buckets: tuple[failures.Bucket, ...]
    ) -> tuple[bool, Entry[cm_store.StoredSession] | None]:
        """In one read: whether a failure bucket is full, and the session as it is now."""
        result = await self._store.txn(
            [], [Op.get(keys.session(session_id)), *(Op.get(b.key) for b in buckets)]
        )
        full = any(
            found and found[0][2].version >= bucket.limit
            for bucket, found in zip(buckets, result.gets[1:], strict=True)
        )
        if not result.gets[0]:
            return full, None
        key, value, meta = result.gets[0][0]
        return full, Entry(key, cm_store.StoredSession.FromString(value), meta)

    # -- history ----------------------------------------------------------------------

    @property
    def history(self) -> MatchHistory:
        return self._history
