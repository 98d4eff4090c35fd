"""The history of match attempts in a real database: SQLite in a local file by default,
PostgreSQL when a DSN says so (then every CallMatching replica shares it).

Writing never slows or fails a match (see runtime/tables.py: buffered, batched, retried
while the database is down). No personal data is written: the caller's number only as a
keyed hash."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics
from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    and_,
    func,
    or_,
    select,
)
from sqlalchemy.exc import SQLAlchemyError

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline_server.callmatching.journey import migrate as journey_migrate
from accessline_server.runtime import audit, tables
from accessline_server.runtime.errors import Unavailable

log = logging.getLogger("accessline.callmatching.history")

BUFFER_LIMIT = 100_000
BATCH = 500

metadata = MetaData()
attempts = Table(
    "match_attempts",
    metadata,
    Column("attempt_id", String(40), primary_key=True),
    Column("call_id", String(128), nullable=False),
    Column("session_id", String(64), nullable=False),
    Column("application_id", String(64), nullable=False),
    Column("access_number", String(256), nullable=False),
    Column("pool_id", String(64), nullable=False),
    Column("match_schema", Integer, nullable=False),
    Column("outcome", Integer, nullable=False),
    Column("ani_hash", String(64), nullable=False),
    Column("handoff_requested_us", BigInteger, nullable=True),
    Column("call_arrived_us", BigInteger, nullable=False),
    Column("decided_us", BigInteger, nullable=False),
)
Index("ix_match_attempts_decided", attempts.c.decided_us, attempts.c.attempt_id)
Index("ix_match_attempts_app_decided", attempts.c.application_id, attempts.c.decided_us)


def _us(ts: object) -> int:
    return int(ts.ToNanoseconds() // 1000)  # type: ignore[attr-defined]


def _row(attempt: cm_pb2.MatchAttempt) -> dict[str, object]:
    return {
        "attempt_id": attempt.attempt_id,
        "call_id": attempt.call_id,
        "session_id": attempt.session_id,
        "application_id": attempt.application_id,
        "access_number": attempt.access_number,
        "pool_id": attempt.pool_id,
        "match_schema": int(attempt.match_schema),
        "outcome": int(attempt.outcome),
        "ani_hash": attempt.ani_hash,
        "handoff_requested_us": _us(attempt.handoff_requested_at)
        if attempt.HasField("handoff_requested_at")
        else None,
        "call_arrived_us": _us(attempt.call_arrived_at),
        "decided_us": _us(attempt.decided_at),
    }


def _attempt(row: object) -> cm_pb2.MatchAttempt:
    r = row._mapping  # type: ignore[attr-defined]
    out = cm_pb2.MatchAttempt(
        attempt_id=r["attempt_id"],
        call_id=r["call_id"],
        session_id=r["session_id"],
        application_id=r["application_id"],
        access_number=r["access_number"],
        pool_id=r["pool_id"],
        match_schema=r["match_schema"],
        outcome=r["outcome"],
        ani_hash=r["ani_hash"],
    )
    if r["handoff_requested_us"] is not None:
        out.handoff_requested_at.FromMicroseconds(r["handoff_requested_us"])
    out.call_arrived_at.FromMicroseconds(r["call_arrived_us"])
    out.decided_at.FromMicroseconds(r["decided_us"])
    return out


@dataclass(frozen=True)
class AttemptFilter:
    start_us: int | None
    end_us: int | None
    application_id: str
    access_number: str
    outcome: int


async def migrate(dsn: str) -> list[str]:
    """Creates what the history and the audit trail need in the database that is missing
    (run once per deploy: `accessline history migrate`); safe to run again and
    concurrently. Returns the tables created."""
    created = await tables.migrate(dsn, [metadata, audit.metadata])
    return sorted(created + await journey_migrate.upgrade_database(dsn))


class MatchHistory:
    """Buffered writer and reader of match attempts."""

    def __init__(
        self,
        dsn: str,
        *,
        create_schema: bool = True,
        on_health: Callable[[bool], Awaitable[None]] | None = None,
        meter: metrics.Meter | None = None,
    ) -> None:
        self._writer = tables.BufferedWriter(
            tables.engine_for(dsn),
            attempts,
            "match.history",
            "{attempt}",
            create_schema=create_schema,
            on_health=on_health,
            meter=meter or metrics.get_meter("accessline.callmatching"),
        )

    @property
    def healthy(self) -> bool:
        return self._writer.healthy

    async def start(self) -> None:
        await self._writer.start()

    async def stop(self, flush_timeout: float = 5.0) -> None:
        await self._writer.stop(flush_timeout)

    def record(self, attempt: cm_pb2.MatchAttempt) -> None:
        """Queues an attempt; never blocks and never raises."""
        self._writer.add(_row(attempt))

    async def flush(self, timeout: float = 10.0) -> None:
        """Waits until everything recorded so far is written."""
        await self._writer.flush(timeout)

    async def _read(self, statement: Any) -> list[Any]:
        try:
            await self._writer.ensure_schema()
            async with self._writer.engine.connect() as conn:
                return list((await conn.execute(statement)).fetchall())
        except tables.SchemaMissing as exc:
            raise Unavailable(str(exc), reason="HISTORY_SCHEMA_MISSING", retry_after=5.0) from exc
        except (SQLAlchemyError, OSError) as exc:
            raise Unavailable(
                "the match history database is unreachable",
                reason="HISTORY_UNAVAILABLE",
                retry_after=2.0,
            ) from exc

    def _where(self, f: AttemptFilter) -> list[object]:
        conditions: list[object] = []
        if f.start_us is not None:
            conditions.append(attempts.c.decided_us >= f.start_us)
        if f.end_us is not None:
            conditions.append(attempts.c.decided_us < f.end_us)
        if f.application_id:
            conditions.append(attempts.c.application_id == f.application_id)
        if f.access_number:
            conditions.append(attempts.c.access_number == f.access_number)
        if f.outcome:
            conditions.append(attempts.c.outcome == f.outcome)
        return conditions

    async def list(
        self, f: AttemptFilter, page_size: int, page_token: str
    ) -> tuple[list[cm_pb2.MatchAttempt], str]:
        conditions = self._where(f)
        if page_token:
            decided, attempt_id = tables.read_page_token(page_token)
            conditions.append(
                or_(
                    attempts.c.decided_us < decided,
                    and_(attempts.c.decided_us == decided, attempts.c.attempt_id < attempt_id),
                )
            )
        statement = (
            select(attempts)
            .where(and_(True, *conditions))  # type: ignore[arg-type]
            .order_by(attempts.c.decided_us.desc(), attempts.c.attempt_id.desc())
            .limit(page_size + 1)
        )
        rows = await self._read(statement)
        found = [_attempt(r) for r in rows[:page_size]]
        token = ""
        if len(rows) > page_size:
            last = found[-1]
            token = tables.page_token(_us(last.decided_at), last.attempt_id)
        return found, token

    async def stats(
        self, application_id: str, start_us: int | None, end_us: int | None
    ) -> cm_pb2.GetMatchStatsResponse:
        f = AttemptFilter(start_us, end_us, application_id, "", 0)
        where = and_(True, *self._where(f))  # type: ignore[arg-type]
        counts = await self._read(
            select(attempts.c.outcome, func.count()).where(where).group_by(attempts.c.outcome)
        )
        response = cm_pb2.GetMatchStatsResponse(application_id=application_id)
        for outcome, count in sorted(counts, key=lambda r: r[0]):
            response.outcomes.append(cm_pb2.OutcomeCount(outcome=outcome, count=count))
            response.attempts += count
            if outcome == cm_pb2.MATCH_OUTCOME_MATCHED:
                response.matched = count
        response.success_rate = response.matched / response.attempts if response.attempts else 0.0
        waited = (attempts.c.call_arrived_us - attempts.c.handoff_requested_us).label("waited")
        matched = and_(
            where,
            attempts.c.outcome == cm_pb2.MATCH_OUTCOME_MATCHED,
            attempts.c.handoff_requested_us.is_not(None),
        )
        n = response.matched
        for fraction, target in (
            (0.5, response.handoff_to_call_p50),
            (0.95, response.handoff_to_call_p95),
        ):
            if n == 0:
                continue
            offset = min(n - 1, int(fraction * (n - 1) + 0.5))
            row = await self._read(
                select(waited).where(matched).order_by(waited).limit(1).offset(offset)
            )
            if row:
                target.FromMicroseconds(max(0, int(row[0][0])))
        return response
