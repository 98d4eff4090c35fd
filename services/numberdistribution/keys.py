"""NumberDistribution's key layout in etcd and the transaction operations on it that
other code needs (releasing a reservation into quarantine), so no one else spells keys.

    nd/pools/{pool_id}                  Pool
    nd/numbers/{number}                 StoredNumber
    nd/slots/{number}/{slot}            StoredReservation   (reservation's lease)
    nd/reservations/{reservation_id}    ReservationLocator  (reservation's lease)
    nd/idempotency/{sha256(key)}        IdempotencyRecord   (reservation's lease)
    nd/codes/{number}/{code hash hex}   empty               (reservation's lease, shared pools)
    nd/quarantine/{number}              QuarantineRecord    (quarantine lease)
    nd/spent/{number}/{code hash hex}   empty               (code memory lease)
    nd/exhaustion/{pool_id}/{replica}   ExhaustionCount
"""

from __future__ import annotations

from google.protobuf import empty_pb2

from accessline.numberdistribution.storage.v1 import storage_pb2
from services.runtime.store import Compare, KeyMeta, Op, Store

EMPTY = empty_pb2.Empty()

ROOT = "nd/"
POOLS = "nd/pools/"
NUMBERS = "nd/numbers/"
SLOTS = "nd/slots/"
RESERVATIONS = "nd/reservations/"
IDEMPOTENCY = "nd/idempotency/"
CODES = "nd/codes/"
QUARANTINE = "nd/quarantine/"
SPENT = "nd/spent/"
EXHAUSTION = "nd/exhaustion/"


def pool(pool_id: str) -> str:
    return POOLS + pool_id


def number(value: str) -> str:
    return NUMBERS + value


def slots(value: str) -> str:
    return f"{SLOTS}{value}/"


def slot(value: str, index: int) -> str:
    return f"{SLOTS}{value}/{index}"


def reservation(reservation_id: str) -> str:
    return RESERVATIONS + reservation_id


def idempotency(key_hash: str) -> str:
    return IDEMPOTENCY + key_hash


def code(value: str, code_hash: bytes) -> str:
    return f"{CODES}{value}/{code_hash.hex()}"


def spent(value: str, code_hash: bytes) -> str:
    return f"{SPENT}{value}/{code_hash.hex()}"


def quarantine_key(value: str) -> str:
    return QUARANTINE + value


def exhaustion(pool_id: str, replica: str = "") -> str:
    return f"{EXHAUSTION}{pool_id}/{replica}"


def split_slot(key: str) -> tuple[str, int]:
    """(number, slot) of a `nd/slots/{number}/{slot}` key. Numbers may hold '/' (SIP)."""
    rest = key[len(SLOTS) :]
    value, _, index = rest.rpartition("/")
    return value, int(index)


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
    compares = [Compare.created_at(slot(reserved.number, reserved.slot), fencing_revision)]
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
