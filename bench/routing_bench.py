"""Routing: calls per second from RouteInboundCall to the agent's accept, with etcd and
NumberDistribution, CallMatching, Presence and two Routing replicas as processes and
simulated agents who accept every offer and wrap up at once. Every call is a matched
handoff started beforehand, so the clock runs from the switch's call to the connect
only. Prints p50/p99 of each stage, the share of the call's time spent in MatchCall, and
a raw etcd transaction baseline measured in the same run.

    python -m bench.routing_bench [--calls 400] [--concurrency 16] [--agents 24] [--replicas 2]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import grpc

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.callmatching.v1 import call_matching_pb2_grpc as cm_grpc
from accessline.common.v1 import common_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2_grpc as nd_grpc
from accessline.presence.v1 import presence_pb2_grpc as pr_grpc
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline.routing.v1 import routing_pb2_grpc as rt_grpc
from bench.common import (
    Result,
    embedded_etcd,
    measure,
    mortgage_pool_and_bank,
    print_table,
    service_process,
    simulated_team,
)
from bench.e2e_bench import raw_baseline

C = common_pb2


async def main(calls: int, concurrency: int, agents: int, replicas: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="accessline-routing-"))
    async with embedded_etcd() as etcd, AsyncExitStack() as stack:
        prefix = "/routing-bench"
        nd = await stack.enter_async_context(
            service_process("accessline_server.numberdistribution", etcd, prefix)
        )
        cm = await stack.enter_async_context(
            service_process(
                "accessline_server.callmatching",
                etcd,
                prefix,
                ACCESSLINE_NUMBERDISTRIBUTION_ADDRESS=nd,
                ACCESSLINE_HISTORY_DSN=f"sqlite+aiosqlite:///{folder / 'history.db'}",
                # Numbers are reused at once (no quarantine) to measure throughput.
                ACCESSLINE_LATE_CALL_WINDOW_SECONDS="0",
            )
        )
        pr = await stack.enter_async_context(
            service_process("accessline_server.presence", etcd, prefix)
        )
        routers = [
            await stack.enter_async_context(
                service_process(
                    "accessline_server.routing",
                    etcd,
                    prefix,
                    ACCESSLINE_CALLMATCHING_ADDRESS=cm,
                    ACCESSLINE_PRESENCE_ADDRESS=pr,
                )
            )
            for _ in range(replicas)
        ]
        stages = await drive(nd, cm, pr, routers, calls, concurrency, agents)
        await stack.aclose()
        baseline = await raw_baseline(etcd.host, etcd.client_port, calls, concurrency)
    shutil.rmtree(folder, ignore_errors=True)
    total, match = stages[0], stages[1]
    print_table(
        f"routing, {calls} matched calls, {concurrency} at once, {agents} agents, "
        f"{replicas} Routing replicas (ops/s = calls per second)",
        [baseline, *stages],
        baseline,
    )
    share_p50 = match.p50_ms / total.p50_ms if total.p50_ms else float("nan")
    share_sum = sum(match.latencies) / sum(total.latencies) if total.latencies else float("nan")
    print(
        f"share of the call's time in MatchCall: {share_sum:.0%} of all call time, "
        f"p50 {match.p50_ms:.1f} ms of {total.p50_ms:.1f} ms ({share_p50:.0%})"
    )


async def drive(
    nd_address: str,
    cm_address: str,
    pr_address: str,
    rt_addresses: list[str],
    calls: int,
    concurrency: int,
    agents: int,
) -> list[Result]:
    channels = [grpc.aio.insecure_channel(a) for a in (nd_address, cm_address, pr_address)]
    router_channels = [grpc.aio.insecure_channel(a) for a in rt_addresses]
    nd: Any = nd_grpc.NumberDistributionServiceStub(channels[0])
    cm: Any = cm_grpc.CallMatchingServiceStub(channels[1])
    pr: Any = pr_grpc.PresenceServiceStub(channels[2])
    routers: list[Any] = [rt_grpc.RoutingServiceStub(c) for c in router_channels]
    await mortgage_pool_and_bank(nd, cm, "bench", [f"+3315{i:07d}" for i in range(calls)])
    team = await simulated_team(
        pr, "mortgage-team", "mortgage", agents, "bench-agent", 5000, pr_address
    )
    # Every call's handoff first, so the measured time is the switch's alone.
    numbers: list[str] = []
    for i in range(calls):
        started = await cm.StartHandoff(
            cm_pb2.StartHandoffRequest(
                application_id="bank",
                customer_id=f"c{i}",
                context=C.ContextData(subject="mortgage", language="fr-FR"),
            )
        )
        numbers.append(started.access_number)
    stages: dict[str, list[float]] = {k: [] for k in ("total", "match", "dispatch", "accept")}
    failures = 0

    async def one(i: int) -> float:
        nonlocal failures
        t0 = time.perf_counter()
        call = routers[i % len(routers)].RouteInboundCall(
            rt_pb2.RouteInboundCallRequest(call_id=f"call-{i}", dnis=numbers[i])
        )
        marks: dict[str, float] = {}
        async for event in call:
            kind = event.WhichOneof("event")
            marks.setdefault(kind, time.perf_counter())
        if "connect" not in marks:
            failures += 1
            return 0.0
        stages["total"].append(marks["connect"] - t0)
        stages["match"].append(marks["match_decided"] - t0)
        stages["dispatch"].append(marks["offered"] - marks["match_decided"])
        stages["accept"].append(marks["connect"] - marks["offered"])
        return marks["connect"] - t0

    began = time.perf_counter()
    await measure("calls", one, calls, concurrency)
    elapsed = time.perf_counter() - began
    for member in team:
        member.stop()
    for channel in [*channels, *router_channels]:
        await channel.close()
    if failures:
        print(f"{failures} calls were not connected")
    names = {
        "total": "RouteInboundCall to agent accept (connect)",
        "match": "  of which MatchCall (to match decision)",
        "dispatch": "  match decision to offer (queue, claim)",
        "accept": "  offer to accept (agent app round trip)",
    }
    return [Result(names[k], len(v), elapsed, v) for k, v in stages.items()]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--agents", type=int, default=24)
    parser.add_argument("--replicas", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.concurrency, args.agents, args.replicas))
