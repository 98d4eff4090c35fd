"""Cost of Accessline's etcd store against the raw etcd client, in the same run.

Runs create-if-absent transactions under a lease through `accessline_server.runtime.store.Store`
and, as the baseline, the same compare-and-swap through aetcd's own client call, on one
embedded etcd. Prints ops/s, p50/p99 and the ratio to the baseline.

    python -m bench.store_bench [--count N] [--concurrency C]
"""

from __future__ import annotations

import argparse
import asyncio

import aetcd
from google.protobuf import wrappers_pb2

from accessline_server.runtime.store import Store
from bench.common import embedded_etcd, measure, print_table


async def main(count: int, concurrency: int) -> None:
    async with embedded_etcd() as etcd:
        raw = aetcd.Client(host=etcd.host, port=etcd.client_port)
        await raw.connect()
        lease = await raw.lease(60)
        value = wrappers_pb2.StringValue(value="reserved").SerializeToString()

        async def raw_create(i: int) -> object:
            key = f"/raw/reservations/{i}".encode()
            return await raw.transaction(
                compare=[raw.transactions.create(key) == 0],
                success=[raw.transactions.put(key, value, lease=lease.id)],
                failure=[],
            )

        async with Store(etcd.endpoint, "/bench") as store:
            lease_id = await store.grant_lease(60)
            message = wrappers_pb2.StringValue(value="reserved")

            async def store_create(i: int) -> object:
                return await store.create(f"reservations/{i}", message, lease=lease_id)

            # Warm both paths (channel setup, etcd caches) before measuring.
            await measure("warm-up", raw_create, 200, concurrency)
            await measure("warm-up", store_create, 200, concurrency)
            baseline = await measure(
                "raw etcd create-if-absent (aetcd client)",
                lambda i: raw_create(i + 1_000_000),
                count,
                concurrency,
            )
            ours = await measure(
                "Store.create (create-if-absent)",
                lambda i: store_create(i + 1_000_000),
                count,
                concurrency,
            )
        await raw.close()
    print_table(
        f"etcd store, {count} creates under a lease, {concurrency} concurrent",
        [baseline, ours],
        baseline,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(main(args.count, args.concurrency))
