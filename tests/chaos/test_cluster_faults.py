"""Faults of a real 3-member etcd cluster under load: the member the services use is
killed, then the cluster's leader, while three NumberDistribution replicas race for a
small pool and while Routing serves a queue. Service comes back within seconds and the
recorded histories show no guarantee broken."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from accessline.numberdistribution.v1 import number_distribution_pb2_grpc as nd_grpc
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline_server.runtime.store import Store
from tests.conftest import (
    EtcdCluster,
    ServiceProcess,
    connect,
    error_details,
    eventually,
    spawn_service,
    wait_serving,
)
from tests.support.agents import WorkingAgent
from tests.support.holding import what_holds
from tests.support.stack import (
    Call,
    agent,
    setup_numbers,
    start_stack,
    stop_stack,
)
from tests.test_numberdistribution_race import (
    NUMBERS,
    Hold,
    SlotRecorder,
    all_free,
    churn,
    create_pool,
    overlaps,
)

# What a client may see while the cluster elects a leader or a member is gone: a clean
# refusal it can retry, never INTERNAL or UNKNOWN.
RETRYABLE = {"UNAVAILABLE", "DEADLINE_EXCEEDED"}


async def progress(counter: Callable[[], int], more: int, what: str) -> float:
    """Waits (with a deadline) until `counter` has grown by `more`; how long it took."""
    start, began = counter(), time.monotonic()
    await eventually(lambda: counter() >= start + more, timeout=20, what=what)
    return time.monotonic() - began


async def test_the_reservation_race_survives_losing_the_member_in_use_and_the_leader(
    etcd_cluster: EtcdCluster,
) -> None:
    prefix = f"/chaos-{uuid.uuid4().hex[:8]}"
    replicas: list[ServiceProcess] = [
        spawn_service(
            "accessline_server.numberdistribution",
            etcd_cluster.endpoints,
            prefix,
            ACCESSLINE_ETCD_TIMEOUT_SECONDS="2",
        )
        for _ in range(3)
    ]
    channels = []
    store = Store(etcd_cluster.endpoints, prefix)
    try:
        for replica in replicas:
            await wait_serving(replica)
        channels = [connect(r.address, service="callmatching") for r in replicas]
        stubs: list[Any] = [nd_grpc.NumberDistributionServiceStub(c) for c in channels]
        await create_pool(stubs, ttl=5)
        recorder = SlotRecorder(store)
        await recorder.start()
        history: list[Hold] = []
        done = 0

        def count(reserved: int) -> None:
            nonlocal done
            done = reserved

        racing = asyncio.ensure_future(churn(stubs, [True, True, True], 2400, history, count))
        await progress(lambda: done, 300, "reservations before the faults")
        # Every replica uses the first member listed: it dies.
        in_use = etcd_cluster.members[0]
        in_use.kill()
        recovered_member = await progress(lambda: done, 1, "service after the member died")
        await progress(lambda: done, 200, "reservations after the member died")
        in_use.start()
        await in_use.wait_ready()
        leader = await etcd_cluster.leader()
        leader.kill()
        recovered_leader = await progress(lambda: done, 1, "service after the leader died")
        await progress(lambda: done, 200, "reservations after the leader died")
        leader.start()
        outcomes = await asyncio.wait_for(racing, 120)
        await leader.wait_ready()
        await recorder.stop()
        print(
            f"service back {recovered_member:.1f} s after the member in use died,"
            f" {recovered_leader:.1f} s after the leader died; outcomes {outcomes}"
        )
        assert outcomes["reserved"] >= 2400
        assert overlaps(history) == []
        assert recorder.violations() == []
        refusals = {k.removeprefix("release ") for k in outcomes} - {"reserved"}
        assert refusals <= {"RESOURCE_EXHAUSTED", *RETRYABLE}, outcomes
        assert len({h.number for h in history}) == NUMBERS
        # A reservation whose answer was lost in the failover ends with its lease.
        try:
            await eventually(lambda: all_free(stubs), timeout=30, what="every number free again")
        except AssertionError as failed:
            raise AssertionError(f"{failed}; {await what_holds(stubs, store, 'race')}") from None
    finally:
        await store.close()
        for channel in channels:
            await channel.close()
        await asyncio.gather(*(r.stop_async() for r in replicas))


async def test_routing_serves_its_queue_through_losing_the_etcd_leader(
    etcd_cluster: EtcdCluster, tmp_path: Path
) -> None:
    stack = await start_stack(
        etcd_cluster.endpoints,
        f"/chaos-{uuid.uuid4().hex[:8]}",
        tmp_path,
        ACCESSLINE_ETCD_TIMEOUT_SECONDS="2",
    )
    try:
        group = f"g-{uuid.uuid4().hex[:6]}"
        _, numbers = await setup_numbers(stack, group)
        team = [WorkingAgent(*await agent(stack, group)) for _ in range(3)]
        connected: list[str] = []
        agents = [asyncio.ensure_future(member.work()) for member in team]

        refused: list[str] = []

        async def one_call(index: int) -> None:
            # A switch routes a call refused cleanly (while etcd elects a leader) again,
            # after the delay the refusal's RetryInfo asks for, as the README tells it to.
            mine: list[str] = []
            started = time.monotonic()
            for attempt in range(10):
                call = Call(stack.routers[(index + attempt) % 2], numbers[0])
                try:
                    event = await call.until("connect", "failed", timeout=60)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code().name in RETRYABLE, exc
                    delay = error_details(exc)["RetryInfo"].retry_delay.ToNanoseconds() / 1e9
                    mine.append(f"{time.monotonic() - started:.1f}s {exc.code().name}")
                    refused.append(exc.code().name)
                    await asyncio.sleep(min(delay, 2.0))
                    continue
                if event.HasField("connect"):
                    connected.append(call.call_id)
                    return
                assert event.failed.reason == rt_pb2.FAILURE_REASON_UNAVAILABLE, event
                delay = event.failed.retry_after.ToNanoseconds() / 1e9
                mine.append(f"{time.monotonic() - started:.1f}s failed UNAVAILABLE")
                refused.append("failed UNAVAILABLE")
                await asyncio.sleep(min(delay, 2.0))
            raise AssertionError(f"call {index} never connected: {mine}")

        first = [asyncio.ensure_future(one_call(i)) for i in range(8)]
        await progress(lambda: len(connected), 2, "calls connected before the fault")
        leader = await etcd_cluster.leader()
        leader.kill()
        rest = [asyncio.ensure_future(one_call(i)) for i in range(8, 16)]
        try:
            await asyncio.wait_for(asyncio.gather(*first, *rest), 120)
        except (AssertionError, TimeoutError) as failed:
            seen = "\n".join(f"{m.agent_id}:\n  " + "\n  ".join(m.log) for m in team)
            raise AssertionError(f"{failed!r}; what the agents saw:\n{seen}") from failed
        leader.start()
        print(f"connected {len(connected)}; refused on the way {refused}")
        assert len(connected) == 16
        for task in agents:
            task.cancel()
        for member in team:
            member.stop()
    finally:
        await stop_stack(stack)
