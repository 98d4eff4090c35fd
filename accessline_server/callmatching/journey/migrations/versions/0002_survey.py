"""The customer's rating of an interaction.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("journey_interactions") as table:
        table.add_column(sa.Column("rating", sa.Integer, nullable=True))
        table.add_column(sa.Column("rated_us", sa.BigInteger, nullable=True))
    op.create_index("ix_journey_rated", "journey_interactions", ["application_id", "rated_us"])


def downgrade() -> None:
    op.drop_index("ix_journey_rated", "journey_interactions")
    with op.batch_alter_table("journey_interactions") as table:
        table.drop_column("rated_us")
        table.drop_column("rating")
