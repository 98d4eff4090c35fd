"""Presence fan-out: agents connected over two Presence replicas and watchers on both;
the time from an agent's presence change to its delivery at every watcher, next to a raw
etcd watch delivery (a put seen by as many plain etcd watchers) in the same run.

    python -m bench.presence_bench [--agents 1000] [--watchers 100] [--changes 100]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import grpc
from google.protobuf import wrappers_pb2

from accessline.common.v1 import common_pb2
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.presence.v1 import presence_pb2_grpc as pr_grpc
from accessline_server.runtime.store import Store
from bench.common import Result, embedded_etcd, print_table, service_process

C = common_pb2


class Agent:
    def __init__(self, stub: Any, agent_id: str) -> None:
        self.agent_id = agent_id
        self.queue: asyncio.Queue[pr_pb2.ConnectRequest | None] = asyncio.Queue()
        self.call = stub.Connect(self._requests())
        self.available = False
        self.drain: asyncio.Task[None] | None = None

    async def _requests(self) -> Any:
        while (message := await self.queue.get()) is not None:
            yield message

    async def login(self) -> None:
        self.queue.put_nowait(pr_pb2.ConnectRequest(login=pr_pb2.Login(agent_id=self.agent_id)))
        while not (await self.call.read()).HasField("snapshot"):
            pass
        self.drain = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        while await self.call.read() is not grpc.aio.EOF:
            pass

    def toggle(self) -> None:
        self.available = not self.available
        self.queue.put_nowait(
            pr_pb2.ConnectRequest(
                set_channel_presence=pr_pb2.SetChannelPresence(
                    channel=C.CHANNEL_CHAT, available=self.available
                )
            )
        )


class Arrivals:
    """Delivery times of the change being measured, and an event once all have come."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.key = ""
        self.times: list[float] = []
        self.complete = asyncio.Event()

    def expect(self, key: str) -> None:
        self.key, self.times = key, []
        self.complete.clear()

    def arrived(self, key: str) -> None:
        if key == self.key:
            self.times.append(time.perf_counter())
            if len(self.times) >= self.expected:
                self.complete.set()


async def watcher_loop(
    stub: Any, arrivals: Arrivals, ready: asyncio.Event, count: list[int]
) -> None:
    call = stub.WatchPresence(pr_pb2.WatchPresenceRequest())
    async for reply in call:
        if reply.HasField("snapshot"):
            count[0] += 1
            if count[0] == count[1]:
                ready.set()
        elif reply.HasField("change"):
            arrivals.arrived(reply.change.agent_id)


async def presence_fanout(stubs: list[Any], agents: int, watchers: int, changes: int) -> Result:
    ids = [f"bench-agent-{i:05d}" for i in range(agents)]
    gate = asyncio.Semaphore(64)

    async def register(i: int, agent_id: str) -> None:
        agent = pr_pb2.Agent(
            agent_id=agent_id,
            resource_groups=["bench"],
            channels=[
                pr_pb2.ChannelConfig(
                    channel=C.CHANNEL_DESK_VOICE, address=str(i), available_on_login=True
                ),
                pr_pb2.ChannelConfig(channel=C.CHANNEL_CHAT, address=agent_id, capacity=3),
            ],
        )
        async with gate:
            await stubs[i % 2].RegisterAgent(pr_pb2.RegisterAgentRequest(agent=agent))

    await asyncio.gather(*(register(i, a) for i, a in enumerate(ids)))
    sessions = [Agent(stubs[i % 2], a) for i, a in enumerate(ids)]
    for start in range(0, agents, 100):
        await asyncio.gather(*(s.login() for s in sessions[start : start + 100]))

    arrivals = Arrivals(watchers)
    ready = asyncio.Event()
    count = [0, watchers]
    tasks = [
        asyncio.create_task(watcher_loop(stubs[i % 2], arrivals, ready, count))
        for i in range(watchers)
    ]
    await ready.wait()
    latencies: list[float] = []
    started = time.perf_counter()
    for n in range(changes):
        session = sessions[(n * 7919) % agents]
        arrivals.expect(session.agent_id)
        sent = time.perf_counter()
        session.toggle()
        await arrivals.complete.wait()
        latencies += [t - sent for t in arrivals.times[:watchers]]
    elapsed = time.perf_counter() - started
    for task in tasks:
        task.cancel()
    for s in sessions:
        s.queue.put_nowait(None)
        if s.drain is not None:
            s.drain.cancel()
    return Result(
        f"presence change to {watchers} watchers ({agents} agents)", changes, elapsed, latencies
    )


async def raw_fanout(endpoint: str, watchers: int, changes: int) -> Result:
    stores = [Store(endpoint, "/raw") for _ in range(watchers)]
    arrivals = Arrivals(watchers)
    writer = Store(endpoint, "/raw")
    start = await writer.revision() + 1

    async def watch(store: Store) -> None:
        async for event in store.watch_prefix("presence/", start):
            arrivals.arrived(event.key)

    tasks = [asyncio.create_task(watch(s)) for s in stores]
    # Each watcher is established once it sees a first write.
    arrivals.expect("presence/warm")
    await writer.put("presence/warm", wrappers_pb2.StringValue(value="x"))
    await arrivals.complete.wait()
    latencies: list[float] = []
    started = time.perf_counter()
    for n in range(changes):
        arrivals.expect(f"presence/agent-{n}")
        sent = time.perf_counter()
        await writer.put(f"presence/agent-{n}", wrappers_pb2.StringValue(value="ready"))
        await arrivals.complete.wait()
        latencies += [t - sent for t in arrivals.times[:watchers]]
    elapsed = time.perf_counter() - started
    for task in tasks:
        task.cancel()
    for store in [*stores, writer]:
        await store.close()
    return Result(f"raw etcd put to {watchers} etcd watchers", changes, elapsed, latencies)


async def main(agents: int, watchers: int, changes: int) -> None:
    settings = {"ACCESSLINE_PRESENCE_HEARTBEAT_TIMEOUT_SECONDS": "3600"}
    async with (
        embedded_etcd() as etcd,
        service_process("accessline_server.presence", etcd, "/bench", **settings) as first,
        service_process("accessline_server.presence", etcd, "/bench", **settings) as second,
    ):
        options = [("grpc.max_concurrent_streams", 4000)]
        async with (
            grpc.aio.insecure_channel(first, options=options) as a,
            grpc.aio.insecure_channel(second, options=options) as b,
        ):
            stubs = [pr_grpc.PresenceServiceStub(a), pr_grpc.PresenceServiceStub(b)]
            ours = await presence_fanout(stubs, agents, watchers, changes)
        baseline = await raw_fanout(etcd.endpoint, watchers, changes)
    print_table(
        "presence fan-out (latency per delivery; ops/s = changes per second)",
        [baseline, ours],
        baseline,
    )
    ours_mean, raw_mean = statistics.mean(ours.latencies), statistics.mean(baseline.latencies)
    print(
        f"\ndeliveries measured: {len(ours.latencies)} (ours), {len(baseline.latencies)} (raw);"
        f" mean {ours_mean * 1000:.1f} ms vs {raw_mean * 1000:.1f} ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--watchers", type=int, default=100)
    parser.add_argument("--changes", type=int, default=100)
    args = parser.parse_args()
    asyncio.run(main(args.agents, args.watchers, args.changes))
