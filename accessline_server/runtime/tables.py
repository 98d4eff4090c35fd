"""Rows written to a real database without slowing or failing the call that makes them:
SQLite in a local file for the embedded run, PostgreSQL when a DSN says so (shared by
every replica). Rows go into a bounded in-memory buffer that a background task writes in
batches, retrying with backoff while the database is down; the outage shows in health
and metrics, a full buffer drops rows and counts them."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from opentelemetry import metrics
from sqlalchemy import MetaData, Table, event, func, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from accessline_server.runtime.errors import FieldViolation, InvalidArgument

BUFFER_LIMIT = 100_000
BATCH = 500
# Taken while migrating, so two migrations run at once on PostgreSQL wait for each other.
MIGRATION_LOCK = 7_301_991


def page_token(at_us: int, row_id: str) -> str:
    """The token of the page after a row of a listing ordered by (time, id), newest
    first."""
    return base64.urlsafe_b64encode(f"{at_us}:{row_id}".encode()).decode()


def read_page_token(token: str) -> tuple[int, str]:
    """(time, id) of a `page_token`; INVALID_ARGUMENT naming `page_token` otherwise."""
    try:
        at_us, row_id = base64.urlsafe_b64decode(token.encode()).decode().split(":", 1)
        return int(at_us), row_id
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument(
            [FieldViolation("page_token", "is not a token this service gave")]
        ) from None


class SchemaMissing(SQLAlchemyError):
    """The tables are not there and this process does not create them."""


def engine_for(dsn: str) -> AsyncEngine:
    """The engine of a DSN. A SQLite file is written in WAL mode: a batch of rows is one
    append to the log, and readers (the history's listing) never wait for the writer. A
    pooled connection to a server is checked before use (a database restarted or a
    connection cut meanwhile); a SQLite file's is not (nothing between them to break, and
    the check was a fifth of a short read's CPU)."""
    url = make_url(dsn)
    engine = create_async_engine(url, pool_pre_ping=url.get_backend_name() != "sqlite")
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)

        @event.listens_for(engine.sync_engine, "connect")
        def _wal(connection: Any, _: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    return engine


async def migrate(dsn: str, schemas: Iterable[MetaData]) -> list[str]:
    """Creates the tables of `schemas` missing in the database (once per deploy); safe to
    run again and concurrently. Returns the tables created."""
    engine = engine_for(dsn)
    created: set[str] = set()
    try:
        async with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                await conn.execute(select(func.pg_advisory_xact_lock(MIGRATION_LOCK)))
            existing = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
            for schema in schemas:
                await conn.run_sync(schema.create_all)
                created |= set(schema.tables) - existing
        return sorted(created)
    finally:
        await engine.dispose()


Rows = list[dict[str, object]]


class BufferedWriter:
    """Buffered, batched inserts into one table (or, with `write`, whatever that does
    with a batch in one transaction; with `schema`, whatever makes or checks the tables);
    `name` words the logs and metrics (`accessline.{name}.written` and the like)."""

    def __init__(
        self,
        engine: AsyncEngine,
        table: Table,
        name: str,
        unit: str,
        *,
        create_schema: bool,
        on_health: Callable[[bool], Awaitable[None]] | None = None,
        meter: metrics.Meter | None = None,
        write: Callable[[AsyncConnection, Rows], Awaitable[None]] | None = None,
        schema: Callable[[AsyncConnection, bool], Awaitable[None]] | None = None,
    ) -> None:
        self.engine = engine
        self._table = table
        self._write = write or self._insert
        self._schema = schema or self._tables
        self._name = name
        self._create_schema = create_schema
        self._buffer: asyncio.Queue[dict[str, object]] = asyncio.Queue(BUFFER_LIMIT)
        self._on_health = on_health
        self._healthy: bool | None = None
        self._ready = False
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._log = logging.getLogger(f"accessline.{name}")
        self._what = what = name.replace(".", " ")
        meter = meter or metrics.get_meter("accessline")
        self._written = meter.create_counter(
            f"accessline.{name}.written", unit=unit, description=f"Rows written to the {what}"
        )
        self._failures = meter.create_counter(
            f"accessline.{name}.write_failures",
            unit="{batch}",
            description=f"Failed writes of {what} batches (retried)",
        )
        self._dropped = meter.create_counter(
            f"accessline.{name}.dropped",
            unit=unit,
            description=f"Rows of the {what} dropped because its buffer was full",
        )
        meter.create_observable_gauge(
            f"accessline.{name}.buffered",
            callbacks=[lambda _: [metrics.Observation(self._buffer.qsize())]],
            unit=unit,
            description=f"Rows waiting to be written to the {what}",
        )
        meter.create_observable_gauge(
            f"accessline.{name}.up",
            callbacks=[lambda _: self._observe_up()],
            description=f"1 while the {what} database takes writes, 0 while it does not",
        )

    def _observe_up(self) -> list[metrics.Observation]:
        if self._healthy is None:
            return []  # not tried yet
        return [metrics.Observation(int(self._healthy))]

    @property
    def healthy(self) -> bool:
        return bool(self._healthy)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"{self._name}-writer")

    async def stop(self, flush_timeout: float = 5.0) -> None:
        with contextlib.suppress(TimeoutError):
            await self.flush(flush_timeout)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.engine.dispose()

    def add(self, row: dict[str, object]) -> None:
        """Queues a row; never blocks and never raises."""
        try:
            self._buffer.put_nowait(row)
            self._idle.clear()
        except asyncio.QueueFull:
            self._dropped.add(1)
            self._log.error("%s buffer full; a row was dropped", self._what)

    async def flush(self, timeout: float = 10.0) -> None:
        """Waits until everything added so far is written."""
        await asyncio.wait_for(self._idle.wait(), timeout)

    async def _set_health(self, ok: bool) -> None:
        if ok == self._healthy:
            return
        self._healthy = ok
        if ok:
            self._log.info("%s database reachable", self._what)
        else:
            self._log.warning("%s database unreachable; buffering", self._what)
        if self._on_health is not None:
            await self._on_health(ok)

    async def _insert(self, conn: AsyncConnection, batch: Rows) -> None:
        await conn.execute(self._table.insert(), batch)

    async def _tables(self, conn: AsyncConnection, create: bool) -> None:
        if create:
            await conn.run_sync(self._table.metadata.create_all)
        elif not await conn.run_sync(lambda c: inspect(c).has_table(self._table.name)):
            raise SchemaMissing(
                f"the {self._what} tables are missing; run `accessline history migrate`"
            )

    async def ensure_schema(self) -> None:
        if self._ready:
            return
        async with self.engine.begin() as conn:
            await self._schema(conn, self._create_schema)
        self._ready = True

    async def _run(self) -> None:
        backoff = 0.1
        batch: list[dict[str, object]] = []
        while True:
            try:
                await self.ensure_schema()
                await self._set_health(True)
                if not batch:
                    if self._buffer.empty():
                        self._idle.set()
                    batch.append(await self._buffer.get())
                    while len(batch) < BATCH and not self._buffer.empty():
                        batch.append(self._buffer.get_nowait())
                async with self.engine.begin() as conn:
                    await self._write(conn, batch)
                self._written.add(len(batch))
                batch = []
                backoff = 0.1
            except (SQLAlchemyError, OSError) as exc:
                self._failures.add(1)
                # SQLAlchemy's own texts may quote rows; only the schema's is said in full.
                detail = str(exc) if isinstance(exc, SchemaMissing) else type(exc).__name__
                self._log.warning(
                    "writing the %s failed; retrying",
                    self._what,
                    extra={"fields": {"error": detail}},
                )
                await self._set_health(False)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
