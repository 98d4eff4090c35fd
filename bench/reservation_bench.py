"""Reservation cost as pools grow: ReserveNumber through gRPC on pools of 100, 10,000 and
100,000 numbers, next to a raw etcd create-if-absent transaction through the same
client library in the same run, and on the smallest pool a second NumberDistribution
process on the standard asyncio event loop instead of uvloop, and two more logging at
INFO as in production, with and without the access log line per call.

Each worker reserves a number and releases it (pools have no quarantine, so numbers
churn); only the ReserveNumber call is timed. Then, on the largest pool, ReserveNumber
alone: the reservations held at once and released after the timed run; and the gRPC
floor of the same process, a Health.Check, which touches nothing. One etcd and the
NumberDistribution processes, started here.

    python -m bench.reservation_bench [--count N] [--concurrency C] [--sizes 100,10000,100000]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import aetcd
import grpc
from google.protobuf import wrappers_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2_grpc as nd_grpc
from bench.common import Result, embedded_etcd, measure, print_table, service_process

IMPORT_BATCH = 10_000


async def raw_baseline(host: str, port: int, count: int, concurrency: int) -> Result:
    client = aetcd.Client(host=host, port=port)
    await client.connect()
    lease = await client.lease(300)
    value = wrappers_pb2.StringValue(value="reserved").SerializeToString()

    async def create(i: int) -> object:
        key = f"/raw/slots/{i}".encode()
        return await client.transaction(
            compare=[client.transactions.create(key) == 0],
            success=[client.transactions.put(key, value, lease=lease.id)],
            failure=[],
        )

    await measure("warm-up", lambda i: create(i + 10_000_000), 200, concurrency)
    result = await measure("raw etcd create-if-absent txn (aetcd)", create, count, concurrency)
    await client.close()
    return result


async def prepare_pool(stub: Any, size: int, region_digit: int) -> str:
    pool_id = f"bench-{size}"
    pool = nd_pb2.Pool(pool_id=pool_id, subjects=[pool_id])
    pool.quarantine.FromSeconds(0)
    await stub.CreatePool(nd_pb2.CreatePoolRequest(pool=pool))
    numbers = [f"+33{region_digit}4{i:07d}" for i in range(size)]
    for start in range(0, size, IMPORT_BATCH):
        await stub.AddNumbers(
            nd_pb2.AddNumbersRequest(
                pool_id=pool_id, numbers=numbers[start : start + IMPORT_BATCH]
            ),
            timeout=120,
        )
    return pool_id


async def reservations(
    stub: Any, pool_id: str, count: int, concurrency: int, label: str = ""
) -> Result:
    request = nd_pb2.ReserveNumberRequest(subject=pool_id)

    async def reserve_and_release(_: int) -> float:
        started = time.perf_counter()
        made = await stub.ReserveNumber(request, timeout=10)
        elapsed = time.perf_counter() - started
        await stub.ReleaseNumber(
            nd_pb2.ReleaseNumberRequest(reservation_id=made.reservation.reservation_id), timeout=10
        )
        return elapsed

    await measure("warm-up", reserve_and_release, 200, concurrency)
    return await measure(
        f"ReserveNumber, pool of {len_label(pool_id)}{label}",
        reserve_and_release,
        count,
        concurrency,
    )


async def reservations_alone(stub: Any, pool_id: str, count: int, concurrency: int) -> Result:
    """ReserveNumber alone: `count` reservations held at once (the pool holds more), the
    releases made after the timed run."""
    request = nd_pb2.ReserveNumberRequest(subject=pool_id)
    made: list[str] = []

    async def reserve(_: int) -> None:
        reply = await stub.ReserveNumber(request, timeout=10)
        made.append(reply.reservation.reservation_id)

    result = await measure(
        f"ReserveNumber alone, pool of {len_label(pool_id)}", reserve, count, concurrency
    )

    async def release(i: int) -> None:
        release = nd_pb2.ReleaseNumberRequest(reservation_id=made[i])
        await stub.ReleaseNumber(release, timeout=10)

    await measure("releases", release, len(made), concurrency)
    return result


async def health_checks(address: str, count: int, concurrency: int) -> Result:
    """The gRPC floor: a unary call that touches nothing, on the same process."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest()
        await measure("warm-up", lambda _: stub.Check(check, timeout=10), 200, concurrency)
        return await measure(
            "gRPC Health.Check, same process",
            lambda _: stub.Check(check, timeout=10),
            count,
            concurrency,
        )


async def on_new_pool(address: str, size: int, count: int, concurrency: int, label: str) -> Result:
    """Reservations on a pool of its own in the NumberDistribution at `address`."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub: Any = nd_grpc.NumberDistributionServiceStub(channel)
        pool_id = await prepare_pool(stub, size, 8)
        return await reservations(stub, pool_id, count, concurrency, label)


def len_label(pool_id: str) -> str:
    return f"{int(pool_id.split('-')[1]):,}"


async def main(sizes: list[int], count: int, concurrency: int) -> None:
    async with (
        embedded_etcd() as etcd,
        service_process("accessline_server.numberdistribution", etcd, "/bench") as address,
        service_process(
            "accessline_server.numberdistribution",
            etcd,
            "/bench-asyncio",
            ACCESSLINE_EVENT_LOOP="asyncio",
        ) as plain_address,
        service_process(
            "accessline_server.numberdistribution",
            etcd,
            "/bench-logged",
            ACCESSLINE_LOG_LEVEL="INFO",
        ) as logged_address,
        service_process(
            "accessline_server.numberdistribution",
            etcd,
            "/bench-unlogged",
            ACCESSLINE_LOG_LEVEL="INFO",
            ACCESSLINE_ACCESS_LOG="false",
        ) as unlogged_address,
        grpc.aio.insecure_channel(address) as channel,
        grpc.aio.insecure_channel(plain_address) as plain_channel,
    ):
        stub: Any = nd_grpc.NumberDistributionServiceStub(channel)
        pools = [await prepare_pool(stub, size, i + 1) for i, size in enumerate(sizes)]
        plain: Any = nd_grpc.NumberDistributionServiceStub(plain_channel)
        plain_pool = await prepare_pool(plain, sizes[0], 9)
        baseline = await raw_baseline(etcd.host, etcd.client_port, count, concurrency)
        floor = await health_checks(address, count, concurrency)
        results = [await reservations(stub, pool_id, count, concurrency) for pool_id in pools]
        alone = await reservations_alone(stub, pools[-1], count, concurrency)
        on_asyncio = await reservations(
            plain, plain_pool, count, concurrency, ", standard asyncio loop"
        )
        logged, unlogged = [
            await on_new_pool(address, sizes[0], count, concurrency, label)
            for address, label in (
                (logged_address, ", INFO with the access log"),
                (unlogged_address, ", INFO without the access log"),
            )
        ]
    print_table(
        f"reservations, {count} per pool, {concurrency} concurrent clients",
        [baseline, floor, *results, alone, on_asyncio, logged, unlogged],
        baseline,
    )
    print(
        f"\nReserveNumber alone / raw create: {alone.per_second / baseline.per_second:.2f}x"
        f" (the gRPC floor, a Health.Check: {floor.per_second / baseline.per_second:.2f}x)"
    )
    print(
        f"\naccess log on / off (INFO), pool of {sizes[0]:,}:"
        f" p50 {logged.p50_ms / unlogged.p50_ms:.2f}x,"
        f" throughput {logged.per_second / unlogged.per_second:.2f}x"
    )
    print(
        f"\nuvloop (the default) / standard loop, pool of {sizes[0]:,}:"
        f" p50 {results[0].p50_ms / on_asyncio.p50_ms:.2f}x,"
        f" throughput {results[0].per_second / on_asyncio.per_second:.2f}x"
    )
    small, large = results[0], results[-1]
    p50, p99 = large.p50_ms / small.p50_ms, large.p99_ms / small.p99_ms
    throughput = large.per_second / small.per_second
    print(
        f"\nlarge pool / small pool: p50 {p50:.2f}x, p99 {p99:.2f}x, throughput {throughput:.2f}x"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sizes", default="100,10000,100000")
    args = parser.parse_args()
    asyncio.run(main([int(s) for s in args.sizes.split(",")], args.count, args.concurrency))
