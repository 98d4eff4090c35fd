"""The match of a voice call to the session waiting on the number it dialled — exactly
once, in one etcd transaction that consumes the session, ends the reservation and starts
the number's quarantine; wrong codes counted on the session and in the failure buckets
in the same transaction. What the dialled number holds is read with CallMatching's own
keys, through NumberDistribution's published `dialled` module: no gRPC here."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from opentelemetry import metrics, trace

from accessline.callmatching.storage.v1 import storage_pb2 as cm_store
from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.common.v1 import common_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline_server.callmatching import failures, keys
from accessline_server.callmatching.crypto import SessionCrypto
from accessline_server.callmatching.hints import NumberHints, Prefetched
from accessline_server.callmatching.history import MatchHistory
from accessline_server.callmatching.journey.reads import Journey
from accessline_server.callmatching.measures import MatchMeasures
from accessline_server.callmatching.sessions import NEEDS_ANI, NEEDS_CODE, Limits, Sessions
from accessline_server.notification import events
from accessline_server.numberdistribution.dialled import (
    Dialled,
    DialledReader,
    pool_read,
    resource_group,
)
from accessline_server.runtime.clock import seconds, timestamp
from accessline_server.runtime.errors import FieldViolation, InvalidArgument
from accessline_server.runtime.phone import NumberFormatError, normalize_number
from accessline_server.runtime.store import Compare, Entry, Op, RawKV, Store, decode
from accessline_server.runtime.telemetry import span_context_from

log = logging.getLogger("accessline.callmatching")

# A right call retries its final transaction while wrong codes keep changing the session;
# they can do so at most max_code_attempts (at most 20) times before it locks.
MAX_MATCH_ROUNDS = 24
# How long a matched call's answer is kept for the switch asking again about the same
# call (its first answer lost): long enough for its retries, short enough that a call id
# a switch reuses later is not mistaken for it.
CALL_ANSWER_KEPT_SECONDS = 300.0
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


@dataclass(frozen=True)
class Call:
    call_id: str
    dnis: str
    ani: str
    dtmf: str
    arrived_at: float | None
    default_region: str


def _candidate(
    dialled: Dialled,
) -> tuple[nd_pb2.ResolvedReservation | None, cm_pb2.MatchOutcome.ValueType]:
    """The reservation a call to the dialled number is for, or None and why: nothing
    reserved (or expired), or on a shared number no reservation whose code matched."""
    if not dialled.reservations:
        return None, (
            cm_pb2.MATCH_OUTCOME_EXPIRED if dialled.expired else cm_pb2.MATCH_OUTCOME_NO_RESERVATION
        )
    candidates = list(dialled.reservations)
    if len(candidates) > 1:
        # A shared number: only the code tells the reservations apart.
        candidates = [r for r in candidates if r.code_check == nd_pb2.CODE_CHECK_MATCH]
        if not candidates:
            return None, (
                cm_pb2.MATCH_OUTCOME_STALE_CODE
                if dialled.reservations[0].code_check == nd_pb2.CODE_CHECK_SPENT
                else cm_pb2.MATCH_OUTCOME_CODE_MISMATCH
            )
    return candidates[0], cm_pb2.MATCH_OUTCOME_MATCHED


class Matcher:
    """Matching calls to sessions, on one etcd, safe to run as several replicas."""

    def __init__(
        self,
        store: Store,
        dialled: DialledReader,
        crypto: SessionCrypto,
        history: MatchHistory,
        limits: Limits,
        sessions: Sessions,
        *,
        meter: metrics.Meter | None = None,
        clock: Callable[[], float] = time.time,
        journey: Journey | None = None,
        hints: NumberHints | None = None,
    ) -> None:
        self._store = store
        self._dialled = dialled
        self._crypto = crypto
        self._history = history
        self._journey = journey
        self._limits = limits
        self._sessions = sessions
        self._clock = clock
        # The sessions this replica stored on numbers (Handoffs notes them).
        self.hints = hints if hints is not None else NumberHints()
        self._measures = MatchMeasures(meter or metrics.get_meter("accessline.callmatching"))

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
        response = await self._decide(call, dnis, ani_hash, attempt)
        now = self._clock()
        attempt.outcome = response.outcome
        attempt.decided_at.CopyFrom(timestamp(now))
        self._history.record(attempt)
        if self._journey is not None:
            self._journey.record_match(attempt, response, now, ani)
        self._measures.decided(call.call_id, response, attempt, arrived, now)
        return response

    async def _decide(
        self, call: Call, dnis: str, ani_hash: bytes, attempt: cm_pb2.MatchAttempt
    ) -> cm_pb2.MatchCallResponse:
        """The decision, told only when the attempt's failure buckets are below their
        limits: a failure is answered only once counted, a match commits only while the
        buckets are below their limits (see failures.py)."""
        buckets = self._limits.failures.buckets(ani_hash, dnis)
        n = len(buckets)
        hint = self.hints.get(dnis)
        found = await self._store.txn(
            [],
            [
                *(Op.get(b.key) for b in buckets),
                Op.get(keys.matched_call(call.call_id)),
                *self._dialled.reads(dnis, call.dtmf),
                *(hint.reads() if hint is not None else ()),
            ],
        )
        answered = self._answered_before(call.call_id, dnis, found.gets[n], attempt)
        if answered is not None:
            return answered
        full = failures.full_in(buckets, found.gets[:n])
        prefetched, end = Prefetched.split(hint, found.gets)
        # With a bucket full, the number's group only (no digits: nothing is checked,
        # nothing is told).
        dialled = self._dialled.dialled(
            dnis, "" if full else call.dtmf, found.gets[n + 1 : end], self._clock()
        )
        attempt.pool_id = dialled.pool_id
        if full:
            return _rate_limited(await self._group(dialled.pool_id, prefetched))
        response, counted = await self._judge(
            call, dnis, dialled, ani_hash, buckets, attempt, prefetched
        )
        window = self._limits.failures.window
        if (
            response.outcome in FAILURES
            and not counted
            and not await failures.count(self._store, buckets, window)
        ):
            return _rate_limited(response.resource_group)
        return response

    def _answered_before(
        self,
        call_id: str,
        dnis: str,
        rows: Sequence[RawKV],
        attempt: cm_pb2.MatchAttempt,
    ) -> cm_pb2.MatchCallResponse | None:
        """The answer this call was matched with already, when the switch asks again
        about the same call on the same number (its first answer lost)."""
        if not rows:
            return None
        record = cm_store.MatchedCall.FromString(rows[0].value)
        if record.dnis != dnis:
            return None
        answer = cm_pb2.MatchCallResponse.FromString(
            self._crypto.unseal(record.sealed_answer, keys.matched_call(call_id))
        )
        attempt.session_id = answer.session_id
        attempt.application_id = answer.application_id
        attempt.match_schema = answer.match_schema
        attempt.handoff_requested_at.CopyFrom(answer.handoff_requested_at)
        log.info(
            "call asked about again: its match answered again",
            extra={"fields": {"call_id": call_id, "session_id": answer.session_id}},
        )
        return answer

    async def _group(self, pool_id: str, prefetched: Prefetched | None) -> str:
        """The resource group of the pool's calls, from NumberDistribution's pool (as
        `prefetched` when it read it)."""
        if not pool_id:
            return ""
        rows = prefetched.pool(pool_id) if prefetched is not None else None
        if rows is None:
            rows = (await self._store.txn([], [pool_read(pool_id)])).gets[0]
        return resource_group(pool_id, rows)

    async def _judge(
        self,
        call: Call,
        dnis: str,
        dialled: Dialled,
        ani_hash: bytes,
        buckets: tuple[failures.Bucket, ...],
        attempt: cm_pb2.MatchAttempt,
        prefetched: Prefetched | None,
    ) -> tuple[cm_pb2.MatchCallResponse, bool]:
        """The decision and whether its failure is counted already."""
        chosen, outcome = _candidate(dialled)
        if chosen is None:
            group = await self._group(dialled.pool_id, prefetched)
            return cm_pb2.MatchCallResponse(outcome=outcome, resource_group=group), False
        session_id = chosen.reservation.session_id
        key = keys.session(session_id)
        gets = (
            prefetched.session_and_pool(session_id, dialled.pool_id)
            if prefetched is not None
            else None
        )
        if gets is None:
            gets = (await self._store.txn([], [Op.get(key), pool_read(dialled.pool_id)])).gets
        group = resource_group(dialled.pool_id, gets[1])
        unmatched = cm_pb2.MatchCallResponse(resource_group=group)
        if not gets[0]:
            unmatched.outcome = cm_pb2.MATCH_OUTCOME_NO_RESERVATION
            return unmatched, False
        row = gets[0][0]
        entry = Entry(key, decode(cm_store.StoredSession, key, row.value), row.meta)
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
        consumed, limited = await self._consume(entry, call, dnis, group, now, buckets)
        if limited:
            return _rate_limited(group), True
        if consumed is None:
            unmatched.outcome = cm_pb2.MATCH_OUTCOME_NO_RESERVATION
            return unmatched, False
        return consumed, False

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
        dnis: str,
        resource_group: str,
        now: float,
        buckets: tuple[failures.Bucket, ...],
    ) -> tuple[cm_pb2.MatchCallResponse | None, bool]:
        """Consumes the session for this call, with its reservation, in one
        transaction that also keeps the answer for the call asked about again: (the
        answer, or None when another call had the session; whether a failure bucket
        filled meanwhile)."""
        session, revision = entry.value, entry.meta.mod_revision
        key = keys.matched_call(call.call_id)
        kept_for = await self._store.shared_lease(CALL_ANSWER_KEPT_SECONDS, window=10.0)
        for _ in range(MAX_MATCH_ROUNDS):
            answer = self._matched(session, resource_group)
            kept = cm_store.MatchedCall(
                dnis=dnis,
                sealed_answer=self._crypto.seal(answer.SerializeToString(), key),
            )
            told = await events.event_ops(
                self._store,
                events.HANDOFF_MATCHED,
                session.application_id,
                {
                    "session_id": session.session_id,
                    "customer_id": session.customer_id,
                    "call_id": call.call_id,
                },
                now,
            )
            if await self._sessions.end(
                session,
                revision,
                cm_pb2.SESSION_STATE_MATCHED,
                call.call_id,
                now,
                failures.below(buckets),
                [Op.put(key, kept, kept_for), *told],
            ):
                self.hints.drop(dnis)
                return answer, False
            # The session changed since it was read: consumed by another call (maybe on
            # another replica), or only a wrong code counted on it, which must not keep
            # the right caller out; or a failure bucket filled meanwhile. Decide again on
            # what is there now.
            full, fresh = await self._sessions.fresh(session.session_id, buckets)
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
            survey_after_call=session.survey_after_call,
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
                if await self._sessions.end(
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
            full, fresh = await self._sessions.fresh(session.session_id, buckets)
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
