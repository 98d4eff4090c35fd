"""NumberDistribution's published module for the services that end a reservation in a
transaction of their own. CallMatching stores a session fenced by its reservation and,
when the call matches (or the session is cancelled or expires), ends the reservation and
starts the number's quarantine in the same transaction that consumes the session, so a
number is never released twice or kept by a session that is gone. This is the only way
another service touches `nd/` keys; ReleaseNumber does the same for callers of the gRPC
contract.

Storage messages are those of `accessline.numberdistribution.storage.v1`."""

from __future__ import annotations

from google.protobuf import empty_pb2

from accessline.numberdistribution.storage.v1 import storage_pb2
from accessline_server.numberdistribution.keys import (
    code,
    idempotency,
    quarantine_key,
    reservation,
    slot,
    spent,
)
from accessline_server.runtime.store import Compare, KeyMeta, Op, Store

EMPTY = empty_pb2.Empty()


def still_held(reserved: storage_pb2.StoredReservation, fencing_revision: int) -> Compare:
    """The compare that holds while the reservation read (with this fencing token, the
    create revision of its slot) is still the number's."""
    return Compare.created_at(slot(reserved.number, reserved.slot), fencing_revision)


async def read_reservation(
    store: Store, reservation_id: str
) -> tuple[storage_pb2.StoredReservation, KeyMeta] | None:
    """A live or resting reservation by id, with the meta of its slot key (whose create
    revision is the reservation's fencing token), or None."""
    locator = await store.get(reservation(reservation_id), storage_pb2.ReservationLocator)
    if locator is None:
        return None
    entry = await store.get(
        slot(locator.value.number, locator.value.slot), storage_pb2.StoredReservation
    )
    if entry is None or entry.value.reservation_id != reservation_id:
        return None
    return entry.value, entry.meta


async def release_ops(
    store: Store, reserved: storage_pb2.StoredReservation, fencing_revision: int, now: float
) -> tuple[list[Compare], list[Op], float]:
    """Compares and operations that end a reservation and start the number's quarantine
    (the pool's, as it was when the reservation was made), for a transaction of the
    caller, which may add its own (such as consuming a session); and when the quarantine
    ends. The compare is the fencing token: the reservation must still be the one read."""
    quarantine = max(
        0.0,
        (reserved.quarantined_until.ToNanoseconds() - reserved.expires_at.ToNanoseconds()) / 1e9,
    )
    until = now + quarantine
    compares = [still_held(reserved, fencing_revision)]
    ops = [
        Op.delete(slot(reserved.number, reserved.slot)),
        Op.delete(reservation(reserved.reservation_id)),
    ]
    if reserved.idempotency_hash:
        ops.append(Op.delete(idempotency(reserved.idempotency_hash)))
    if reserved.code_hash:
        ops.append(Op.delete(code(reserved.number, reserved.code_hash)))
    if quarantine > 0:
        record = storage_pb2.QuarantineRecord(reservation_id=reserved.reservation_id)
        record.until.FromNanoseconds(int(until * 1e9))
        lease = await store.shared_lease(quarantine)
        ops.append(Op.put(quarantine_key(reserved.number), record, lease))
    memory = reserved.code_memory.ToNanoseconds() / 1e9
    if reserved.code_hash and memory > 0:
        # A late caller keying this code in is told apart from a guesser, and the code is
        # not issued again on this number meanwhile.
        remembered = await store.shared_lease(quarantine + memory, window=60.0)
        ops.append(Op.put(spent(reserved.number, reserved.code_hash), EMPTY, remembered))
    return compares, ops, until
