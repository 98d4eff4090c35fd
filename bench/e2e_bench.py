"""End to end: etcd and all five services as processes; simulated apps start handoffs,
a simulated switch routes each call, simulated agents accept every offer. Prints
handoffs per second and p50/p99 of each stage, next to a raw etcd transaction baseline
measured in the same run.

    python -m bench.e2e_bench [--handoffs 300] [--concurrency 8] [--agents 16] [--profile]

With --profile, it also prints where each service's CPU went (bench/profile.py: its
threads, and its main thread by a py-spy profile).
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
from accessline.numberdistribution.v1 import number_distribution_pb2_grpc as nd_grpc
from accessline.presence.v1 import presence_pb2_grpc as pr_grpc
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline.routing.v1 import routing_pb2_grpc as rt_grpc
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from bench import profile
from bench.common import (
    SERVICE_PIDS,
    TALK,
    Result,
    costs,
    embedded_etcd,
    measure,
    mortgage_pool_and_bank,
    print_table,
    sample,
    service_process,
    simulated_team,
)

C = common_pb2
STAGES = {
    "handoff": "StartHandoff (app to number)",
    "match": "call arrival to match decision",
    "offer": "match decision to offer",
    "accept": "offer to agent accepted (connect)",
    "call": "call arrival to connect",
}


async def raw_baseline(host: str, port: int, count: int, concurrency: int) -> Result:
    client = aetcd.Client(host=host, port=port)
    await client.connect()
    value = wrappers_pb2.StringValue(value="x").SerializeToString()

    async def create(i: int) -> object:
        key = f"/raw/e2e/{i}".encode()
        return await client.transaction(
            compare=[client.transactions.create(key) == 0],
            success=[client.transactions.put(key, value)],
            failure=[],
        )

    result = await measure("raw etcd create-if-absent txn (aetcd)", create, count, concurrency)
    await client.close()
    return result


async def main(handoffs: int, concurrency: int, agents: int, profiled: bool) -> None:
    folder = Path(tempfile.mkdtemp(prefix="accessline-e2e-"))
    nd = "accessline_server.numberdistribution"
    # One history file for the three services that write the journey, as `make up` has.
    history = {"ACCESSLINE_HISTORY_DSN": f"sqlite+aiosqlite:///{folder / 'history.db'}"}
    async with embedded_etcd() as etcd:
        async with service_process(nd, etcd, "/e2e") as nd_address:  # noqa: SIM117 - each service needs the ones started before it
            async with (
                service_process(
                    "accessline_server.callmatching",
                    etcd,
                    "/e2e",
                    ACCESSLINE_NUMBERDISTRIBUTION_ADDRESS=nd_address,
                    **history,
                    # Numbers are reused at once (no quarantine) to measure throughput.
                    ACCESSLINE_LATE_CALL_WINDOW_SECONDS="0",
                ) as cm_address,
                service_process("accessline_server.presence", etcd, "/e2e") as pr_address,
                service_process("accessline_server.notification", etcd, "/e2e", **history),
            ):
                async with service_process(
                    "accessline_server.routing",
                    etcd,
                    "/e2e",
                    ACCESSLINE_CALLMATCHING_ADDRESS=cm_address,
                    ACCESSLINE_PRESENCE_ADDRESS=pr_address,
                    **history,
                ) as rt_address:
                    stages, cost = await drive(
                        etcd,
                        nd_address,
                        cm_address,
                        pr_address,
                        rt_address,
                        handoffs,
                        concurrency,
                        agents,
                        profile.Profiles(dict(SERVICE_PIDS)) if profiled else None,
                    )
        baseline = await raw_baseline(etcd.host, etcd.client_port, handoffs, concurrency)
    shutil.rmtree(folder, ignore_errors=True)
    title = f"end to end, {handoffs} handoffs, {concurrency} at once, {agents} agents"
    print_table(
        f"{title} (ops/s = handoffs per second)",
        [baseline, *stages],
        baseline,
    )
    print(cost)


async def drive(
    etcd: EmbeddedEtcd,
    nd_address: str,
    cm_address: str,
    pr_address: str,
    rt_address: str,
    handoffs: int,
    concurrency: int,
    agents: int,
    profiles: profile.Profiles | None,
) -> tuple[list[Result], str]:
    channels = [
        grpc.aio.insecure_channel(a) for a in (nd_address, cm_address, pr_address, rt_address)
    ]
    nd: Any = nd_grpc.NumberDistributionServiceStub(channels[0])
    cm: Any = cm_grpc.CallMatchingServiceStub(channels[1])
    pr: Any = pr_grpc.PresenceServiceStub(channels[2])
    rt: Any = rt_grpc.RoutingServiceStub(channels[3])
    await mortgage_pool_and_bank(nd, cm, "e2e", [f"+3314{i:07d}" for i in range(concurrency * 4)])
    # The agents wrap up once the call is connected, as real ones do.
    team = await simulated_team(
        pr, "mortgage-team", "mortgage", agents, "e2e-agent", 4000, pr_address, talk=TALK
    )
    timings: dict[str, list[float]] = {k: [] for k in STAGES}
    failures = 0

    async def one(i: int) -> object:
        nonlocal failures
        t0 = time.perf_counter()
        started = await cm.StartHandoff(
            cm_pb2.StartHandoffRequest(
                application_id="bank",
                customer_id=f"c{i}",
                context=C.ContextData(subject="mortgage", language="fr-FR"),
            )
        )
        t1 = time.perf_counter()
        call = rt.RouteInboundCall(
            rt_pb2.RouteInboundCallRequest(call_id=f"call-{i}", dnis=started.access_number)
        )
        marks: dict[str, float] = {}
        async for event in call:
            marks[event.WhichOneof("event")] = time.perf_counter()
        if "connect" not in marks:
            failures += 1
            return None
        timings["handoff"].append(t1 - t0)
        timings["match"].append(marks["match_decided"] - t1)
        timings["offer"].append(marks["offered"] - marks["match_decided"])
        timings["accept"].append(marks["connect"] - marks["offered"])
        timings["call"].append(marks["connect"] - t1)
        return None

    if profiles is not None:
        profiles.start()
    before = sample(etcd)
    started = time.perf_counter()
    await measure("calls", one, handoffs, concurrency)
    elapsed = time.perf_counter() - started
    after = sample(etcd)
    if profiles is not None:
        profiles.stop()
    for member in team:
        member.stop()
    for channel in channels:
        await channel.close()
    if failures:
        print(f"{failures} calls found no agent")
    results = [Result(STAGES[k], len(v), elapsed, v) for k, v in timings.items()]
    cost = costs(before, after, handoffs, "handoff")
    if profiles is not None:
        cost += "\n" + profiles.report(handoffs, "handoff")
    return results, cost


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--handoffs", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--agents", type=int, default=16)
    parser.add_argument("--profile", action="store_true", help="profile each service (py-spy)")
    args = parser.parse_args()
    asyncio.run(main(args.handoffs, args.concurrency, args.agents, args.profile))
