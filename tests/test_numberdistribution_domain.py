"""NumberDistribution's domain classes in-process against a real etcd, no gRPC and no
processes: the rules that need only the store (exclusive numbers under racing
reservations, release into quarantine, drain) checked directly and fast. The process
tests (test_numberdistribution.py, the race and chaos tests) keep the end-to-end
guarantees."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from google.protobuf import duration_pb2
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline_server.numberdistribution.codes import CodeBook
from accessline_server.numberdistribution.pools import Pools
from accessline_server.numberdistribution.reserving import Reservations
from accessline_server.numberdistribution.view import NumberView
from accessline_server.runtime.errors import NotFound, ResourceExhausted
from accessline_server.runtime.store import Store
from tests.support.numbers import request


@dataclass
class Replica:
    view: NumberView
    pools: Pools
    reservations: Reservations


@pytest.fixture
async def replicas(store: Store) -> AsyncIterator[list[Replica]]:
    """Two replicas (a view and domain objects each) on one store prefix."""
    made = []
    for _ in range(2):
        view = NumberView(store)
        await view.start()
        made.append(
            Replica(
                view,
                Pools(store, view),
                Reservations(store, view, CodeBook(b"in-process test secret")),
            )
        )
    yield made
    for replica in made:
        await replica.view.stop()


async def a_pool(replica: Replica, numbers: int, quarantine: float = 0.0) -> list[str]:
    pool = nd_pb2.Pool(pool_id="lyon", quarantine=duration_pb2.Duration(seconds=int(quarantine)))
    await replica.pools.create_pool(pool)
    values = [f"+3347200{i:04d}" for i in range(numbers)]
    await replica.pools.add_numbers("lyon", values, "FR")
    return values


async def caught_up(store: Store, replicas: list[Replica]) -> None:
    """Every replica's view has applied everything written so far (the last write
    must be NumberDistribution's: the views move with their own keys' changes)."""
    revision = await store.revision()
    for replica in replicas:
        await replica.view.wait_for(revision)


async def test_racing_replicas_never_hand_out_one_number_twice(
    store: Store, replicas: list[Replica]
) -> None:
    numbers = await a_pool(replicas[0], 6)
    await caught_up(store, replicas)

    async def reserve(i: int) -> str | None:
        try:
            reservation = (await replicas[i % 2].reservations.reserve(request(f"s{i}"))).reservation
        except ResourceExhausted:
            return None
        return reservation.access_number

    got = await asyncio.gather(*(reserve(i) for i in range(20)))
    held = [number for number in got if number is not None]
    assert sorted(held) == sorted(numbers)  # every number once, the rest refused
    assert got.count(None) == 14
    await caught_up(store, replicas)  # counts are a replica's view: once it has them all
    stats = await replicas[1].pools.pool_stats("lyon")
    assert (stats.total, stats.reserved, stats.free) == (6, 6, 0)


async def test_a_released_number_rests_in_quarantine_before_it_is_reserved_again(
    store: Store, replicas: list[Replica]
) -> None:
    (number,) = await a_pool(replicas[0], 1, quarantine=60)
    await caught_up(store, replicas)
    first = (await replicas[0].reservations.reserve(request("s1"))).reservation
    assert first.access_number == number
    await replicas[0].reservations.release(first.reservation_id)
    await caught_up(store, replicas)
    with pytest.raises(ResourceExhausted) as refused:
        await replicas[0].reservations.reserve(request("s2"))
    # The refusal says when to try again: when the quarantine ends.
    assert 0 < (refused.value.retry_after or 0) <= 60
    stats = await replicas[0].pools.pool_stats("lyon")
    assert (stats.quarantined, stats.free) == (1, 0)


async def test_a_number_whose_reservation_lost_a_race_is_offered_again_once_its_view_knows_why(
    store: Store, replicas: list[Replica]
) -> None:
    """A replica whose reservation failed its compares on a number stops offering the
    number only until its view has applied the change that made the compare fail. The
    race that once lost a number for good: the view applied another replica's
    reservation and release of the number before the failure was reported, and nothing
    about the number changed after (seen in the cluster chaos test: one replica's view
    with 49 of 50 numbers free and none held)."""
    a, b = replicas
    (number,) = await a_pool(a, 1)
    await caught_up(store, replicas)
    held = (await b.reservations.reserve(request("s-b"))).reservation
    failed_at = await store.revision()  # a's compare failed here: b held the number
    await b.reservations.release(held.reservation_id)
    await caught_up(store, replicas)
    a.view.mark_taken("lyon", number, failed_at)
    again = (await a.reservations.reserve(request("s-a"))).reservation
    assert again.access_number == number


async def test_a_number_marked_taken_ahead_of_the_view_waits_for_the_view_then_returns(
    store: Store, replicas: list[Replica]
) -> None:
    """A failure the view has not caught up with yet (or one that was not about the
    number being held, such as a code that a late caller may still key in) keeps the
    number out until the view reaches that revision, then the view judges it again."""
    a, _ = replicas
    (number,) = await a_pool(a, 1)
    await caught_up(store, replicas)
    ahead = await store.revision() + 1
    a.view.mark_taken("lyon", number, ahead)
    with pytest.raises(ResourceExhausted):
        await a.reservations.reserve(request("s-1"))
    await a.pools.add_numbers("lyon", ["+33472009999"], "FR")  # any change moves the view on
    await caught_up(store, replicas)
    assert a.view.revision >= ahead
    got = {
        (await a.reservations.reserve(request(f"s-{i}"))).reservation.access_number for i in (2, 3)
    }
    assert number in got


class RecordingView(NumberView):
    """A replica's view that records the revisions its numbers were marked taken at."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.marked: list[tuple[str, int]] = []

    def mark_taken(self, pool_id: str, value: str, revision: int) -> None:
        self.marked.append((value, revision))
        super().mark_taken(pool_id, value, revision)


async def test_a_lost_race_waits_for_the_change_that_refused_it_not_for_another_services_write(
    store: Store, replicas: list[Replica]
) -> None:
    """etcd's revisions count every service's writes. A reservation refused at a revision
    another service wrote kept its number out of the view until NumberDistribution's
    keys changed again; at the end of a burst nothing changed any more, and the number
    stayed out for good (seen in the cluster chaos test: "every number free again"
    never came). The number waits for the change that refused it instead."""
    (number,) = await a_pool(replicas[0], 1)
    await caught_up(store, replicas)
    view = RecordingView(store)
    await view.start()
    await view.ready(10)
    await view.wait_for(await store.revision())
    await view.stop()  # a replica whose view has not seen B's reservation yet
    stale = Reservations(store, view, CodeBook(b"in-process test secret"), attempts=1)
    taken = await replicas[1].reservations.reserve(request("b"))
    refused_by = taken.fencing_revision
    elsewhere = await store.put("cm/elsewhere", nd_pb2.Pool(pool_id="another service's"))
    assert elsewhere > refused_by
    with pytest.raises(ResourceExhausted):
        await stale.reserve(request("a"))
    # B's reservation, which a running view reaches by its own watch.
    assert view.marked == [(number, refused_by)]


async def test_a_release_read_from_a_stale_view_is_stopped_by_its_fencing_token(
    store: Store, replicas: list[Replica]
) -> None:
    """A release takes the reservation from the replica's view when the view knows it:
    a view that has not seen another replica's release of it yet lets it through to the
    transaction, whose fencing token refuses it (NOT_FOUND), and nothing is written."""
    a, b = replicas
    (number,) = await a_pool(a, 1, quarantine=60)
    await caught_up(store, replicas)
    held = (await b.reservations.reserve(request("s-b"))).reservation
    await caught_up(store, replicas)
    assert a.view.reservation(held.reservation_id) is not None
    await a.view.stop()  # a's view stays as it is: it will not see the release
    await b.reservations.release(held.reservation_id)
    before = await store.revision()
    with pytest.raises(NotFound):
        await a.reservations.release(held.reservation_id)
    assert await store.revision() == before  # nothing written by the refused release
    assert a.view.reservation(held.reservation_id) is not None  # the view was stale indeed
    stats = await b.pools.pool_stats("lyon")
    assert (stats.reserved, stats.quarantined) == (0, 1)
    assert number in {n.number for n in b.view.pool_numbers("lyon")}


async def test_a_pool_whose_attempt_lost_its_race_is_not_counted_exhausted(
    store: Store, replicas: list[Replica]
) -> None:
    """Replica A's view is stale (stopped): replica B took a number A still sees free.
    A's only attempt loses its race on that number while another stays free: refused,
    but the pool was not found empty, so no exhaustion is counted against it."""
    numbers = await a_pool(replicas[0], 2)
    await caught_up(store, replicas)
    reader = InMemoryMetricReader()
    stale = Reservations(
        store,
        replicas[0].view,
        CodeBook(b"in-process test secret"),
        attempts=1,
        meter=MeterProvider(metric_readers=[reader]).get_meter("test"),
    )
    await replicas[0].view.stop()
    taken = (await replicas[1].reservations.reserve(request("b"))).reservation.access_number
    candidates = list(replicas[0].view.pools["lyon"].free._items)
    assert sorted(candidates) == sorted(numbers)
    # A seed with which A's one random pick is the number B took.
    seed = next(s for s in range(1000) if random.Random(s).choice(candidates) == taken)
    random.seed(seed)
    with pytest.raises(ResourceExhausted):
        await stale.reserve(request("a"))
    assert exhaustion_counts(reader) == {}


def exhaustion_counts(reader: InMemoryMetricReader) -> dict[str, int]:
    data = reader.get_metrics_data()
    found: dict[str, int] = {}
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "accessline.numbers.exhaustion":
                    for point in metric.data.data_points:
                        found[str(point.attributes["accessline.pool"])] = int(point.value)
    return found
