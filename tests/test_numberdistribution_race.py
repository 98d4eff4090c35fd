"""Exclusivity across replicas: three NumberDistribution processes on one etcd, 200
concurrent clients churning reservations of a 50-number pool. The recorded history must
show no number held by two live reservations at once, and no number may leak, even when
one replica is SIGKILLed mid-run."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import duration_pb2

from accessline.numberdistribution.storage.v1 import storage_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2_grpc as nd_grpc
from accessline_server.numberdistribution import keys
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from accessline_server.runtime.store import EventKind, Store, WatchEvent
from tests.conftest import ServiceProcess, connect, eventually, wait_serving

CLIENTS = 200
NUMBERS = 50
# A client told "exhausted" tries again after a short, jittered pause: load pacing.
EXHAUSTED_PAUSE = 0.005
# A customer holds the number a moment before the call ends it: simulated think time,
# which also gives a double hold a window wide enough to show in the client history.
CUSTOMER_HOLD = 0.02


@dataclass
class Hold:
    number: str
    reservation_id: str
    acquired: float  # wall clock, after the reservation was answered
    released: float  # wall clock, when the release was sent (or the reservation's expiry)


def seconds(value: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(value * 1e9))
    return d


def overlaps(history: list[Hold]) -> list[tuple[Hold, Hold]]:
    """Pairs of holds of one number whose intervals intersect: each is a violation."""
    by_number: dict[str, list[Hold]] = defaultdict(list)
    for hold in history:
        by_number[hold.number].append(hold)
    bad = []
    for holds in by_number.values():
        holds.sort(key=lambda h: h.acquired)
        latest_end: Hold | None = None
        for hold in holds:
            if latest_end is not None and hold.acquired < latest_end.released:
                bad.append((latest_end, hold))
            if latest_end is None or hold.released > latest_end.released:
                latest_end = hold
    return bad


class SlotRecorder:
    """Every change etcd made to the reservation slots, from a watch: the server-side
    history. An exclusive slot must go created (version 1), deleted, created, ...; a
    put on a live slot would be a second reservation overwriting the first."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.events: list[WatchEvent] = []
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        start = await self.store.revision() + 1

        async def record() -> None:
            async for event in self.store.watch_prefix(keys.SLOTS, start):
                self.events.append(event)

        self.task = asyncio.create_task(record())

    async def stop(self) -> None:
        latest = await self.store.revision()
        await eventually(
            lambda: any(e.revision >= latest for e in self.events) or not self.events,
            what="slot history caught up",
        )
        assert self.task is not None
        self.task.cancel()

    def violations(self) -> list[str]:
        return slot_violations(self.events)


def slot_violations(events: list[WatchEvent]) -> list[str]:
    """Puts on a live slot (or that are not its creation) in a slot history."""
    bad = []
    live: dict[str, str] = {}
    for event in events:
        if event.kind == EventKind.PUT:
            record = event.decode(storage_pb2.StoredReservation)
            if event.key in live or event.meta.version != 1:
                bad.append(f"{event.key}: {record.reservation_id} put over {live.get(event.key)}")
            live[event.key] = record.reservation_id
        else:
            live.pop(event.key, None)
    return bad


async def start_replicas(factory: Callable[..., ServiceProcess]) -> list[ServiceProcess]:
    replicas = [factory("accessline_server.numberdistribution") for _ in range(3)]
    for replica in replicas:
        await wait_serving(replica)
    return replicas


async def create_pool(stubs: list[Any], ttl: float) -> tuple[str, list[str]]:
    pool = nd_pb2.Pool(
        pool_id="race",
        subjects=["race"],
        default_reservation_ttl=seconds(ttl),
        max_reservation_ttl=seconds(ttl),
        quarantine=seconds(0),
    )
    await stubs[0].CreatePool(nd_pb2.CreatePoolRequest(pool=pool))
    numbers = [f"+3347900{i:04d}" for i in range(NUMBERS)]
    await stubs[0].AddNumbers(nd_pb2.AddNumbersRequest(pool_id="race", numbers=numbers))

    async def everyone_sees_it() -> bool:
        for stub in stubs:
            stats = (await stub.GetPoolStats(nd_pb2.GetPoolStatsRequest(pool_id="race"))).stats
            if stats.total != NUMBERS:
                return False
        return True

    await eventually(everyone_sees_it, what="every replica sees the pool")
    return "race", numbers


async def all_free(stubs: list[Any]) -> bool:
    stats = (await stubs[0].GetPoolStats(nd_pb2.GetPoolStatsRequest(pool_id="race"))).stats
    return stats.free == NUMBERS and stats.reserved == 0


async def churn(
    stubs: list[Any],
    alive: list[bool],
    total: int,
    history: list[Hold],
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    outcomes: dict[str, int] = defaultdict(int)

    async def client(index: int) -> None:
        home = index % len(stubs)
        while outcomes["reserved"] < total:
            live = [i for i in range(len(stubs)) if alive[i]]
            replica = home if alive[home] else random.choice(live)
            stub = stubs[replica]
            try:
                made = await stub.ReserveNumber(
                    nd_pb2.ReserveNumberRequest(subject="race"), timeout=10
                )
            except grpc.aio.AioRpcError as exc:
                outcomes[exc.code().name] += 1
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    await asyncio.sleep(EXHAUSTED_PAUSE * random.random())
                continue
            acquired = time.time()
            outcomes["reserved"] += 1
            if on_progress is not None:
                on_progress(outcomes["reserved"])
            if not alive[replica]:
                # Its replica was killed meanwhile: abandon the number to its lease.
                expiry = made.reservation.expires_at.ToNanoseconds() / 1e9
                history.append(
                    Hold(
                        made.reservation.access_number,
                        made.reservation.reservation_id,
                        acquired,
                        expiry,
                    )
                )
                continue
            await asyncio.sleep(CUSTOMER_HOLD * random.random())
            sent = time.time()
            history.append(
                Hold(
                    made.reservation.access_number, made.reservation.reservation_id, acquired, sent
                )
            )
            for attempt in range(len(stubs) + 1):
                target = stubs[
                    replica
                    if attempt == 0
                    else random.choice([i for i in range(len(stubs)) if alive[i]])
                ]
                try:
                    await target.ReleaseNumber(
                        nd_pb2.ReleaseNumberRequest(reservation_id=made.reservation.reservation_id),
                        timeout=10,
                    )
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in (
                        grpc.StatusCode.NOT_FOUND,
                        grpc.StatusCode.FAILED_PRECONDITION,
                    ):
                        break  # already released or expired: the hold ended no earlier than `sent`
                    outcomes[f"release {exc.code().name}"] += 1

    await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    return dict(outcomes)


async def test_no_number_is_ever_held_twice_across_three_replicas(
    service_factory: Callable[..., ServiceProcess], etcd: EmbeddedEtcd, prefix: str
) -> None:
    replicas = await start_replicas(service_factory)
    channels = [connect(r.address, service="callmatching") for r in replicas]
    stubs: list[Any] = [nd_grpc.NumberDistributionServiceStub(c) for c in channels]
    store = Store(etcd.endpoint, prefix)
    recorder = SlotRecorder(store)
    try:
        await create_pool(stubs, ttl=60)
        await recorder.start()
        history: list[Hold] = []
        outcomes = await churn(stubs, [True, True, True], 3000, history)
        await recorder.stop()
        assert outcomes["reserved"] >= 3000, outcomes
        assert len({h.number for h in history}) == NUMBERS
        assert overlaps(history) == []
        assert recorder.violations() == []
        puts = sum(e.kind == EventKind.PUT for e in recorder.events)
        assert puts == outcomes["reserved"]
        assert set(outcomes) <= {"reserved", "RESOURCE_EXHAUSTED"}, outcomes
        await eventually(lambda: all_free(stubs), what="every number free after the run")
    finally:
        await store.close()
        for channel in channels:
            await channel.close()


async def test_a_killed_replicas_reservations_expire_and_every_number_comes_back(
    service_factory: Callable[..., ServiceProcess],
) -> None:
    replicas = await start_replicas(service_factory)
    channels = [connect(r.address, service="callmatching") for r in replicas]
    stubs: list[Any] = [nd_grpc.NumberDistributionServiceStub(c) for c in channels]
    alive = [True, True, True]
    killed = asyncio.Event()

    def kill_midway(reserved: int) -> None:
        if reserved >= 600 and not killed.is_set():
            replicas[2].signal(signal.SIGKILL)
            alive[2] = False
            killed.set()

    try:
        await create_pool(stubs, ttl=3)
        history: list[Hold] = []
        outcomes = await churn(stubs, alive, 2000, history, on_progress=kill_midway)
        assert killed.is_set()
        assert await replicas[2].wait_exit() == -signal.SIGKILL
        assert outcomes["reserved"] >= 2000, outcomes
        assert overlaps(history) == []
        # Whatever the dead replica left held comes back through its leases alone.
        survivors = stubs[:2]
        await eventually(
            lambda: all_free(survivors), timeout=30, what="every number back after expiry"
        )
    finally:
        for channel in channels:
            await channel.close()


def test_the_overlap_check_catches_a_double_hold() -> None:
    history = [
        Hold("+33479000001", "a", acquired=10.0, released=12.0),
        Hold("+33479000001", "b", acquired=11.5, released=13.0),
        Hold("+33479000002", "c", acquired=11.0, released=12.0),
        Hold("+33479000002", "d", acquired=12.0, released=14.0),
    ]
    assert [(a.reservation_id, b.reservation_id) for a, b in overlaps(history)] == [("a", "b")]
