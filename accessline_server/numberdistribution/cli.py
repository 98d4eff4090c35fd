"""`accessline numbers ...`: pool administration from the command line, through the
NumberDistribution gRPC API (so it works against any replica, local or remote)."""

from __future__ import annotations

import argparse
import asyncio
import csv
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2_grpc as nd_grpc
from accessline_server.numberdistribution.servicer import MAX_NUMBERS_PER_CALL
from accessline_server.runtime.client import NoCredentials, add_client_arguments, client_channel

DEFAULT_ADDRESS = "127.0.0.1:50051"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help="NumberDistribution host:port")
    add_client_arguments(parser)
    sub = parser.add_subparsers(dest="numbers_command", required=True)

    create = sub.add_parser("create-pool", help="create a pool")
    create.add_argument("--pool", required=True)
    create.add_argument("--city", default="", help="city name; coordinates come from the gazetteer")
    create.add_argument("--country", default="", help="ISO country code of the city")
    create.add_argument("--lat", type=float)
    create.add_argument("--lon", type=float)
    create.add_argument("--subjects", default="", help="comma-separated")
    create.add_argument("--segments", default="", help="comma-separated")
    create.add_argument("--resource-group", default="")
    create.add_argument("--mode", choices=["exclusive", "shared"], default="exclusive")
    create.add_argument("--code", choices=["off", "optional", "required"], default="off")
    create.add_argument("--code-length", type=int, default=0)
    create.add_argument("--ttl", type=float, help="default reservation TTL, seconds")
    create.add_argument("--max-ttl", type=float, help="maximum reservation TTL, seconds")
    create.add_argument("--quarantine", type=float, help="quarantine, seconds")
    create.add_argument(
        "--order", type=int, default=0, help="order when the device location is unknown"
    )

    imp = sub.add_parser("import", help="add the numbers of a CSV file (first column) to a pool")
    imp.add_argument("--pool", required=True)
    imp.add_argument("file", type=Path)
    imp.add_argument("--region", default="", help="region of numbers without a country code")
    imp.add_argument("--batch", type=int, default=MAX_NUMBERS_PER_CALL)
    imp.add_argument("--concurrency", type=int, default=4)

    stats = sub.add_parser("stats", help="print a pool's stats")
    stats.add_argument("--pool", required=True)


def read_numbers(path: Path) -> Iterator[str]:
    """First column of each row; a first row that holds no digit is taken as a header."""
    with path.open(newline="") as handle:
        for index, row in enumerate(csv.reader(handle)):
            if not row or not row[0].strip():
                continue
            cell = row[0].strip()
            if index == 0 and not any(c.isdigit() for c in cell):
                continue
            yield cell


def _explain(error: grpc.aio.AioRpcError) -> str:
    lines = [f"{error.code().name}: {error.details()}"]
    status = rpc_status.from_call(error)  # type: ignore[arg-type]  # an aio error is a Call
    if status is not None:
        for detail in status.details:
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(bad):
                lines += [f"  {v.field}: {v.description}" for v in bad.field_violations[:20]]
    return "\n".join(lines)


def _print_stats(stats: nd_pb2.PoolStats) -> None:
    print(f"pool {stats.pool_id}")
    for name in (
        "total",
        "free",
        "reserved",
        "quarantined",
        "draining",
        "shared_reservations",
        "exhaustion_count",
    ):
        print(f"  {name:<20}{getattr(stats, name):>10}")


def _duration(seconds: float | None, target: Any) -> None:
    if seconds is not None:
        target.FromNanoseconds(int(seconds * 1e9))


async def _run(args: argparse.Namespace) -> int:
    async with client_channel(args, args.address) as channel:
        stub: Any = nd_grpc.NumberDistributionServiceStub(channel)
        command = args.numbers_command
        if command == "create-pool":
            pool = nd_pb2.Pool(
                pool_id=args.pool,
                subjects=[s for s in args.subjects.split(",") if s],
                segments=[s for s in args.segments.split(",") if s],
                resource_group=args.resource_group,
                mode=nd_pb2.POOL_MODE_SHARED
                if args.mode == "shared"
                else nd_pb2.POOL_MODE_EXCLUSIVE,
                default_order=args.order,
            )
            pool.city.name, pool.city.country_code = args.city, args.country
            if args.lat is not None and args.lon is not None:
                pool.city.location.latitude, pool.city.location.longitude = args.lat, args.lon
            pool.access_code_policy.mode = {
                "off": nd_pb2.ACCESS_CODE_MODE_OFF,
                "optional": nd_pb2.ACCESS_CODE_MODE_OPTIONAL,
                "required": nd_pb2.ACCESS_CODE_MODE_REQUIRED,
            }[args.code]
            pool.access_code_policy.length = args.code_length
            if args.ttl is not None:
                _duration(args.ttl, pool.default_reservation_ttl)
            if args.max_ttl is not None:
                _duration(args.max_ttl, pool.max_reservation_ttl)
            if args.quarantine is not None:
                _duration(args.quarantine, pool.quarantine)
            created = (await stub.CreatePool(nd_pb2.CreatePoolRequest(pool=pool), timeout=30)).pool
            loc = created.city.location
            where = f"{created.city.name} {loc.latitude:.4f},{loc.longitude:.4f}"
            print(f"created pool {created.pool_id} ({where})")
            return 0
        if command == "stats":
            reply = await stub.GetPoolStats(
                nd_pb2.GetPoolStatsRequest(pool_id=args.pool), timeout=30
            )
            _print_stats(reply.stats)
            return 0
        numbers = list(read_numbers(args.file))
        started = time.monotonic()
        batches = [numbers[i : i + args.batch] for i in range(0, len(numbers), args.batch)]
        gate = asyncio.Semaphore(max(1, args.concurrency))
        totals = {"added": 0, "present": 0, "conflicting": 0}

        async def send(batch: list[str]) -> None:
            async with gate:
                reply = await stub.AddNumbers(
                    nd_pb2.AddNumbersRequest(
                        pool_id=args.pool, numbers=batch, default_region=args.region
                    ),
                    timeout=120,
                )
            totals["added"] += reply.added
            totals["present"] += reply.already_present
            totals["conflicting"] += len(reply.conflicting)

        await asyncio.gather(*(send(b) for b in batches))
        elapsed = time.monotonic() - started
        print(
            f"imported {len(numbers)} numbers into {args.pool} in {elapsed:.1f} s: "
            f"{totals['added']} added, {totals['present']} already present, "
            f"{totals['conflicting']} in another pool"
        )
        reply = await stub.GetPoolStats(nd_pb2.GetPoolStatsRequest(pool_id=args.pool), timeout=30)
        _print_stats(reply.stats)
        return 0


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except grpc.aio.AioRpcError as error:
        print(f"accessline numbers: {_explain(error)}", file=sys.stderr)
        return 1
    except (OSError, NoCredentials) as error:
        print(f"accessline numbers: {error}", file=sys.stderr)
        return 1
