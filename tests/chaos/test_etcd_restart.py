"""etcd SIGKILLed and restarted under load, the five services on it: every refusal in the
outage is a clean one to retry, a call waiting in the queue keeps its place and an
agent's session its lease through the restart, nothing is matched twice, and service
resumes once etcd is back."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.common.v1 import common_pb2
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from tests.conftest import eventually
from tests.support.stack import (
    ACCEPT,
    Call,
    agent,
    answer,
    handoff,
    pool_subject,
    set_available,
    setup_numbers,
    start_stack,
    stop_stack,
)

CLEAN = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


async def queued_call(router: Any, number: str, attempts: int = 5) -> Call:
    """A call placed until it waits in the queue; only clean refusals are placed again."""
    for attempt in range(attempts):
        call = Call(router, number)
        try:
            await call.until("queued")
            return call
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in CLEAN or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


async def test_etcd_killed_and_restarted_under_load_loses_nothing(
    private_etcd: EmbeddedEtcd, tmp_path: Path
) -> None:
    stack = await start_stack(
        private_etcd,
        f"/chaos-{uuid.uuid4().hex[:8]}",
        tmp_path,
        ACCESSLINE_ETCD_TIMEOUT_SECONDS="1",
    )
    try:
        group = f"g-{uuid.uuid4().hex[:6]}"
        app_id, numbers = await setup_numbers(stack, group, 30)
        subject = await pool_subject(stack, group)
        member, app = await agent(stack, group, available=False, skill=subject)
        # A call waits in the queue (the agent is not ready) across the outage. Placed as a
        # switch places it: a clean refusal (the 1 s etcd deadline met by a machine still
        # starting six processes) is placed again.
        waiting = await queued_call(stack.routers[0], numbers[0])

        refusals: Counter[str] = Counter()
        decided: Counter[str] = Counter()
        stop = asyncio.Event()

        async def customers(worker: int) -> None:
            serial = 0
            while not stop.is_set():
                serial += 1
                try:
                    started = await handoff(
                        stack,
                        app_id,
                        f"c{worker}-{serial}",
                        common_pb2.ContextData(subject=subject),
                        idempotency_key=f"k{worker}-{serial}",
                    )
                    call = Call(stack.routers[serial % 2], started.access_number)
                    first = await call.next()
                    if first.HasField("match_decided"):
                        if first.match_decided.outcome == cm_pb2.MATCH_OUTCOME_MATCHED:
                            decided[first.match_decided.session_id] += 1
                    elif first.HasField("failed"):
                        refusals[rt_pb2.FailureReason.Name(first.failed.reason)] += 1
                    call.hang_up()
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() in CLEAN, f"{exc.code().name}: {exc.details()}"
                    refusals[exc.code().name] += 1
                    await asyncio.sleep(0.1)  # a customer's app waiting before it retries

        load = [asyncio.ensure_future(customers(worker)) for worker in range(3)]
        await eventually(lambda: sum(decided.values()) >= 5, what="handoffs before the outage")
        private_etcd.kill()
        outage = time.monotonic()
        await eventually(lambda: sum(refusals.values()) >= 3, what="refusals in the outage")
        private_etcd.start()
        await private_etcd.wait_ready()
        back = time.monotonic()
        before = sum(decided.values())
        await eventually(
            lambda: sum(decided.values()) >= before + 5, timeout=30, what="handoffs after it"
        )
        print(
            f"etcd down {back - outage:.1f} s; matched again {time.monotonic() - back:.1f} s"
            f" after it was back; refusals {dict(refusals)}"
        )
        stop.set()
        await asyncio.gather(*load)

        assert max(decided.values()) == 1  # no session matched twice
        # The waiting call kept its place, and the agent's session lived on: once the
        # agent is ready, that very call reaches them.
        await set_available(app, True)
        assert (await waiting.until("offered", timeout=30)).offered.agent_id == member
        await answer(app, ACCEPT)
        assert (await waiting.until("connect")).connect.agent_id == member
        assert "failed" not in waiting.kinds()
        shown = await stack.pr.GetPresence(pr_pb2.GetPresenceRequest(agent_ids=[member]))
        assert shown.agents[0].overall != common_pb2.OVERALL_PRESENCE_OFFLINE
        app.call.cancel()
    finally:
        await stop_stack(stack)
