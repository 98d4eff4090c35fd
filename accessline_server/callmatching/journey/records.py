"""CallMatching's published module for recording the customer's journey: Routing and
Notification record what they do through it (a callback, a notify-when-available
request, a connected call, a notification or a link sent) into the history database
CallMatching owns, without a hop and without slowing or failing the call that records
it (buffered and batched as runtime/tables.py does; while the database is down, records
wait in the buffer).

A record is an upsert by (application, interaction id): each service gives what it
knows and a later record of the same interaction adds to it. Of two writes, the one that
happened later (`at`) sets the status, whichever arrives first; the earliest `at` is when
the interaction happened; a field given replaces, a field left None keeps."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics
from sqlalchemy import case, func
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from accessline.journey.v1 import journey_pb2 as jn_pb2
from accessline_server.callmatching.journey import migrate, schema
from accessline_server.runtime import tables
from accessline_server.runtime.settings import HistorySettings

ACCESSLINE = jn_pb2.INTERACTION_SOURCE_ACCESSLINE
TEXT = ("transaction_id", "topic", "agent_id", "resource_group", "outcome")
KEYS = ("customer_key", "phone_key", "email_key")
Row = dict[str, Any]


@dataclass(frozen=True)
class Record:
    """What one service knows of one interaction; None: not known here."""

    application_id: str
    interaction_id: str
    channel: int
    status: int
    customer_id: str | None = None
    phone_key: str | None = None
    email_key: str | None = None
    transaction_id: str | None = None
    topic: str | None = None
    agent_id: str | None = None
    resource_group: str | None = None
    outcome: str | None = None
    source: int = ACCESSLINE
    at: float | None = None


def _merge(old: Row, new: Row) -> Row:
    """Two writes of one row folded as the database's upsert folds them."""
    later = int(new["updated_us"]) >= int(old["updated_us"])
    merged = dict(old)
    for name in (*KEYS, *TEXT):
        if new[name] is not None:
            merged[name] = new[name]
    merged["status"] = new["status"] if later else old["status"]
    merged["occurred_us"] = min(old["occurred_us"], new["occurred_us"])
    merged["updated_us"] = max(old["updated_us"], new["updated_us"])
    return merged


def _insert(conn: AsyncConnection, table: object) -> object:
    module = postgresql if conn.dialect.name == "postgresql" else sqlite
    return module.insert(table)


# The upserts, built once per dialect: SQLAlchemy works out a new statement's cache key
# each time, which cost more than the write of a short batch itself.
_BUILT: dict[tuple[str, str], Any] = {}


def _built(conn: AsyncConnection, name: str, build: Callable[[AsyncConnection], Any]) -> Any:
    key = (conn.dialect.name, name)
    found = _BUILT.get(key)
    if found is None:
        found = _BUILT[key] = build(conn)
    return found


def _later(statement: object, table: object, name: str) -> object:
    new, old = statement.excluded, table.c  # type: ignore[attr-defined]
    return case((new.updated_us >= old.updated_us, new[name]), else_=old[name])


def _interactions_upsert(conn: AsyncConnection) -> Any:
    t = schema.interactions
    statement = _insert(conn, t)
    new = statement.excluded  # type: ignore[attr-defined]
    updates: Row = {n: func.coalesce(new[n], t.c[n]) for n in (*KEYS, *TEXT)}
    updates["status"] = _later(statement, t, "status")
    updates["occurred_us"] = case(
        (new.occurred_us < t.c.occurred_us, new.occurred_us), else_=t.c.occurred_us
    )
    updates["updated_us"] = case(
        (new.updated_us > t.c.updated_us, new.updated_us), else_=t.c.updated_us
    )
    return statement.on_conflict_do_update(  # type: ignore[attr-defined]
        index_elements=["application_id", "interaction_id"], set_=updates
    )


async def _upsert_interactions(conn: AsyncConnection, rows: list[Row]) -> None:
    await conn.execute(_built(conn, "interactions", _interactions_upsert), rows)


async def _upsert_transactions(conn: AsyncConnection, rows: list[Row]) -> None:
    found: dict[tuple[Any, Any], Row] = {}
    for row in rows:
        if not row["transaction_id"]:
            continue
        entry = {
            "application_id": row["application_id"],
            "transaction_id": row["transaction_id"],
            "customer_key": row["customer_key"],
            "topic": row["topic"],
            "open": row["status"] != jn_pb2.INTERACTION_STATUS_CLOSED,
            "updated_us": row["updated_us"],
        }
        key = (row["application_id"], row["transaction_id"])
        old = found.get(key)
        if old is not None:  # the first customer and topic stay; the later status wins
            later = int(entry["updated_us"]) >= int(old["updated_us"])
            entry = {
                **entry,
                "customer_key": old["customer_key"] or entry["customer_key"],
                "topic": old["topic"] or entry["topic"],
                "open": entry["open"] if later else old["open"],
                "updated_us": max(old["updated_us"], entry["updated_us"]),
            }
        found[key] = entry
    if found:
        upsert = _built(conn, "transactions", _transactions_upsert)
        await conn.execute(upsert, list(found.values()))


def _transactions_upsert(conn: AsyncConnection) -> Any:
    t = schema.transactions
    statement = _insert(conn, t)
    new = statement.excluded  # type: ignore[attr-defined]
    return statement.on_conflict_do_update(  # type: ignore[attr-defined]
        index_elements=["application_id", "transaction_id"],
        set_={
            "customer_key": func.coalesce(t.c.customer_key, new.customer_key),
            "topic": func.coalesce(t.c.topic, new.topic),
            "open": _later(statement, t, "open"),
            "updated_us": case(
                (new.updated_us > t.c.updated_us, new.updated_us), else_=t.c.updated_us
            ),
        },
    )


async def _tie_identifiers(conn: AsyncConnection, rows: list[Row]) -> None:
    found: dict[tuple[Any, Any], Row] = {}
    for row in rows:
        for name in ("phone_key", "email_key"):
            if row["customer_key"] and row[name]:
                key = (row["application_id"], row[name])
                found.setdefault(
                    key,
                    {
                        "application_id": row["application_id"],
                        "identifier_key": row[name],
                        "customer_key": row["customer_key"],
                        "updated_us": row["updated_us"],
                    },
                )
    if found:
        tie = _built(
            conn,
            "identifiers",
            lambda c: _insert(c, schema.identifiers).on_conflict_do_nothing(  # type: ignore[attr-defined]
                index_elements=["application_id", "identifier_key"]
            ),
        )
        await conn.execute(tie, list(found.values()))


async def write(conn: AsyncConnection, batch: list[Row]) -> None:
    """One batch of records in one transaction: the interactions (two writes of one
    interaction folded first: one statement may touch a row once), the transactions they
    name, the identifiers they tie to their customer."""
    folded: dict[tuple[Any, Any], Row] = {}
    for row in batch:
        key = (row["application_id"], row["interaction_id"])
        old = folded.get(key)
        folded[key] = row if old is None else _merge(old, row)
    rows = list(folded.values())
    await _upsert_interactions(conn, rows)
    await _upsert_transactions(conn, rows)
    await _tie_identifiers(conn, rows)


async def ensure_schema(conn: AsyncConnection, create: bool) -> None:
    if create:
        await migrate.upgrade(conn)
    elif not await migrate.is_current(conn):
        raise tables.SchemaMissing(
            "the journey's tables are missing or older than this release;"
            " run `accessline history migrate`"
        )


class JourneyWriter:
    """Buffered writer of journey records, one per process that records."""

    def __init__(
        self,
        dsn: str,
        correlator: schema.Correlator,
        *,
        create_schema: bool = True,
        on_health: Callable[[bool], Awaitable[None]] | None = None,
        meter: metrics.Meter | None = None,
    ) -> None:
        self.correlator = correlator
        self._writer = tables.BufferedWriter(
            tables.engine_for(dsn),
            schema.interactions,
            "journey",
            "{record}",
            create_schema=create_schema,
            on_health=on_health,
            meter=meter,
            write=write,
            schema=ensure_schema,
        )

    @property
    def engine(self) -> object:
        return self._writer.engine

    @property
    def healthy(self) -> bool:
        return self._writer.healthy

    async def ensure_schema(self) -> None:
        await self._writer.ensure_schema()

    async def start(self) -> None:
        await self._writer.start()

    async def stop(self, flush_timeout: float = 5.0) -> None:
        await self._writer.stop(flush_timeout)

    async def flush(self, timeout: float = 10.0) -> None:
        await self._writer.flush(timeout)

    def row(self, record: Record) -> Row:
        at = int((record.at if record.at is not None else time.time()) * 1_000_000)
        return {
            "application_id": record.application_id,
            "interaction_id": record.interaction_id,
            "customer_key": self.correlator.customer(
                record.application_id, record.customer_id or ""
            ),
            "phone_key": record.phone_key,
            "email_key": record.email_key,
            "transaction_id": record.transaction_id or None,
            "channel": record.channel,
            "topic": record.topic or None,
            "status": record.status,
            "agent_id": record.agent_id or None,
            "resource_group": record.resource_group or None,
            "outcome": record.outcome or None,
            "source": record.source,
            "occurred_us": at,
            "updated_us": at,
        }

    def record(self, record: Record) -> None:
        """Queues a record; never blocks and never raises."""
        self._writer.add(self.row(record))


_process_writer: JourneyWriter | None = None


def writer_for(settings: HistorySettings, meter: metrics.Meter | None = None) -> JourneyWriter:
    """The writer of a service's settings (ACCESSLINE_HISTORY_*)."""
    return JourneyWriter(
        settings.history_dsn,
        schema.Correlator(settings.history_secret.get_secret_value().encode()),
        create_schema=settings.history_migrate,
        meter=meter,
    )


async def open_for_process(
    settings: HistorySettings, meter: metrics.Meter | None = None
) -> JourneyWriter:
    """Starts this process's writer, the one `record` queues on (Routing and
    Notification open one at start, as they follow the webhooks' subscriptions)."""
    global _process_writer
    writer = writer_for(settings, meter)
    await writer.start()
    _process_writer = writer
    return writer


def record(entry: Record) -> None:
    """Queues a record on this process's writer; nothing where none is open (a domain
    object tested alone). Never blocks and never raises."""
    if _process_writer is not None:
        _process_writer.record(entry)
