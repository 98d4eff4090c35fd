"""A handoff session's lifecycle in etcd, shared by the handoff and the match: the
limits every replica applies, reading a session as it is now, reading what became of
it, and ending it — in one transaction with its reservation's end and its number's
quarantine."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from accessline.callmatching.storage.v1 import storage_pb2 as cm_store
from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.common.v1 import common_pb2
from accessline_server.callmatching import failures, keys
from accessline_server.numberdistribution import reservations
from accessline_server.runtime import identity
from accessline_server.runtime.clock import seconds, timestamp
from accessline_server.runtime.errors import NotFound
from accessline_server.runtime.store import Compare, Entry, Op, Store

DEFAULT_SESSION_TTL = 300.0
DEFAULT_MAX_CODE_ATTEMPTS = 3

NEEDS_ANI = {common_pb2.MATCH_SCHEMA_NUMBER_ANI, common_pb2.MATCH_SCHEMA_NUMBER_ANI_CODE}
NEEDS_CODE = {common_pb2.MATCH_SCHEMA_NUMBER_CODE, common_pb2.MATCH_SCHEMA_NUMBER_ANI_CODE}


@dataclass
class Limits:
    session_retention: float
    failures: failures.FailureLimits
    default_region: str
    late_call_window: float = 60.0


class Sessions:
    """Stored sessions and their outcomes."""

    def __init__(
        self, store: Store, limits: Limits, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._limits = limits
        self._clock = clock

    async def end(
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

    async def get(self, session_id: str) -> cm_pb2.GetSessionResponse:
        """What the session's application may know of it: waiting, expired, or how it
        ended while its outcome is kept."""
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

    async def fresh(
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
