"""Replicas SIGTERMed and SIGKILLed under load. NumberDistribution: callers see only clean
refusals to retry, a stopping replica answers what it took, no number is matched twice
or lost. Routing: the dispatch leader (which also holds switch streams) killed while
calls queue: no agent is offered two calls at once, the surviving streams connect, and
no agent is left on a call whose caller is gone."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.callmatching.v1 import call_matching_pb2_grpc as cm_grpc
from accessline.common.v1 import common_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2_grpc as nd_grpc
from accessline.presence.storage.v1 import storage_pb2 as pr_store
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline_server.presence import offers as pr_offers
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from accessline_server.runtime.store import Store
from tests.conftest import ServiceProcess, connect, eventually, wait_serving
from tests.support.agents import WorkingAgent
from tests.support.holding import what_holds
from tests.support.stack import (
    Call,
    agent,
    leading_router,
    setup_numbers,
    start_stack,
    stop_stack,
)

CLEAN = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}
SESSION_TTL = 20
Factory = Callable[..., ServiceProcess]


@dataclass
class MatchLoad:
    """Customers who hand off and call in a loop: every outcome counted, and how many
    times each session matched (once at most, whatever is killed)."""

    cm: Any
    subject: str
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    seen: Counter[str] = field(default_factory=Counter)
    matched: Counter[str] = field(default_factory=Counter)
    # What each customer went through, by the session the handoff got (for a failure).
    story: dict[str, list[str]] = field(default_factory=dict)

    async def customer(self, worker: int) -> None:
        """Hands off and calls in a loop until stopped; every refusal must be a clean one."""
        serial = 0
        while not self.stop.is_set():
            serial += 1
            key = f"w{worker}-{serial}"
            request = cm_pb2.StartHandoffRequest(
                application_id=self.subject,
                customer_id=key,
                context=common_pb2.ContextData(subject=self.subject),
                idempotency_key=key,
            )
            story = [key]
            try:
                # A refused handoff is retried with the same key: never a second number.
                for _ in range(20):
                    try:
                        started = await self.cm.StartHandoff(request, timeout=10)
                        break
                    except grpc.aio.AioRpcError as exc:
                        self.seen[exc.code().name] += 1
                        story.append(f"StartHandoff {exc.code().name} {exc.details()}")
                        assert exc.code().name in CLEAN, exc.details()
                        await asyncio.sleep(0.05)
                else:
                    self.story[key] = story
                    continue
                self.story[started.session_id] = story
                story.append(f"StartHandoff {started.access_number}")
                outcome = await self.cm.MatchCall(
                    cm_pb2.MatchCallRequest(call_id=key, dnis=started.access_number),
                    timeout=10,
                )
            except grpc.aio.AioRpcError as exc:
                self.seen[exc.code().name] += 1
                story.append(f"{exc.code().name} {exc.details()}")
                assert exc.code().name in CLEAN, exc.details()
                continue
            story.append(cm_pb2.MatchOutcome.Name(outcome.outcome))
            self.seen[cm_pb2.MatchOutcome.Name(outcome.outcome)] += 1
            if outcome.outcome == cm_pb2.MATCH_OUTCOME_MATCHED:
                self.matched[outcome.session_id] += 1


async def test_numberdistribution_replicas_stopped_and_killed_under_load_lose_nothing(
    service_factory: Factory, etcd: EmbeddedEtcd, prefix: str
) -> None:
    numbers = [
        service_factory(
            "accessline_server.numberdistribution", ACCESSLINE_SHUTDOWN_DRAIN_DELAY_SECONDS="1"
        )
        for _ in range(3)
    ]
    for replica in numbers:
        await wait_serving(replica)
    matching = service_factory(
        "accessline_server.callmatching",
        ACCESSLINE_NUMBERDISTRIBUTION_ADDRESS=",".join(r.address for r in numbers),
        ACCESSLINE_LATE_CALL_WINDOW_SECONDS="0",
    )
    await wait_serving(matching)
    subject = f"s-{uuid.uuid4().hex[:6]}"
    pool = [f"+3322{uuid.uuid4().int % 10**3:03d}{i:04d}" for i in range(40)]
    async with (
        connect(numbers[0].address, service="callmatching") as nd_channel,
        connect(matching.address, service="routing") as cm_channel,
    ):
        nd: Any = nd_grpc.NumberDistributionServiceStub(nd_channel)
        cm: Any = cm_grpc.CallMatchingServiceStub(cm_channel)
        quarantine = nd_pb2.Pool(pool_id=subject, subjects=[subject])
        quarantine.quarantine.FromSeconds(0)
        quarantine.default_reservation_ttl.FromSeconds(10)
        await nd.CreatePool(nd_pb2.CreatePoolRequest(pool=quarantine))
        await nd.AddNumbers(nd_pb2.AddNumbersRequest(pool_id=subject, numbers=pool))
        # Sessions short enough that one a customer gave up on (a clean refusal of its
        # call) gives its number back by its lease within the test.
        application = cm_pb2.Application(
            application_id=subject, match_schema=common_pb2.MATCH_SCHEMA_NUMBER
        )
        application.default_session_ttl.FromSeconds(SESSION_TTL)
        await cm.RegisterApplication(cm_pb2.RegisterApplicationRequest(application=application))
        traffic = MatchLoad(cm, subject)
        seen, matched = traffic.seen, traffic.matched
        load = [asyncio.ensure_future(traffic.customer(i)) for i in range(16)]
        total = lambda: sum(matched.values())  # noqa: E731
        await eventually(lambda: total() >= 100, timeout=60, what="matches before the faults")
        numbers[0].signal(signal.SIGTERM)
        assert await numbers[0].wait_exit() == 0
        mark = total()
        await eventually(lambda: total() >= mark + 100, timeout=60, what="matches after SIGTERM")
        numbers[1].signal(signal.SIGKILL)
        mark = total()
        await eventually(lambda: total() >= mark + 100, timeout=60, what="matches after SIGKILL")
        traffic.stop.set()
        await asyncio.gather(*load)
        print(f"outcomes {dict(seen)}")
        assert max(matched.values()) == 1
        assert set(seen) <= {*CLEAN, "MATCH_OUTCOME_MATCHED"}, seen
        survivor: Any = nd_grpc.NumberDistributionServiceStub(
            connect(numbers[2].address, service="callmatching")
        )

        async def all_back() -> bool:
            stats = (await survivor.GetPoolStats(nd_pb2.GetPoolStatsRequest(pool_id=subject))).stats
            return stats.free == len(pool)

        # What the killed replica held comes back by its leases.
        try:
            await eventually(all_back, timeout=45, what="every number free again")
        except AssertionError as failed:
            async with Store(etcd.endpoint, prefix) as store:
                held = await what_holds([survivor], store, subject)
            stories = {s: t for s, t in traffic.story.items() if s in held or len(t) > 3}
            raise AssertionError(f"{failed}; {held}; customers: {stories}") from None


async def test_killing_the_dispatch_leader_under_queue_load_breaks_no_guarantee(
    etcd: EmbeddedEtcd, tmp_path: Path
) -> None:
    stack = await start_stack(etcd, f"/chaos-{uuid.uuid4().hex[:8]}", tmp_path)
    try:
        group = f"g-{uuid.uuid4().hex[:6]}"
        _, numbers = await setup_numbers(stack, group)
        team = []
        for _ in range(4):
            agent_id, app = await agent(stack, group)
            team.append(WorkingAgent(agent_id, app))
        workers = [asyncio.ensure_future(a.work()) for a in team]
        doomed, _ = await leading_router(stack)
        outcomes: Counter[str] = Counter()

        async def caller(index: int) -> None:
            call = Call(stack.routers[index % 2], numbers[0])
            try:
                event = await call.until("connect", "failed", timeout=60)
                outcomes[str(event.WhichOneof("event"))] += 1
            except grpc.aio.AioRpcError as exc:
                # The replica holding this stream died: the switch would call again.
                assert index % 2 == doomed, exc
                outcomes["stream lost with its replica"] += 1

        calls = [asyncio.ensure_future(caller(i)) for i in range(16)]
        await eventually(lambda: outcomes["connect"] >= 2, timeout=60, what="calls connecting")
        stack.router_processes[doomed].process.kill()
        await asyncio.wait_for(asyncio.gather(*calls), 120)
        survivors = sum(1 for i in range(16) if i % 2 != doomed)
        print(f"outcomes {dict(outcomes)}; told caller gone {[a.gone for a in team]}")
        assert outcomes["connect"] >= survivors
        assert [a.overlaps for a in team] == [0, 0, 0, 0]

        async def all_free() -> bool:
            shown = await stack.pr.GetPresence(
                pr_pb2.GetPresenceRequest(agent_ids=[a.agent_id for a in team])
            )
            return all(
                c.presence == common_pb2.CHANNEL_PRESENCE_AVAILABLE
                for a in shown.agents
                for c in a.channels
            )

        # Every agent is free again: calls ended by the agents, and calls whose caller
        # died with the replica undone by its lease.
        await eventually(all_free, timeout=30, what="every agent free")
        for member in team:
            ongoing, _ = await stack.store.get_prefix(
                pr_offers.interactions_key(member.agent_id), pr_store.StoredInteraction
            )
            assert ongoing == [], member.agent_id
        for task in workers:
            task.cancel()
        for member in team:
            member.stop()
    finally:
        await stop_stack(stack)
