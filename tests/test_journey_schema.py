"""The journey's schema two ways: a fresh database made whole from the schema module and
stamped, and the same database brought up through every Alembic revision, give the same
tables, columns and indexes (SQLite and PostgreSQL); a database an older release made is
upgraded through Alembic."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import inspect

from accessline_server.callmatching.journey import migrate
from accessline_server.runtime import tables
from tests.support.postgres import Postgres


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
