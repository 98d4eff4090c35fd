"""Call matching speed: StartHandoff then MatchCall through gRPC, with real
NumberDistribution and CallMatching processes on one etcd, next to a raw etcd
transaction (the same compare-and-delete shape, through the same client library)
measured in the same run.

    python -m bench.match_bench [--count N] [--concurrency C] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import aetcd
from google.protobuf import wrappers_pb2

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.callmatching.v1 import call_matching_pb2_grpc as cm_grpc
from accessline.common.v1 import common_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2_grpc as nd_grpc
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from bench import profile
from bench.common import (
    SERVICE_PIDS,
    Result,
    Secured,
    channel,
    costs,
    cpu_seconds,
    embedded_etcd,
    measure,
    print_table,
    sample,
    service_process,
)

# With --profile: where each service's CPU goes during the MatchCalls (bench/profile.py).
PROFILE = False


async def raw_baseline(host: str, port: int, count: int, concurrency: int) -> Result:
    """Put a key, then delete it with a compare on its create revision: one transaction
    timed, the shape of a match."""
    client = aetcd.Client(host=host, port=port)
    await client.connect()
    value = wrappers_pb2.StringValue(value="session").SerializeToString()
    for i in range(count + 200):
        await client.put(f"/raw/sessions/{i}".encode(), value)

    async def consume(i: int) -> object:
        key = f"/raw/sessions/{i}".encode()
        return await client.transaction(
            compare=[client.transactions.version(key) > 0],
            success=[
                client.transactions.delete(key),
                client.transactions.put(b"/raw/outcome/" + key, value),
            ],
            failure=[],
        )

    await measure("warm-up", lambda i: consume(count + i), 200, concurrency)
    result = await measure("raw etcd compare-delete-put txn (aetcd)", consume, count, concurrency)
    await client.close()
    return result


async def provision(nd: Any, cm: Any, size: int) -> None:
    """A pool of `size` numbers issuing codes, and an application matching by code."""
    pool = nd_pb2.Pool(pool_id="bench", subjects=["bench"])
    pool.access_code_policy.mode = nd_pb2.ACCESS_CODE_MODE_OPTIONAL
    await nd.CreatePool(nd_pb2.CreatePoolRequest(pool=pool))
    numbers = [f"+3314{i:07d}" for i in range(size)]
    for start in range(0, size, 10_000):
        await nd.AddNumbers(
            nd_pb2.AddNumbersRequest(pool_id="bench", numbers=numbers[start : start + 10_000])
        )
    app = cm_pb2.Application(
        application_id="bench", match_schema=common_pb2.MATCH_SCHEMA_NUMBER_CODE
    )
    await cm.RegisterApplication(cm_pb2.RegisterApplicationRequest(application=app))


async def handoffs_and_matches(
    cm: Any,
    matcher: Any,
    count: int,
    concurrency: int,
    how: str,
    cpu: dict[str, float] | None,
    etcd: EmbeddedEtcd,
) -> list[Result]:
    """`count` StartHandoffs, then a MatchCall of each, after a warm-up; `cpu`, when given,
    receives the CPU seconds each service spent in the timed part. Prints what each
    StartHandoff and each MatchCall cost (CPU per process, etcd requests)."""
    started: list[cm_pb2.StartHandoffResponse] = []

    async def start(_: int) -> float:
        t = time.perf_counter()
        reply = await cm.StartHandoff(
            cm_pb2.StartHandoffRequest(
                application_id="bench",
                customer_id="c",
                context=common_pb2.ContextData(subject="bench", attributes={"k": "v" * 200}),
            )
        )
        elapsed = time.perf_counter() - t
        started.append(reply)
        return elapsed

    async def match(i: int) -> object:
        session = started[i]
        reply = await matcher.MatchCall(
            cm_pb2.MatchCallRequest(
                call_id=f"c{i}", dnis=session.access_number, dtmf_digits=session.access_code
            )
        )
        if reply.outcome != cm_pb2.MATCH_OUTCOME_MATCHED:
            raise RuntimeError(f"unexpected outcome {reply.outcome}")
        return reply

    await measure("warm-up", start, 200, concurrency)
    await measure("warm-up", match, 200, concurrency)
    started.clear()
    services = ("numberdistribution", "callmatching")
    before = {name: cpu_seconds(SERVICE_PIDS[name]) for name in services}
    samples = [sample(etcd)]
    results = [await measure(f"StartHandoff, {how}", start, count, concurrency)]
    samples.append(sample(etcd))
    profiles = profile.Profiles({n: SERVICE_PIDS[n] for n in services}) if PROFILE else None
    if profiles is not None:
        profiles.start()
    results.append(await measure(f"MatchCall, {how}", match, count, concurrency))
    samples.append(sample(etcd))
    if profiles is not None:
        profiles.stop()
        print(profiles.report(count, "MatchCall"))
    print(costs(samples[0], samples[1], count, f"StartHandoff ({how})"))
    print(costs(samples[1], samples[2], count, f"MatchCall ({how})"))
    if cpu is not None:
        for name in services:
            cpu[name] = cpu_seconds(SERVICE_PIDS[name]) - before[name]
    return results


async def call_matching_round(
    count: int,
    concurrency: int,
    security: Secured | None = None,
    *,
    baseline: bool = False,
    settings: dict[str, str] | None = None,
    cpu: dict[str, float] | None = None,
) -> list[Result]:
    """StartHandoff then MatchCall `count` times on a fresh etcd and fresh processes (over
    mutual TLS with tokens when `security` is given), both services with `settings`;
    with `baseline`, the raw etcd transaction first, on the same etcd. `cpu`, when given,
    receives the CPU seconds each service spent in the timed part."""
    settings = settings or {}
    history = Path(tempfile.mkdtemp(prefix="accessline-bench-")) / "history.db"
    results: list[Result] = []
    async with (
        embedded_etcd(security) as etcd,
        service_process(
            "accessline_server.numberdistribution", etcd, "/bench", security, **settings
        ) as nd_address,
        service_process(
            "accessline_server.callmatching",
            etcd,
            "/bench",
            security,
            ACCESSLINE_NUMBERDISTRIBUTION_ADDRESS=nd_address,
            ACCESSLINE_HISTORY_DSN=f"sqlite+aiosqlite:///{history}",
            **settings,
        ) as cm_address,
    ):
        if baseline:
            results.append(await raw_baseline(etcd.host, etcd.client_port, count, concurrency))
        # As an admin and app backend (setup, StartHandoff) and as Routing, which alone
        # calls MatchCall (its certificate).
        async with (
            channel(nd_address, security) as nd_channel,
            channel(cm_address, security) as cm_channel,
            (
                security.service_channel(cm_address, "routing") if security else channel(cm_address)
            ) as switch_channel,
        ):
            nd: Any = nd_grpc.NumberDistributionServiceStub(nd_channel)
            cm: Any = cm_grpc.CallMatchingServiceStub(cm_channel)
            matcher: Any = cm_grpc.CallMatchingServiceStub(switch_channel)
            await provision(nd, cm, count + 400)
            how = "TLS + JWT" if security else "plain"
            results += await handoffs_and_matches(cm, matcher, count, concurrency, how, cpu, etcd)
    shutil.rmtree(history.parent, ignore_errors=True)
    return results


async def main(count: int, concurrency: int) -> None:
    baseline, handoffs, matches = await call_matching_round(count, concurrency, baseline=True)
    print_table(
        f"call matching, {count} handoffs, {concurrency} concurrent",
        [baseline, handoffs, matches],
        baseline,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--profile", action="store_true", help="profile MatchCall (py-spy)")
    args = parser.parse_args()
    PROFILE = args.profile
    asyncio.run(main(args.count, args.concurrency))
