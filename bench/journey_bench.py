"""Listing a customer's journey in PostgreSQL at scale, against the bare index read in the
same run.

Loads --records interaction records of --customers customers (one transaction per 10
records, an identifier tied to one customer in 10) into a PostgreSQL server of its own,
migrated by the journey's Alembic revisions, then lists random customers' histories,
newest first, a page of 20, through the journey's own query (by customer id, by tied
identifiers and by the customer's transactions) and, as the baseline, through the one
index of the customer's own records (`WHERE application_id AND customer_key ORDER BY
occurred_us DESC LIMIT 21`, raw asyncpg). Prints p50/p99, the ratio, and the plan of the
journey's query (an index scan, never a sequential one).

    python -m bench.journey_bench [--records 10000000] [--customers 100000] [--queries 500]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Awaitable, Callable

import asyncpg
from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateIndex

from accessline_server.callmatching.journey import migrate, schema
from accessline_server.callmatching.journey.reads import Journey, Query, newest
from accessline_server.callmatching.journey.records import JourneyWriter
from bench.common import measure, print_table
from tests.support.postgres import running_postgres

BASE_US = 1_700_000_000_000_000
SECRET = b"journey-bench-secret-journey-bench-secret"


def customer_key(correlator: schema.Correlator, n: int) -> str:
    return correlator.customer("bank", f"customer-{n}") or ""


async def load(conn: asyncpg.Connection, records: int, customers: int, keys: list[str]) -> None:
    """Records in transactions of 10 (transaction t: records 10t to 10t + 9), each
    transaction a customer's (t mod customers: a customer's transactions spread over
    the whole history), loaded without the indexes, then built once (as a restore
    would)."""
    for index in schema.interactions.indexes | schema.transactions.indexes:
        await conn.execute(f"DROP INDEX IF EXISTS {index.name}")
    await conn.execute("CREATE TEMP TABLE bench_keys (n int PRIMARY KEY, key text)")
    await conn.copy_records_to_table("bench_keys", records=list(enumerate(keys)))
    await conn.execute(
        """
        INSERT INTO journey_interactions
        SELECT 'bank', 'i' || g, k.key, NULL, NULL, 't' || (g / 10), 1 + g % 9, 'claims',
               1 + g % 5, 'agent-' || (g % 500), 'group-' || (g % 20), NULL, 1,
               $1::bigint + g::bigint * 1000, $1::bigint + g::bigint * 1000, NULL, NULL
        FROM generate_series(0, $2 - 1) AS g JOIN bench_keys k ON k.n = (g / 10) % $3
        """,
        BASE_US,
        records,
        customers,
    )
    # One identifier in 10 customers tied to them.
    await conn.execute(
        """
        INSERT INTO journey_transactions
        SELECT 'bank', 't' || g, k.key, 'claims', g % 3 <> 0, $1::bigint + g::bigint * 10000
        FROM generate_series(0, $2 / 10 - 1) AS g JOIN bench_keys k ON k.n = g % $3
        """,
        BASE_US,
        records,
        customers,
    )
    await conn.execute(
        """
        INSERT INTO journey_identifiers
        SELECT 'bank', md5('phone' || k.n) || md5('p' || k.n), k.key, $1::bigint
        FROM bench_keys k WHERE k.n % 10 = 0
        """,
        BASE_US,
    )
    for index in schema.interactions.indexes | schema.transactions.indexes:
        await conn.execute(str(CreateIndex(index).compile(dialect=postgresql.dialect())))
    await conn.execute("ANALYZE")


async def main(records: int, customers: int, queries: int) -> None:
    correlator = schema.Correlator(SECRET)
    keys = [customer_key(correlator, n) for n in range(customers)]
    async with running_postgres() as server:
        dsn = server.dsn
        await migrate.upgrade_database(dsn)
        conn = await asyncpg.connect(host="127.0.0.1", port=server.port, user="postgres")
        began = time.perf_counter()
        await load(conn, records, customers, keys)
        took = time.perf_counter() - began
        print(f"loaded {records:,} records of {customers:,} customers in {took:.0f} s")
        journey = Journey(JourneyWriter(dsn, correlator, create_schema=False), 400)

        async def ours(key: str) -> object:
            return await journey.listing(query(key), 20, "")

        async def bare(key: str) -> object:
            return await conn.fetch(
                "SELECT * FROM journey_interactions WHERE application_id = 'bank'"
                " AND customer_key = $1 ORDER BY occurred_us DESC LIMIT 21",
                key,
            )

        picks = random.Random(7)

        def some(read: Callable[[str], Awaitable[object]]) -> Callable[[int], Awaitable[object]]:
            return lambda _: read(picks.choice(keys))

        for _ in range(3):  # warm both paths
            await measure("warm-up", some(ours), 50, 1)
            await measure("warm-up", some(bare), 50, 1)
        baseline = await measure("bare index read (asyncpg, one index)", some(bare), queries, 1)
        result = await measure("ListInteractions' query (Journey.listing)", some(ours), queries, 1)
        title = f"a customer's journey, page of 20, {records:,} records"
        print_table(title, [baseline, result], baseline)
        plan = await explain(conn, keys[0])
        print("plan of the journey's query:\n" + plan)
        print("sequential scan in the plan:", "Seq Scan on journey_interactions" in plan)
        await conn.close()
        await journey.stop()


async def explain(conn: asyncpg.Connection, key: str) -> str:
    """The plan of the journey's listing query, as run (EXPLAIN ANALYZE)."""
    statement = newest([schema.interactions.c.application_id == "bank"], query(key), 21)
    sql = statement.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})
    rows = await conn.fetch(f"EXPLAIN ANALYZE {sql}")
    return "\n".join(r[0] for r in rows)


def query(key: str) -> Query:
    return Query("bank", key, "", (), (), None, None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=10_000_000)
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=500)
    args = parser.parse_args()
    asyncio.run(main(args.records, args.customers, args.queries))
