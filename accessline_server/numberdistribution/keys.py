"""NumberDistribution's key layout in etcd, private to this service: other services
reach its state through `reservations.py`, the published module.

    nd/pools/{pool_id}                  Pool
    nd/numbers/{number}                 StoredNumber
    nd/slots/{number}/{slot}            StoredReservation   (reservation's lease)
    nd/reservations/{reservation_id}    ReservationLocator  (reservation's lease)
    nd/idempotency/{sha256(key)}        IdempotencyRecord   (reservation's lease)
    nd/codes/{number}/{code hash hex}   empty               (reservation's lease, shared pools)
    nd/quarantine/{number}              QuarantineRecord    (quarantine lease)
    nd/spent/{number}/{code hash hex}   empty               (code memory lease)
    nd/exhaustion/{pool_id}/{replica}   ExhaustionCount
    nd/code-key                         BytesValue          (a check of the codes' hashing key)
"""

from __future__ import annotations

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
CODE_KEY = "nd/code-key"


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
