"""The journey's schema under Alembic: `upgrade` brings a database to the newest
revision (at start when ACCESSLINE_HISTORY_MIGRATE is true, else by `accessline history
migrate` once per deploy); `current` tells whether it is there."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import func, inspect, select
from sqlalchemy.ext.asyncio import AsyncConnection

from accessline_server.runtime import tables

VERSION_TABLE = "journey_alembic_version"
# Alembic keeps the migration running in module globals: one upgrade at a time in a
# process (its writer and its readers may both find the tables missing at start).
_one_at_a_time = asyncio.Lock()


def _config(connection: Any = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    return ScriptDirectory.from_config(_config()).get_current_head() or ""


def _current(connection: Any) -> str:
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision() or ""


async def upgrade(conn: AsyncConnection) -> None:
    """Upgrades to the newest revision in this connection's transaction; two upgrades at
    once on PostgreSQL wait for each other."""
    async with _one_at_a_time:
        if conn.dialect.name == "postgresql":
            await conn.execute(select(func.pg_advisory_xact_lock(tables.MIGRATION_LOCK)))
        await conn.run_sync(lambda c: command.upgrade(_config(c), "head"))


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
    return await conn.run_sync(_current) == head()
