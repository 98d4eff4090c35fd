"""The journey's schema under Alembic: `upgrade` brings a database to the newest
revision (at start when ACCESSLINE_HISTORY_MIGRATE is true, else by `accessline history
migrate` once per deploy); `is_current` tells whether it is there.

A database without the journey's tables gets them whole from the schema module and is
stamped with the newest revision (what Alembic's own advice is for a fresh database, and
what every test database and first start is); Alembic itself is loaded only to upgrade a
database an older release made. `tests/test_journey_schema.py` checks that both ways give
the same tables, indexes and columns."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from sqlalchemy import Column, MetaData, String, Table, func, inspect, select
from sqlalchemy.ext.asyncio import AsyncConnection

from accessline_server.callmatching.journey import schema
from accessline_server.runtime import tables

VERSION_TABLE = "journey_alembic_version"
# The newest revision under migrations/versions (a test checks it is Alembic's head).
HEAD = "0002"
# Alembic keeps the migration running in module globals: one upgrade at a time in a
# process (its writer and its readers may both find the tables missing at start).
_one_at_a_time = asyncio.Lock()

_versions = MetaData()
version_table = Table(VERSION_TABLE, _versions, Column("version_num", String(32), primary_key=True))


def _config(connection: Any = None) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    config.attributes["connection"] = connection
    return config


def alembic_head() -> str:
    """The newest revision as Alembic reads the migrations."""
    from alembic.script import ScriptDirectory

    return str(ScriptDirectory.from_config(_config()).get_current_head() or "")


def _current(connection: Any) -> str:
    """The revision a database is at; "" without the journey's tables."""
    if not inspect(connection).has_table(VERSION_TABLE):
        return ""
    found = connection.execute(select(version_table.c.version_num)).first()
    return str(found[0]) if found else ""


def _fresh(connection: Any) -> None:
    """The journey's tables made whole and stamped with the newest revision."""
    schema.metadata.create_all(connection)
    _versions.create_all(connection)
    connection.execute(version_table.insert(), [{"version_num": HEAD}])


def _upgrade(connection: Any, target: str = "head") -> None:
    from alembic import command
    from alembic.util import CommandError

    try:
        command.upgrade(_config(connection), target)
    except CommandError as exc:  # a database newer than this release, say
        raise tables.SchemaMissing(f"the journey's tables cannot be upgraded: {exc}") from exc


async def upgrade(conn: AsyncConnection, *, through_alembic: bool = False) -> None:
    """Brings the database to the newest revision in this connection's transaction; two
    upgrades at once on PostgreSQL wait for each other."""
    async with _one_at_a_time:
        if conn.dialect.name == "postgresql":
            await conn.execute(select(func.pg_advisory_xact_lock(tables.MIGRATION_LOCK)))
        current = await conn.run_sync(_current)
        if current == HEAD:
            return
        if current or through_alembic:
            await conn.run_sync(_upgrade)
        else:
            await conn.run_sync(_fresh)


async def upgrade_database(dsn: str) -> list[str]:
    """Upgrades the database of `dsn`; the tables this created."""
    engine = tables.engine_for(dsn)
    try:
        async with engine.begin() as conn:
            names = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
            await upgrade(conn)
            after = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        return sorted(after - names)
    finally:
        await engine.dispose()


async def is_current(conn: AsyncConnection) -> bool:
    return bool(await conn.run_sync(_current) == HEAD)
