"""CallMatching's domain classes in-process against a real etcd (NumberDistribution's
in-process too, no gRPC): the rules that need only the store."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline_server.callmatching.applications import Applications
from accessline_server.callmatching.crypto import SessionCrypto
from accessline_server.callmatching.failures import FailureLimits
from accessline_server.callmatching.handoffs import Handoffs
from accessline_server.callmatching.sessions import Limits, Sessions
from accessline_server.numberdistribution.codes import CodeBook
from accessline_server.numberdistribution.pools import Pools
from accessline_server.numberdistribution.reserving import Reservations
from accessline_server.numberdistribution.view import NumberView
from accessline_server.runtime.errors import Aborted
from accessline_server.runtime.store import Store
from tests.support.numbers import request


@pytest.fixture
async def numbers(store: Store) -> AsyncIterator[Reservations]:
    """NumberDistribution's reservations on the test's prefix, with one pool of one
    number."""
    view = NumberView(store)
    await view.start()
    await Pools(store, view).create_pool(nd_pb2.Pool(pool_id="lyon"))
    await Pools(store, view).add_numbers("lyon", ["+33472000001"], "FR")
    await view.wait_for(await store.revision())
    yield Reservations(store, view, CodeBook(b"in-process test secret"))
    await view.stop()


def handoffs(store: Store) -> Handoffs:
    limits = Limits(
        session_retention=60.0,
        failures=FailureLimits(caller=5, withheld=5, number=5, window=60.0),
        default_region="FR",
    )
    return Handoffs(
        store,
        None,  # type: ignore[arg-type]  # no NumberDistribution peer: _held only
        SessionCrypto(b"in-process test secret"),
        limits,
        Applications(store),
        Sessions(store, limits),
    )


async def test_an_answer_without_the_stored_reservation_is_read_back_from_etcd(
    store: Store, numbers: Reservations
) -> None:
    """A NumberDistribution of an earlier version (a rolling upgrade) answers without
    the stored reservation: CallMatching reads it back, with the same fencing token."""
    made = await numbers.reserve(request("s1"))
    older = nd_pb2.ReserveNumberResponse(reservation=made.reservation)
    record, fence = await handoffs(store)._held(older)
    assert (record, fence) == (made.stored, made.fencing_revision)
    current = nd_pb2.ReserveNumberResponse(
        reservation=made.reservation, stored=made.stored, fencing_revision=made.fencing_revision
    )
    assert await handoffs(store)._held(current) == (made.stored, made.fencing_revision)


async def test_a_reservation_gone_before_its_session_is_stored_aborts_the_handoff(
    store: Store, numbers: Reservations
) -> None:
    made = await numbers.reserve(request("s1"))
    await numbers.release(made.reservation.reservation_id)
    with pytest.raises(Aborted) as aborted:
        await handoffs(store)._held(nd_pb2.ReserveNumberResponse(reservation=made.reservation))
    assert aborted.value.reason == "RESERVATION_GONE"
