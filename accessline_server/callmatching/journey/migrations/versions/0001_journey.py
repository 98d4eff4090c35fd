"""The journey: interactions, transactions, identifiers.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "journey_interactions",
        sa.Column("application_id", sa.String(128), primary_key=True),
        sa.Column("interaction_id", sa.String(128), primary_key=True),
        sa.Column("customer_key", sa.String(64), nullable=True),
        sa.Column("phone_key", sa.String(64), nullable=True),
        sa.Column("email_key", sa.String(64), nullable=True),
        sa.Column("transaction_id", sa.String(128), nullable=True),
        sa.Column("channel", sa.Integer, nullable=False),
        sa.Column("topic", sa.String(128), nullable=True),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("agent_id", sa.String(128), nullable=True),
        sa.Column("resource_group", sa.String(128), nullable=True),
        sa.Column("outcome", sa.String(128), nullable=True),
        sa.Column("source", sa.Integer, nullable=False),
        sa.Column("occurred_us", sa.BigInteger, nullable=False),
        sa.Column("updated_us", sa.BigInteger, nullable=False),
    )
    op.create_index(
        "ix_journey_customer",
        "journey_interactions",
        ["application_id", "customer_key", "occurred_us"],
    )
    op.create_index(
        "ix_journey_transaction",
        "journey_interactions",
        ["application_id", "transaction_id", "occurred_us"],
    )
    op.create_index("ix_journey_phone", "journey_interactions", ["application_id", "phone_key"])
    op.create_index("ix_journey_email", "journey_interactions", ["application_id", "email_key"])
    op.create_index("ix_journey_occurred", "journey_interactions", ["occurred_us"])
    op.create_table(
        "journey_transactions",
        sa.Column("application_id", sa.String(128), primary_key=True),
        sa.Column("transaction_id", sa.String(128), primary_key=True),
        sa.Column("customer_key", sa.String(64), nullable=True),
        sa.Column("topic", sa.String(128), nullable=True),
        sa.Column("open", sa.Boolean, nullable=False),
        sa.Column("updated_us", sa.BigInteger, nullable=False),
    )
    op.create_index(
        "ix_journey_transactions_customer",
        "journey_transactions",
        ["application_id", "customer_key", "updated_us"],
    )
    op.create_table(
        "journey_identifiers",
        sa.Column("application_id", sa.String(128), primary_key=True),
        sa.Column("identifier_key", sa.String(64), primary_key=True),
        sa.Column("customer_key", sa.String(64), nullable=False),
        sa.Column("updated_us", sa.BigInteger, nullable=False),
    )
    op.create_index(
        "ix_journey_identifiers_customer",
        "journey_identifiers",
        ["application_id", "customer_key"],
    )


def downgrade() -> None:
    op.drop_table("journey_identifiers")
    op.drop_table("journey_transactions")
    op.drop_table("journey_interactions")
