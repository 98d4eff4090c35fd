"""NumberDistribution through its gRPC API, on a real service process and a real etcd:
pools, nearest-city choice, codes, quarantine, sharing, drain, idempotency (bad input is
test_numberdistribution_input.py's)."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from accessline.common.v1 import common_pb2
from accessline.numberdistribution.storage.v1 import storage_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline_server.numberdistribution import keys
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from accessline_server.runtime.store import Store
from tests.conftest import (
    error_details,
    eventually,
    violated_fields,
)
from tests.support.numbers import (
    DIJON,
    LYON,
    PARIS,
    PREFIX,
    make_pool,
    reserve,
    seconds,
)


async def test_a_pool_named_by_city_gets_coordinates_and_defaults(
    nd_stub: Any, subject: str
) -> None:
    pool, _ = await make_pool(nd_stub, subject, 0, city=common_pb2.City(name="Lyon"))
    assert pool.city.country_code == "FR"
    assert pool.city.location.latitude == pytest.approx(45.75, abs=0.05)
    assert pool.mode == nd_pb2.POOL_MODE_EXCLUSIVE
    assert pool.default_reservation_ttl.seconds == 300
    assert pool.max_reservation_ttl.seconds == 1800
    assert pool.quarantine.seconds == 60
    fetched = (await nd_stub.GetPool(nd_pb2.GetPoolRequest(pool_id=pool.pool_id))).pool
    assert fetched == pool
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await nd_stub.CreatePool(nd_pb2.CreatePoolRequest(pool=nd_pb2.Pool(pool_id=pool.pool_id)))
    assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_an_update_changes_the_fields_of_its_mask_of_the_version_read(
    nd_stub: Any, subject: str
) -> None:
    pool, _ = await make_pool(nd_stub, subject, 0, city=common_pb2.City(name="Lyon"))
    read = (await nd_stub.GetPool(nd_pb2.GetPoolRequest(pool_id=pool.pool_id))).pool
    assert read.etag
    change = nd_pb2.Pool(pool_id=pool.pool_id, display_name="Lyon desk", etag=read.etag)
    change.quarantine.FromSeconds(5)
    mask = field_mask_pb2.FieldMask(paths=["display_name", "quarantine"])
    updated = (
        await nd_stub.UpdatePool(nd_pb2.UpdatePoolRequest(pool=change, update_mask=mask))
    ).pool
    assert (updated.display_name, updated.quarantine.seconds) == ("Lyon desk", 5)
    # What the mask leaves out keeps its stored value.
    assert updated.city == read.city
    assert list(updated.subjects) == list(read.subjects)
    assert updated.etag != read.etag
    # A second writer holding the old version is told, and changes nothing.
    stale = nd_pb2.Pool(pool_id=pool.pool_id, display_name="other", etag=read.etag)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await nd_stub.UpdatePool(
            nd_pb2.UpdatePoolRequest(
                pool=stale, update_mask=field_mask_pb2.FieldMask(paths=["display_name"])
            )
        )
    assert refused.value.code() == grpc.StatusCode.ABORTED
    assert error_details(refused.value)["ErrorInfo"].reason == "ETAG_MISMATCH"
    now = (await nd_stub.GetPool(nd_pb2.GetPoolRequest(pool_id=pool.pool_id))).pool
    assert now == updated
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await nd_stub.UpdatePool(
            nd_pb2.UpdatePoolRequest(
                pool=nd_pb2.Pool(pool_id=pool.pool_id),
                update_mask=field_mask_pb2.FieldMask(paths=["pool_id", "colour", "city.name"]),
            )
        )
    assert violated_fields(bad.value) == {"update_mask.paths[0]", "update_mask.paths[1]"}


async def test_numbers_are_normalised_and_a_number_belongs_to_one_pool(
    nd_stub: Any, subject: str
) -> None:
    pool, numbers = await make_pool(nd_stub, subject, 2)
    other, _ = await make_pool(nd_stub, subject, 0)
    local = "04" + numbers[0][4:]  # the same number written nationally
    reply = await nd_stub.AddNumbers(
        nd_pb2.AddNumbersRequest(
            pool_id=pool.pool_id, numbers=[local, numbers[1]], default_region="FR"
        )
    )
    assert (reply.added, reply.already_present) == (0, 2)
    moved = await nd_stub.AddNumbers(
        nd_pb2.AddNumbersRequest(pool_id=other.pool_id, numbers=[numbers[0]])
    )
    assert list(moved.conflicting) == [numbers[0]]
    stats = (await nd_stub.GetPoolStats(nd_pb2.GetPoolStatsRequest(pool_id=pool.pool_id))).stats
    assert (stats.total, stats.free) == (2, 2)


async def test_the_nearest_city_is_chosen_then_the_next_then_exhaustion_with_retry_info(
    nd_stub: Any, subject: str
) -> None:
    lyon, lyon_numbers = await make_pool(
        nd_stub, subject, 1, city=common_pb2.City(name="Lyon", location=LYON), quarantine=seconds(5)
    )
    paris, paris_numbers = await make_pool(
        nd_stub,
        subject,
        1,
        city=common_pb2.City(name="Paris", location=PARIS),
        quarantine=seconds(5),
    )
    first = await reserve(nd_stub, subject, device_location=DIJON, ttl=seconds(60))
    assert first.reservation.access_number == lyon_numbers[0]
    assert (first.reason.pool_id, first.reason.city, first.reason.fallback) == (
        lyon.pool_id,
        "Lyon",
        False,
    )
    assert first.reason.distance_km == pytest.approx(175, abs=10)

    second = await reserve(nd_stub, subject, device_location=DIJON, ttl=seconds(60))
    assert second.reservation.access_number == paris_numbers[0]
    assert second.reason.fallback

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await reserve(nd_stub, subject, device_location=DIJON, ttl=seconds(60))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    found = error_details(caught.value)
    assert found["ErrorInfo"].reason == "POOLS_EXHAUSTED"
    # The soonest reservation ends its TTL plus quarantine from now: about 65 s.
    assert 55 <= found["RetryInfo"].retry_delay.seconds <= 66
    # Lyon was found full twice (by the fallback to Paris, then by the refusal).
    for pool, exhausted in ((lyon, 2), (paris, 1)):
        stats = (await nd_stub.GetPoolStats(nd_pb2.GetPoolStatsRequest(pool_id=pool.pool_id))).stats
        assert (stats.reserved, stats.free, stats.exhaustion_count) == (1, 0, exhausted)


async def test_without_a_location_pools_come_in_their_default_order(
    nd_stub: Any, subject: str
) -> None:
    _, second_numbers = await make_pool(nd_stub, subject, 1, default_order=2)
    _, first_numbers = await make_pool(nd_stub, subject, 1, default_order=1)
    reply = await reserve(nd_stub, subject)
    assert reply.reservation.access_number == first_numbers[0]
    assert (await reserve(nd_stub, subject)).reservation.access_number == second_numbers[0]


async def test_a_retry_with_the_same_idempotency_key_returns_the_same_reservation_and_code(
    nd_stub: Any, subject: str
) -> None:
    policy = nd_pb2.AccessCodePolicy(mode=nd_pb2.ACCESS_CODE_MODE_REQUIRED, length=8)
    await make_pool(nd_stub, subject, 3, access_code_policy=policy)
    first = await reserve(nd_stub, subject, idempotency_key="handoff-42")
    again = await reserve(nd_stub, subject, idempotency_key="handoff-42")
    other = await reserve(nd_stub, subject, idempotency_key="handoff-43")
    assert again.reservation == first.reservation
    assert again.access_code == first.access_code
    assert len(first.access_code) == 8
    assert other.reservation.reservation_id != first.reservation.reservation_id


async def test_an_answer_carries_the_stored_reservation_and_its_fencing_token(
    nd_stub: Any, subject: str, etcd: EmbeddedEtcd
) -> None:
    """What CallMatching fences its session by, without reading it back: the record as
    stored and the create revision of its slot key, for a first answer and a replay."""
    await make_pool(nd_stub, subject, 1)
    first = await reserve(nd_stub, subject, idempotency_key="fenced-1")
    again = await reserve(nd_stub, subject, idempotency_key="fenced-1")
    async with Store(etcd.endpoint, PREFIX) as store:
        entry = await store.get(
            keys.slot(first.reservation.access_number, 0), storage_pb2.StoredReservation
        )
    assert entry is not None
    for answer in (first, again):
        assert answer.stored == entry.value
        assert answer.fencing_revision == entry.meta.create_revision


async def test_access_codes_are_checked_and_never_stored_in_clear(
    nd_stub: Any, subject: str, etcd: EmbeddedEtcd
) -> None:
    policy = nd_pb2.AccessCodePolicy(mode=nd_pb2.ACCESS_CODE_MODE_OPTIONAL, length=6)
    await make_pool(nd_stub, subject, 2, access_code_policy=policy)
    plain = await reserve(nd_stub, subject)
    coded = await reserve(nd_stub, subject, want_access_code=True)
    assert plain.access_code == ""
    assert not plain.reservation.has_access_code
    assert coded.access_code.isdigit()
    assert len(coded.access_code) == 6

    number = coded.reservation.access_number
    wrong = str((int(coded.access_code) + 1) % 1_000_000).zfill(6)
    checks = {}
    for digits in (coded.access_code, coded.access_code + "#", wrong, ""):
        reply = await nd_stub.ResolveNumber(
            nd_pb2.ResolveNumberRequest(dialled_number=number, dtmf_digits=digits)
        )
        checks[digits] = reply.reservations[0].code_check
    assert checks == {
        coded.access_code: nd_pb2.CODE_CHECK_MATCH,
        coded.access_code + "#": nd_pb2.CODE_CHECK_MATCH,
        wrong: nd_pb2.CODE_CHECK_MISMATCH,
        "": nd_pb2.CODE_CHECK_MISSING,
    }
    uncoded = await nd_stub.ResolveNumber(
        nd_pb2.ResolveNumberRequest(dialled_number=plain.reservation.access_number)
    )
    assert uncoded.reservations[0].code_check == nd_pb2.CODE_CHECK_NO_CODE

    async with Store(etcd.endpoint, PREFIX) as store:
        entry = await store.get(keys.slot(number, 0), storage_pb2.StoredReservation)
    assert entry is not None
    assert len(entry.value.code_hash) == 32
    assert coded.access_code.encode() not in entry.value.SerializeToString()


async def test_common_dialled_formats_resolve_to_the_same_reservation(
    nd_stub: Any, subject: str
) -> None:
    _, numbers = await make_pool(nd_stub, subject, 1)
    made = await reserve(nd_stub, subject)
    national = "0" + numbers[0][3:]
    for dialled, region in (
        (numbers[0], ""),
        (f"{numbers[0][:3]} {numbers[0][3]} {numbers[0][4:6]} {numbers[0][6:]}", ""),
        (national, "FR"),
        (f"tel:{numbers[0]}", ""),
        (f"sip:{numbers[0]}@gw.example.net;user=phone", ""),
    ):
        reply = await nd_stub.ResolveNumber(
            nd_pb2.ResolveNumberRequest(dialled_number=dialled, default_region=region)
        )
        assert reply.access_number == numbers[0], dialled
        assert [r.reservation.reservation_id for r in reply.reservations] == [
            made.reservation.reservation_id
        ]


async def test_a_released_number_rests_in_quarantine_before_it_is_handed_out_again(
    nd_stub: Any, subject: str
) -> None:
    _, numbers = await make_pool(nd_stub, subject, 1, quarantine=seconds(2))
    first = await reserve(nd_stub, subject)
    released = await nd_stub.ReleaseNumber(
        nd_pb2.ReleaseNumberRequest(reservation_id=first.reservation.reservation_id)
    )
    assert released.quarantined_until.ToNanoseconds() / 1e9 == pytest.approx(
        time.time() + 2, abs=1.5
    )

    late = await nd_stub.ResolveNumber(nd_pb2.ResolveNumberRequest(dialled_number=numbers[0]))
    assert late.quarantined
    assert list(late.reservations) == []  # a late caller matches nothing
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await reserve(nd_stub, subject)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_details(caught.value)["RetryInfo"].retry_delay.ToNanoseconds() <= 2.1e9

    async def reserved_again() -> nd_pb2.ReserveNumberResponse | None:
        try:
            return await reserve(nd_stub, subject)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            return None

    second = await eventually(
        reserved_again, timeout=20, interval=0.2, what="number back after quarantine"
    )
    assert second.reservation.access_number == numbers[0]
    assert second.reservation.reservation_id != first.reservation.reservation_id
    with pytest.raises(grpc.aio.AioRpcError) as twice:
        await nd_stub.ReleaseNumber(
            nd_pb2.ReleaseNumberRequest(reservation_id=first.reservation.reservation_id)
        )
    assert twice.value.code() == grpc.StatusCode.NOT_FOUND


async def test_an_expired_reservation_stops_matching_and_rests_before_reuse(
    nd_stub: Any, subject: str
) -> None:
    _, numbers = await make_pool(nd_stub, subject, 1, quarantine=seconds(2))
    made = await reserve(nd_stub, subject, ttl=seconds(1))

    async def expired() -> bool:
        reply = await nd_stub.ResolveNumber(nd_pb2.ResolveNumberRequest(dialled_number=numbers[0]))
        return not reply.reservations and reply.quarantined

    await eventually(expired, timeout=10, what="reservation expired into quarantine")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await nd_stub.ExtendReservation(
            nd_pb2.ExtendReservationRequest(
                reservation_id=made.reservation.reservation_id, ttl=seconds(30)
            )
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    async def free_again() -> bool:
        stats = (
            await nd_stub.GetPoolStats(nd_pb2.GetPoolStatsRequest(pool_id=made.reservation.pool_id))
        ).stats
        return stats.free == 1

    # The lease (TTL + quarantine) ends by itself: no replica has to act.
    await eventually(free_again, timeout=30, what="number free after TTL and quarantine")


async def test_extension_is_bounded_by_the_pool_maximum(nd_stub: Any, subject: str) -> None:
    await make_pool(nd_stub, subject, 1, max_reservation_ttl=seconds(120))
    made = await reserve(nd_stub, subject, ttl=seconds(30))
    extended = await nd_stub.ExtendReservation(
        nd_pb2.ExtendReservationRequest(
            reservation_id=made.reservation.reservation_id, ttl=seconds(100)
        )
    )
    assert extended.reservation.expires_at.seconds > made.reservation.expires_at.seconds + 60
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await nd_stub.ExtendReservation(
            nd_pb2.ExtendReservationRequest(
                reservation_id=made.reservation.reservation_id, ttl=seconds(200)
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == {"ttl"}
    with pytest.raises(grpc.aio.AioRpcError) as too_long:
        await reserve(nd_stub, subject, ttl=seconds(121))
    assert violated_fields(too_long.value) == {"ttl"}


async def test_a_shared_pool_shares_a_number_among_reservations_with_distinct_codes(
    nd_stub: Any, subject: str
) -> None:
    policy = nd_pb2.AccessCodePolicy(mode=nd_pb2.ACCESS_CODE_MODE_REQUIRED, length=4)
    pool, numbers = await make_pool(
        nd_stub,
        subject,
        1,
        mode=nd_pb2.POOL_MODE_SHARED,
        max_shares_per_number=3,
        access_code_policy=policy,
    )
    made = [await reserve(nd_stub, subject) for _ in range(3)]
    assert {m.reservation.access_number for m in made} == {numbers[0]}
    assert [m.reservation.shared for m in made] == [False, True, True]
    assert len({m.access_code for m in made}) == 3
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await reserve(nd_stub, subject)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    for m in made:
        reply = await nd_stub.ResolveNumber(
            nd_pb2.ResolveNumberRequest(dialled_number=numbers[0], dtmf_digits=m.access_code)
        )
        assert len(reply.reservations) == 3
        matched = [
            r.reservation.reservation_id
            for r in reply.reservations
            if r.code_check == nd_pb2.CODE_CHECK_MATCH
        ]
        assert matched == [m.reservation.reservation_id]
    stats = (await nd_stub.GetPoolStats(nd_pb2.GetPoolStatsRequest(pool_id=pool.pool_id))).stats
    assert (stats.reserved, stats.shared_reservations) == (1, 2)


async def test_a_drained_number_takes_no_new_reservation_but_the_live_one_finishes(
    nd_stub: Any, subject: str
) -> None:
    pool, numbers = await make_pool(nd_stub, subject, 2)
    held = await reserve(nd_stub, subject)
    busy, idle = (
        held.reservation.access_number,
        next(n for n in numbers if n != held.reservation.access_number),
    )
    drained = await nd_stub.DrainNumber(
        nd_pb2.DrainNumberRequest(pool_id=pool.pool_id, number=busy, draining=True)
    )
    assert drained.live_reservations == 1
    await nd_stub.DrainNumber(
        nd_pb2.DrainNumberRequest(pool_id=pool.pool_id, number=idle, draining=True)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await reserve(nd_stub, subject)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    stats = (await nd_stub.GetPoolStats(nd_pb2.GetPoolStatsRequest(pool_id=pool.pool_id))).stats
    assert (stats.total, stats.draining, stats.reserved, stats.free) == (2, 2, 1, 0)
    still = await nd_stub.ResolveNumber(nd_pb2.ResolveNumberRequest(dialled_number=busy))
    assert [r.reservation.reservation_id for r in still.reservations] == [
        held.reservation.reservation_id
    ]

    await nd_stub.DrainNumber(
        nd_pb2.DrainNumberRequest(pool_id=pool.pool_id, number=idle, draining=False)
    )
    assert (await reserve(nd_stub, subject)).reservation.access_number == idle


async def test_a_pool_with_live_reservations_is_deleted_only_drained_and_forced(
    nd_stub: Any, subject: str
) -> None:
    pool, numbers = await make_pool(nd_stub, subject, 2)
    held = await reserve(nd_stub, subject)
    for force in (False, True):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await nd_stub.DeletePool(nd_pb2.DeletePoolRequest(pool_id=pool.pool_id, force=force))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (
        await nd_stub.GetPool(nd_pb2.GetPoolRequest(pool_id=pool.pool_id))
    ).pool.pool_id == pool.pool_id
    stats = (await nd_stub.GetPoolStats(nd_pb2.GetPoolStatsRequest(pool_id=pool.pool_id))).stats
    assert stats.total == 2

    await nd_stub.DrainNumber(
        nd_pb2.DrainNumberRequest(
            pool_id=pool.pool_id, number=held.reservation.access_number, draining=True
        )
    )
    await nd_stub.DeletePool(nd_pb2.DeletePoolRequest(pool_id=pool.pool_id, force=True))
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await nd_stub.GetPool(nd_pb2.GetPoolRequest(pool_id=pool.pool_id))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    # Its numbers are free to join another pool.
    other, _ = await make_pool(nd_stub, subject, 0)
    moved = await nd_stub.AddNumbers(
        nd_pb2.AddNumbersRequest(pool_id=other.pool_id, numbers=numbers)
    )
    assert moved.added == 2


async def test_removing_a_reserved_number_is_refused_until_it_is_drained(
    nd_stub: Any, subject: str
) -> None:
    pool, numbers = await make_pool(nd_stub, subject, 1)
    await reserve(nd_stub, subject)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await nd_stub.RemoveNumbers(
            nd_pb2.RemoveNumbersRequest(pool_id=pool.pool_id, numbers=numbers)
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await nd_stub.DrainNumber(
        nd_pb2.DrainNumberRequest(pool_id=pool.pool_id, number=numbers[0], draining=True)
    )
    removed = await nd_stub.RemoveNumbers(
        nd_pb2.RemoveNumbersRequest(pool_id=pool.pool_id, numbers=numbers)
    )
    assert (removed.removed, removed.not_found) == (1, 0)
