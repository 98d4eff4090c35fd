"""Reading the journey (a customer's records, a transaction's, a customer's open
transactions), the writes answered at once (a record posted from outside, a status
changed) and the purge of records past the retention."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import phonenumbers
from sqlalchemy import and_, delete, or_, select, union, update
from sqlalchemy.exc import SQLAlchemyError

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.common.v1 import common_pb2
from accessline.journey.v1 import journey_pb2 as jn_pb2
from accessline_server.callmatching.journey import records, schema
from accessline_server.runtime import tables
from accessline_server.runtime.errors import (
    FailedPrecondition,
    NotFound,
    Unavailable,
)

log = logging.getLogger("accessline.journey")

OPEN_ON_CALL = 3
# How long a handoff waits for the customer's open transactions.
ON_CALL_WAIT = 0.5
t = schema.interactions
NEWEST = (t.c.occurred_us.desc(), t.c.interaction_id.desc())


@dataclass(frozen=True)
class Query:
    """Whose records, and which."""

    application_id: str
    customer_key: str | None
    transaction_id: str
    channels: Sequence[int]
    statuses: Sequence[int]
    start_us: int | None
    end_us: int | None


def interaction(row: Any) -> jn_pb2.Interaction:
    r = row._mapping
    out = jn_pb2.Interaction(
        interaction_id=r["interaction_id"],
        application_id=r["application_id"],
        transaction_id=r["transaction_id"] or "",
        channel=r["channel"],
        topic=r["topic"] or "",
        status=r["status"],
        agent_id=r["agent_id"] or "",
        resource_group=r["resource_group"] or "",
        outcome=r["outcome"] or "",
        source=r["source"],
        rating=r["rating"] or 0,
    )
    out.occurred_at.FromMicroseconds(r["occurred_us"])
    out.updated_at.FromMicroseconds(r["updated_us"])
    return out


def customer_ways(application_id: str, customer_key: str) -> tuple[Any, ...]:
    """The four ways a record is one customer's: named by their id, by a phone number or
    an e-mail address tied to them, or by a transaction that is theirs."""
    ids, txs = schema.identifiers, schema.transactions
    tied = select(ids.c.identifier_key).where(
        ids.c.application_id == application_id, ids.c.customer_key == customer_key
    )
    theirs = select(txs.c.transaction_id).where(
        txs.c.application_id == application_id, txs.c.customer_key == customer_key
    )
    return (
        t.c.customer_key == customer_key,
        t.c.phone_key.in_(tied),
        t.c.email_key.in_(tied),
        t.c.transaction_id.in_(theirs),
    )


def customer_condition(application_id: str, customer_key: str) -> Any:
    """The records of one customer, as one condition (for a record read by its key)."""
    return or_(*customer_ways(application_id, customer_key))


def newest(conditions: list[Any], query: Query, limit: int) -> Any:
    """The newest `limit` records meeting `conditions` (and, with a customer, theirs).
    A customer's records are read as the union of the four ways a record is theirs, each
    by its own index and each limited (one OR across them would make the database walk
    the whole table by time)."""
    if not query.customer_key:
        return select(t).where(and_(*conditions)).order_by(*NEWEST).limit(limit)
    parts = [
        select(select(t).where(*conditions, way).order_by(*NEWEST).limit(limit).subquery())
        for way in customer_ways(query.application_id, query.customer_key)
    ]
    merged = union(*parts).subquery()
    return (
        select(merged)
        .order_by(merged.c.occurred_us.desc(), merged.c.interaction_id.desc())
        .limit(limit)
    )


class Journey:
    """The journey in the history database, as CallMatching serves it."""

    def __init__(self, writer: records.JourneyWriter, retention_days: float) -> None:
        self._writer = writer
        self._engine: Any = writer.engine
        self._retention = retention_days * 86400.0
        self._purging: asyncio.Task[None] | None = None
        # Reads of open transactions that outlasted their handoff's wait.
        self._late: set[asyncio.Future[Any]] = set()

    @property
    def correlator(self) -> schema.Correlator:
        return self._writer.correlator

    def record(self, record: records.Record) -> None:
        """Queues a record of CallMatching's own; never blocks and never raises."""
        self._writer.record(record)

    def record_match(
        self,
        attempt: cm_pb2.MatchAttempt,
        response: cm_pb2.MatchCallResponse,
        now: float,
        ani: str = "",
    ) -> None:
        """The handoff's record gets its call's outcome (a matched call waits for its
        agent: still pending); a matched call ties its caller's number (`ani`, E.164) to
        the customer, so a later call from that number posted by another system joins
        their journey."""
        matched = response.outcome == cm_pb2.MATCH_OUTCOME_MATCHED
        phone = None
        if matched and ani and response.customer_id:
            with contextlib.suppress(phonenumbers.NumberParseException):
                phone = self.correlator.phone(ani)
        if attempt.session_id and attempt.application_id:
            self.record(
                records.Record(
                    application_id=attempt.application_id,
                    interaction_id=attempt.session_id,
                    channel=jn_pb2.INTERACTION_CHANNEL_APP_VOICE,
                    status=jn_pb2.INTERACTION_STATUS_PENDING,
                    customer_id=response.customer_id or None,
                    phone_key=phone,
                    outcome=cm_pb2.MatchOutcome.Name(response.outcome).removeprefix(
                        "MATCH_OUTCOME_"
                    ),
                    at=now,
                )
            )

    def record_handoff(self, application_id: str, session_id: str, handoff: Any) -> None:
        """A handoff started: pending until its call."""
        self.record(
            records.Record(
                application_id=application_id,
                interaction_id=session_id,
                channel=jn_pb2.INTERACTION_CHANNEL_APP_VOICE,
                status=jn_pb2.INTERACTION_STATUS_PENDING,
                customer_id=handoff.customer_id,
                transaction_id=handoff.context.service_request_id,
                topic=handoff.context.subject,
            )
        )

    def read_open_transactions(
        self, application_id: str, customer_id: str
    ) -> asyncio.Future[list[common_pb2.OpenTransaction]]:
        """Starts reading the customer's open transactions, for `open_transactions_by`:
        a handoff reads them while its number is reserved. The read is never cancelled
        (a database call cancelled half way can leave its connection unusable): one
        nobody waits for any more finishes on its own, its answer dropped."""
        read = asyncio.ensure_future(self.open_transactions(application_id, customer_id))
        self._late.add(read)
        read.add_done_callback(self._dropped)
        return read

    @staticmethod
    async def open_transactions_by(
        read: asyncio.Future[list[common_pb2.OpenTransaction]], started: float
    ) -> list[common_pb2.OpenTransaction]:
        """What `read` found if the database answered within ON_CALL_WAIT of `started`
        (the event loop's time); none otherwise (logged): a handoff never fails on the
        journey."""
        left = ON_CALL_WAIT - (asyncio.get_running_loop().time() - started)
        done, _ = await asyncio.wait({read}, timeout=max(0.0, left))
        if not done:
            log.warning("open transactions not read in time; the handoff goes without them")
            return []
        try:
            return read.result()
        except Exception as exc:  # noqa: BLE001 - whatever the database said, go on
            log.warning(
                "open transactions not read; the handoff goes without them",
                extra={"fields": {"error": type(exc).__name__}},
            )
            return []

    def _dropped(self, read: asyncio.Future[Any]) -> None:
        self._late.discard(read)
        if not read.cancelled():
            read.exception()  # retrieved: a late failure is not an unhandled one

    def record_session_end(
        self, application_id: str, session_id: str, outcome: str, now: float
    ) -> None:
        """A handoff cancelled or expired before its call: closed."""
        self.record(
            records.Record(
                application_id=application_id,
                interaction_id=session_id,
                channel=jn_pb2.INTERACTION_CHANNEL_APP_VOICE,
                status=jn_pb2.INTERACTION_STATUS_CLOSED,
                outcome=outcome,
                at=now,
            )
        )

    async def run(self, work: Any, *, read: bool = False) -> Any:
        """`work(conn)` in one transaction (a `read` only: no BEGIN and COMMIT of its own,
        rolled back at the end); the database unreachable is UNAVAILABLE."""
        try:
            await self._writer.ensure_schema()
            async with self._engine.connect() if read else self._engine.begin() as conn:
                return await work(conn)
        except tables.SchemaMissing as exc:
            raise Unavailable(str(exc), reason="HISTORY_SCHEMA_MISSING", retry_after=5.0) from exc
        except (SQLAlchemyError, OSError) as exc:
            raise Unavailable(
                "the history database is unreachable", reason="HISTORY_UNAVAILABLE", retry_after=2.0
            ) from exc

    async def _get(self, conn: Any, application_id: str, interaction_id: str) -> Any:
        found = (
            await conn.execute(
                select(t).where(
                    t.c.application_id == application_id, t.c.interaction_id == interaction_id
                )
            )
        ).first()
        if found is None:
            raise NotFound(
                f"interaction {interaction_id} is not in the journey",
                reason="INTERACTION_NOT_FOUND",
            )
        return found

    async def record_now(self, record: records.Record) -> jn_pb2.Interaction:
        """Writes one record posted from outside at once and answers it as it now
        stands; an id of Accessline's own records is refused (another system does not
        rewrite what Accessline recorded)."""
        row = self._writer.row(record)
        same = and_(
            t.c.application_id == record.application_id,
            t.c.interaction_id == record.interaction_id,
            t.c.source == jn_pb2.INTERACTION_SOURCE_ACCESSLINE,
        )

        async def work(conn: Any) -> Any:
            if (await conn.execute(select(t.c.interaction_id).where(same))).first():
                raise FailedPrecondition(
                    f"interaction {record.interaction_id} is one Accessline recorded",
                    reason="INTERACTION_RECORDED_BY_ACCESSLINE",
                )
            await records.write(conn, [row])
            return await self._get(conn, record.application_id, record.interaction_id)

        return interaction(await self.run(work))

    async def set_status(
        self, application_id: str, interaction_id: str, status: int
    ) -> jn_pb2.Interaction:
        now = int(time.time() * 1_000_000)

        async def work(conn: Any) -> Any:
            found = await self._get(conn, application_id, interaction_id)
            await conn.execute(
                update(t)
                .where(t.c.application_id == application_id, t.c.interaction_id == interaction_id)
                .values(status=status, updated_us=now)
            )
            if found.transaction_id:
                txs = schema.transactions
                await conn.execute(
                    update(txs)
                    .where(
                        txs.c.application_id == application_id,
                        txs.c.transaction_id == found.transaction_id,
                        txs.c.updated_us <= now,
                    )
                    .values(open=status != jn_pb2.INTERACTION_STATUS_CLOSED, updated_us=now)
                )
            return await self._get(conn, application_id, interaction_id)

        return interaction(await self.run(work))

    async def listing(
        self, query: Query, page_size: int, page_token: str
    ) -> tuple[list[jn_pb2.Interaction], str]:
        conditions: list[Any] = [t.c.application_id == query.application_id]
        if query.transaction_id:
            conditions.append(t.c.transaction_id == query.transaction_id)
        if query.channels:
            conditions.append(t.c.channel.in_(list(query.channels)))
        if query.statuses:
            conditions.append(t.c.status.in_(list(query.statuses)))
        if query.start_us is not None:
            conditions.append(t.c.occurred_us >= query.start_us)
        if query.end_us is not None:
            conditions.append(t.c.occurred_us < query.end_us)
        if page_token:
            occurred, interaction_id = tables.read_page_token(page_token)
            conditions.append(
                or_(
                    t.c.occurred_us < occurred,
                    and_(t.c.occurred_us == occurred, t.c.interaction_id < interaction_id),
                )
            )
        statement = newest(conditions, query, page_size + 1)

        async def work(conn: Any) -> Any:
            return (await conn.execute(statement)).fetchall()

        rows = await self.run(work, read=True)
        found = [interaction(r) for r in rows[:page_size]]
        token = ""
        if len(rows) > page_size:
            last = rows[page_size - 1]
            token = tables.page_token(last.occurred_us, last.interaction_id)
        return found, token

    async def open_transactions(
        self, application_id: str, customer_id: str
    ) -> list[common_pb2.OpenTransaction]:
        """The customer's open transactions, newest first (at most 3)."""
        key = self.correlator.customer(application_id, customer_id)
        if key is None:
            return []
        txs = schema.transactions
        statement = (
            select(txs)
            .where(txs.c.application_id == application_id, txs.c.customer_key == key, txs.c.open)
            .order_by(txs.c.updated_us.desc())
            .limit(OPEN_ON_CALL)
        )

        async def work(conn: Any) -> Any:
            return (await conn.execute(statement)).fetchall()

        out = []
        for row in await self.run(work, read=True):
            found = common_pb2.OpenTransaction(
                transaction_id=row.transaction_id, topic=row.topic or ""
            )
            found.updated_at.FromMicroseconds(row.updated_us)
            out.append(found)
        return out

    async def purge(self) -> int:
        """Deletes what is older than the retention; returns the records deleted."""
        cutoff = int((time.time() - self._retention) * 1_000_000)

        async def work(conn: Any) -> int:
            deleted = await conn.execute(delete(t).where(t.c.occurred_us < cutoff))
            for table in (schema.transactions, schema.identifiers):
                await conn.execute(delete(table).where(table.c.updated_us < cutoff))
            return int(deleted.rowcount or 0)

        return int(await self.run(work))

    async def start(self, purge_interval: float) -> None:
        await self._writer.start()
        self._start_purging(purge_interval)

    def _start_purging(self, interval: float) -> None:
        async def loop() -> None:
            while True:
                try:
                    purged = await self.purge()
                    if purged:
                        log.info("journey purged", extra={"fields": {"records": purged}})
                except Unavailable:
                    log.warning("journey purge failed; retrying at the next interval")
                await asyncio.sleep(interval)

        self._purging = asyncio.create_task(loop(), name="journey-purge")

    async def stop(self) -> None:
        if self._purging is not None:
            self._purging.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purging
        await self._writer.stop()
