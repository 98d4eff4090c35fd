"""Failure limits of call matching: every failed match attempt (a wrong code, a wrong
caller id, a call to a number with nothing waiting) is counted in buckets, and an attempt
whose buckets are full is answered RATE_LIMITED without its outcome being told.

    cm/failures/caller/{keyed ANI hash hex}   a caller id       (ACCESSLINE_ANI_FAILURE_LIMIT)
    cm/failures/caller/withheld               every withheld id (ACCESSLINE_WITHHELD_FAILURE_LIMIT)
    cm/failures/number/{E.164 number}         the dialled number (ACCESSLINE_NUMBER_FAILURE_LIMIT)

A bucket is a key whose etcd version is its count: a failure is counted by a transaction
that writes every bucket of the attempt only if each was written fewer times than its
limit, so the check and the count are one step and concurrent attempts (on any replica)
cannot overshoot a limit, nor contend while below it. A match commits only under the same
compares. Each count renews the bucket's lease: a bucket ends one window after its last
counted failure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from accessline_server.runtime.store import Compare, Op, Store

ROOT = "cm/failures/"
CALLERS = ROOT + "caller/"
WITHHELD = CALLERS + "withheld"
NUMBERS = ROOT + "number/"


@dataclass(frozen=True)
class Bucket:
    key: str
    limit: int


@dataclass(frozen=True)
class FailureLimits:
    caller: int
    withheld: int
    number: int
    window: float

    def buckets(self, ani_hash: bytes, number: str) -> tuple[Bucket, ...]:
        """The buckets an attempt from this caller id (b"" when withheld) to this number
        counts in."""
        caller = (
            Bucket(CALLERS + ani_hash.hex(), self.caller)
            if ani_hash
            else Bucket(WITHHELD, self.withheld)
        )
        return (caller, Bucket(NUMBERS + number, self.number))


def below(buckets: tuple[Bucket, ...]) -> list[Compare]:
    """Compares that hold while every bucket is below its limit."""
    return [Compare.written_fewer_than(b.key, b.limit) for b in buckets]


async def count_ops(store: Store, buckets: tuple[Bucket, ...], window: float) -> list[Op]:
    """The writes that count one failure in every bucket."""
    lease = await store.shared_lease(window)
    return [Op.put(b.key, b"", lease) for b in buckets]


async def full(store: Store, buckets: tuple[Bucket, ...]) -> bool:
    """Whether any bucket has reached its limit (one consistent read)."""
    result = await store.txn([], [Op.get(b.key) for b in buckets])
    return full_in(buckets, result.gets)


def full_in(buckets: tuple[Bucket, ...], gets: Sequence[Sequence[Any]]) -> bool:
    """Whether any bucket has reached its limit, as a transaction's gets of the
    buckets' keys (in order) found them."""
    return any(
        found and found[0][2].version >= bucket.limit
        for bucket, found in zip(buckets, gets, strict=True)
    )


async def count(store: Store, buckets: tuple[Bucket, ...], window: float) -> bool:
    """Counts one failure in every bucket if all are below their limits; False (nothing
    counted) when one is full."""
    result = await store.txn(below(buckets), await count_ops(store, buckets, window))
    return result.succeeded
