"""The journey's tables (created and upgraded by the Alembic migrations beside this
module) and the keyed hashes that stand for a customer's identifiers in them: no customer
id, phone number or e-mail address is stored in clear."""

from __future__ import annotations

import phonenumbers
from sqlalchemy import BigInteger, Boolean, Column, Index, Integer, MetaData, String, Table

from accessline_server.runtime.sealing import Sealer

metadata = MetaData()

ID = 128
KEY = 64

interactions = Table(
    "journey_interactions",
    metadata,
    Column("application_id", String(ID), primary_key=True),
    Column("interaction_id", String(ID), primary_key=True),
    Column("customer_key", String(KEY), nullable=True),
    Column("phone_key", String(KEY), nullable=True),
    Column("email_key", String(KEY), nullable=True),
    Column("transaction_id", String(ID), nullable=True),
    Column("channel", Integer, nullable=False),
    Column("topic", String(ID), nullable=True),
    Column("status", Integer, nullable=False),
    Column("agent_id", String(ID), nullable=True),
    Column("resource_group", String(ID), nullable=True),
    Column("outcome", String(ID), nullable=True),
    Column("source", Integer, nullable=False),
    Column("occurred_us", BigInteger, nullable=False),
    Column("updated_us", BigInteger, nullable=False),
    # Revision 0002: the customer's rating (1 to 5) and when it was given.
    Column("rating", Integer, nullable=True),
    Column("rated_us", BigInteger, nullable=True),
)
Index("ix_journey_rated", interactions.c.application_id, interactions.c.rated_us)
Index(
    "ix_journey_customer",
    interactions.c.application_id,
    interactions.c.customer_key,
    interactions.c.occurred_us,
)
Index(
    "ix_journey_transaction",
    interactions.c.application_id,
    interactions.c.transaction_id,
    interactions.c.occurred_us,
)
Index("ix_journey_phone", interactions.c.application_id, interactions.c.phone_key)
Index("ix_journey_email", interactions.c.application_id, interactions.c.email_key)
Index("ix_journey_occurred", interactions.c.occurred_us)

# A transaction belongs to the customer whose record first named it; it is open until
# its latest record is closed.
transactions = Table(
    "journey_transactions",
    metadata,
    Column("application_id", String(ID), primary_key=True),
    Column("transaction_id", String(ID), primary_key=True),
    Column("customer_key", String(KEY), nullable=True),
    Column("topic", String(ID), nullable=True),
    Column("open", Boolean, nullable=False),
    Column("updated_us", BigInteger, nullable=False),
)
Index(
    "ix_journey_transactions_customer",
    transactions.c.application_id,
    transactions.c.customer_key,
    transactions.c.updated_us,
)

# A phone number's or an e-mail address's keyed hash, tied to the customer whose record
# first named it with their customer id.
identifiers = Table(
    "journey_identifiers",
    metadata,
    Column("application_id", String(ID), primary_key=True),
    Column("identifier_key", String(KEY), primary_key=True),
    Column("customer_key", String(KEY), nullable=False),
    Column("updated_us", BigInteger, nullable=False),
)
Index(
    "ix_journey_identifiers_customer",
    identifiers.c.application_id,
    identifiers.c.customer_key,
)


class Correlator:
    """Keyed hashes (HMAC-SHA256 under ACCESSLINE_HISTORY_SECRET) of the identifiers a
    record is correlated by; the same secret in every service writing the journey."""

    def __init__(self, secret: bytes) -> None:
        self._sealer = Sealer(secret, b"accessline journey")

    def customer(self, application_id: str, customer_id: str) -> str | None:
        if not customer_id:
            return None
        return self._sealer.keyed_name("customer", f"{application_id}\0{customer_id}")

    def phone(self, number: str, region: str = "") -> str | None:
        """The key of a phone number in E.164 (national numbers with `region`); None when
        empty. Raises phonenumbers.NumberParseException when it is no number."""
        if not number:
            return None
        parsed = phonenumbers.parse(number, region or None)
        if not phonenumbers.is_possible_number(parsed):
            raise phonenumbers.NumberParseException(
                phonenumbers.NumberParseException.NOT_A_NUMBER, "not a possible number"
            )
        e164 = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
        return self._sealer.keyed_name("phone", e164)

    def email(self, address: str) -> str | None:
        if not address:
            return None
        return self._sealer.keyed_name("email", address.strip().lower())
