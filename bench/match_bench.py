"""Call matching speed: StartHandoff then MatchCall through gRPC, with real
NumberDistribution and CallMatching processes on one etcd, next to a raw etcd
transaction (the same compare-and-delete shape, through the same client library)
measured in the same run.

    python -m bench.match_bench [--count N] [--concurrency C]
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
import grpc
from google.protobuf import wrappers_pb2

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.callmatching.v1 import call_matching_pb2_grpc as cm_grpc
from accessline.common.v1 import common_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2_grpc as nd_grpc
from bench.common import Result, embedded_etcd, measure, print_table, service_process


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


async def main(count: int, concurrency: int) -> None:
    history = Path(tempfile.mkdtemp(prefix="accessline-bench-")) / "history.db"
    async with (
        embedded_etcd() as etcd,
        service_process("services.numberdistribution", etcd, "/bench") as nd_address,
        service_process(
            "services.callmatching",
            etcd,
            "/bench",
            ACCESSLINE_NUMBERDISTRIBUTION_ADDRESS=nd_address,
            ACCESSLINE_HISTORY_DSN=f"sqlite+aiosqlite:///{history}",
        ) as cm_address,
    ):
        async with (
            grpc.aio.insecure_channel(nd_address) as nd_channel,
            grpc.aio.insecure_channel(cm_address) as cm_channel,
        ):
            nd: Any = nd_grpc.NumberDistributionServiceStub(nd_channel)
            cm: Any = cm_grpc.CallMatchingServiceStub(cm_channel)
            pool = nd_pb2.Pool(pool_id="bench", subjects=["bench"])
            pool.access_code_policy.mode = nd_pb2.ACCESS_CODE_MODE_OPTIONAL
            await nd.CreatePool(nd_pb2.CreatePoolRequest(pool=pool))
            size = count + 400
            numbers = [f"+3314{i:07d}" for i in range(size)]
            for start in range(0, size, 10_000):
                await nd.AddNumbers(
                    nd_pb2.AddNumbersRequest(
                        pool_id="bench", numbers=numbers[start : start + 10_000]
                    )
                )
            app = cm_pb2.Application(
                application_id="bench", match_schema=common_pb2.MATCH_SCHEMA_NUMBER_CODE
            )
            await cm.RegisterApplication(cm_pb2.RegisterApplicationRequest(application=app))
            started: list[cm_pb2.StartHandoffResponse] = []

            async def start(_: int) -> float:
                t = time.perf_counter()
                reply = await cm.StartHandoff(
                    cm_pb2.StartHandoffRequest(
                        application_id="bench",
                        customer_id="c",
                        context=common_pb2.ContextData(
                            subject="bench", attributes={"k": "v" * 200}
                        ),
                    )
                )
                elapsed = time.perf_counter() - t
                started.append(reply)
                return elapsed

            async def match(i: int) -> object:
                session = started[i]
                reply = await cm.MatchCall(
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
            handoffs = await measure(
                "StartHandoff (reserve + store session)", start, count, concurrency
            )
            matches = await measure(
                "MatchCall (resolve + one transaction)", match, count, concurrency
            )
        baseline = await raw_baseline(etcd.host, etcd.client_port, count, concurrency)
    shutil.rmtree(history.parent, ignore_errors=True)
    print_table(
        f"call matching, {count} handoffs, {concurrency} concurrent",
        [baseline, handoffs, matches],
        baseline,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(main(args.count, args.concurrency))
