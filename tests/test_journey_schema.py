"""The journey's tables: a fresh database made whole from the schema module and stamped,
and the same database brought up through every Alembic revision, give the same tables,
columns and indexes (SQLite and PostgreSQL); a database an older release made is upgraded
through Alembic; two writes of one interaction fold the same whichever lands first."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import inspect, select

from accessline.journey.v1 import journey_pb2 as jn
from accessline_server.callmatching.journey import migrate, schema
from accessline_server.callmatching.journey.records import JourneyWriter, Record, write
from accessline_server.callmatching.journey.schema import Correlator
from accessline_server.runtime import tables
from tests.support.postgres import Postgres

APP_VOICE = jn.INTERACTION_CHANNEL_APP_VOICE
ANSWERED, PENDING = jn.INTERACTION_STATUS_ANSWERED, jn.INTERACTION_STATUS_PENDING


def test_the_stamped_revision_is_alembics_newest() -> None:
    assert migrate.alembic_head() == migrate.HEAD


def shape(connection: Any) -> dict[str, Any]:
    found = inspect(connection)
    out: dict[str, Any] = {}
    for name in sorted(found.get_table_names()):
        if not name.startswith("journey_"):
            continue
        out[name] = {
            "columns": sorted(
                (c["name"], str(c["type"]).split("(")[0], c["nullable"])
                for c in found.get_columns(name)
            ),
            "primary key": found.get_pk_constraint(name)["constrained_columns"],
            "indexes": sorted(
                (i["name"], tuple(i["column_names"])) for i in found.get_indexes(name)
            ),
        }
    return out


async def made(dsn: str, **how: Any) -> dict[str, Any]:
    engine = tables.engine_for(dsn)
    try:
        async with engine.begin() as conn:
            await migrate.upgrade(conn, **how)
            assert await migrate.is_current(conn)
            return await conn.run_sync(shape)
    finally:
        await engine.dispose()


async def test_fresh_and_migrated_sqlite_databases_are_alike(tmp_path: Path) -> None:
    fresh = await made(f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}")
    migrated = await made(f"sqlite+aiosqlite:///{tmp_path / 'migrated.db'}", through_alembic=True)
    assert set(fresh) == {
        "journey_alembic_version",
        "journey_identifiers",
        "journey_interactions",
        "journey_transactions",
    }
    assert fresh == migrated


async def new_database(postgres: Postgres) -> str:
    name = f"journey_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(host="127.0.0.1", port=postgres.port, user="postgres")
    await admin.execute(f"CREATE DATABASE {name}")
    await admin.close()
    return postgres.dsn.rsplit("/", 1)[0] + f"/{name}"


async def test_fresh_and_migrated_postgresql_databases_are_alike(postgres: Postgres) -> None:
    fresh = await made(await new_database(postgres))
    migrated = await made(await new_database(postgres), through_alembic=True)
    assert fresh == migrated


async def test_an_older_database_is_upgraded_through_alembic(tmp_path: Path) -> None:
    dsn = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    engine = tables.engine_for(dsn)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(migrate._upgrade, "0001")  # as the first release left it
            assert not await migrate.is_current(conn)
            columns = await conn.run_sync(
                lambda c: {col["name"] for col in inspect(c).get_columns("journey_interactions")}
            )
            assert "rating" not in columns
    finally:
        await engine.dispose()
    assert "rating" in {c[0] for c in (await made(dsn))["journey_interactions"]["columns"]}


async def test_the_later_write_sets_the_status_whichever_lands_first(tmp_path: Path) -> None:
    """Two services write one interaction: Routing's "answered" (later) may land before
    CallMatching's "pending, matched" (earlier), in one batch or in two."""
    writer = JourneyWriter(f"sqlite+aiosqlite:///{tmp_path / 'order.db'}", Correlator(b"s" * 32))
    base = time.time()
    later = writer.row(
        Record("bank", "call-1", APP_VOICE, ANSWERED, customer_id="c1", agent_id="a1", at=base + 5)
    )
    earlier = writer.row(
        Record("bank", "call-1", APP_VOICE, PENDING, customer_id="c1", outcome="MATCHED", at=base)
    )
    engine: Any = writer.engine
    try:
        async with engine.begin() as conn:
            await migrate.upgrade(conn)
            await write(conn, [later, earlier])  # one batch: folded
            await write(conn, [{**later, "interaction_id": "call-2"}])  # two batches
            await write(conn, [{**earlier, "interaction_id": "call-2"}])
            rows = (await conn.execute(select(schema.interactions))).fetchall()
    finally:
        await engine.dispose()
    for row in rows:
        assert (row.status, row.agent_id, row.outcome) == (ANSWERED, "a1", "MATCHED")
        assert (row.occurred_us, row.updated_us) == (earlier["occurred_us"], later["updated_us"])
