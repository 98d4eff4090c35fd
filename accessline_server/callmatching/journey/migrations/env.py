"""Alembic's environment for the journey's tables: run by `migrate.upgrade` on a
connection it is given (never from a URL of its own)."""

from alembic import context

from accessline_server.callmatching.journey.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table="journey_alembic_version",
)
with context.begin_transaction():
    context.run_migrations()
