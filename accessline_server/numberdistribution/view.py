"""A watch-synced local view of the pools, their numbers and what holds each number,
so that choosing a free number never scans etcd or the pool: a random pick from a set
of free numbers, confirmed by a compare-and-swap. The view may lag; the transaction is
the authority, and a failed compare just means "try another"."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from google.protobuf.message import Message

from accessline.numberdistribution.storage.v1 import storage_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline_server.numberdistribution import keys
from accessline_server.runtime.errors import AccesslineError, Unavailable
from accessline_server.runtime.store import (
    Entry,
    EventKind,
    RawKV,
    Store,
    WatchCompacted,
    WatchEvent,
)

log = logging.getLogger("accessline.numberdistribution.view")

M = TypeVar("M", bound=Message)

LOAD_PAGE = 5000
DEFAULT_MAX_SHARES = 10


def refused_at(compared: list[list[RawKV]], known: int) -> int:
    """The revision to give `NumberView.mark_taken` for a reservation refused by its
    compares: the latest change among the compared keys as its failure branch read
    them (the change that refused it, under NumberDistribution's keys, which the view's
    watch delivers); the view's revision `known` when none is left. Not the
    transaction's own revision: another service's write, maybe, which the view would
    only pass with NumberDistribution's next change."""
    found = [kv.meta.mod_revision for keys_found in compared for kv in keys_found]
    return max(found, default=known)


class RandomSet:
    """A set with O(1) add, discard and uniform random choice."""

    def __init__(self) -> None:
        self._items: list[str] = []
        self._index: dict[str, int] = {}

    def add(self, item: str) -> None:
        if item not in self._index:
            self._index[item] = len(self._items)
            self._items.append(item)

    def discard(self, item: str) -> None:
        position = self._index.pop(item, None)
        if position is None:
            return
        last = self._items.pop()
        if position < len(self._items):
            self._items[position] = last
            self._index[last] = position

    def choice(self) -> str | None:
        return random.choice(self._items) if self._items else None

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item: object) -> bool:
        return item in self._index


@dataclass
class SlotState:
    reservation_id: str
    expires_at: float
    quarantined_until: float
    shared: bool
    create_revision: int
    record: storage_pb2.StoredReservation


@dataclass
class NumberState:
    number: str
    pool_id: str
    draining: bool
    revision: int


@dataclass
class PoolState:
    pool: nd_pb2.Pool
    free: RandomSet = field(default_factory=RandomSet)
    shareable: RandomSet = field(default_factory=RandomSet)

    @property
    def max_shares(self) -> int:
        if self.pool.mode != nd_pb2.POOL_MODE_SHARED:
            return 1
        return self.pool.max_shares_per_number or DEFAULT_MAX_SHARES


class NumberView:
    """Pools, numbers, reservation slots and quarantines, as etcd last told us."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.pools: dict[str, PoolState] = {}
        self.numbers: dict[str, NumberState] = {}
        self.slots: dict[str, dict[int, SlotState]] = {}
        self.quarantine: dict[str, float] = {}
        self._pool_numbers: dict[str, set[str]] = {}
        # Where each reservation the view knows is: (number, slot).
        self._reservations: dict[str, tuple[str, int]] = {}
        # Numbers left out after a failed compare, with the revision the view must reach
        # before it judges them again (a heap by revision).
        self._recheck: list[tuple[int, str]] = []
        self.revision = 0
        self._changed = asyncio.Condition()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Starts loading and following etcd; does not wait (etcd may be down)."""
        self._task = asyncio.create_task(self._run(), name="number-view")

    async def ready(self, timeout: float) -> None:
        """Waits for the first load, or raises Unavailable after `timeout` seconds."""
        if self._ready.is_set():
            return
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            raise Unavailable(
                "the number view is still loading from etcd", reason="VIEW_LOADING", retry_after=1.0
            ) from None

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait_for(self, revision: int, timeout: float = 10.0) -> None:
        """Waits until the view has applied every change up to `revision`, which must be
        the revision of a change under NumberDistribution's keys (etcd's revisions count
        every service's writes, and the view moves only with its own keys' changes)."""
        try:
            async with self._changed:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.revision >= revision), timeout
                )
        except TimeoutError:
            raise Unavailable(
                "the number view has not caught up with etcd",
                reason="VIEW_BEHIND",
                retry_after=1.0,
            ) from None

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._load()
                self._ready.set()
                backoff = 0.1
                async for event in self._store.watch_prefix(keys.ROOT, self.revision + 1):
                    self._apply(event)
                    if event.revision > self.revision:
                        await self._advance(event.revision)
            except WatchCompacted as exc:
                log.warning(
                    "number view fell behind a compaction; reloading",
                    extra={"fields": {"revision": exc.compact_revision}},
                )
            except AccesslineError as exc:
                log.warning(
                    "number view cannot load from etcd; retrying",
                    extra={"fields": {"error": exc.message}},
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _advance(self, revision: int) -> None:
        async with self._changed:
            self.revision = revision
            while self._recheck and self._recheck[0][0] <= revision:
                self._refresh(heapq.heappop(self._recheck)[1])
            self._changed.notify_all()

    async def _read_all(self, prefix: str, message_type: type[M], revision: int) -> list[Entry[M]]:
        out: list[Entry[M]] = []
        after: str | None = None
        while True:
            page: list[Entry[M]]
            page, _ = await self._store.get_prefix(
                prefix, message_type, limit=LOAD_PAGE, start_after=after, revision=revision
            )
            out += page
            if len(page) < LOAD_PAGE:
                return out
            after = page[-1].key

    async def _load(self) -> None:
        revision = await self._store.revision()
        pools = await self._read_all(keys.POOLS, nd_pb2.Pool, revision)
        numbers = await self._read_all(keys.NUMBERS, storage_pb2.StoredNumber, revision)
        slots = await self._read_all(keys.SLOTS, storage_pb2.StoredReservation, revision)
        quarantine = await self._read_all(keys.QUARANTINE, storage_pb2.QuarantineRecord, revision)
        self.pools, self.numbers, self.slots, self.quarantine = {}, {}, {}, {}
        self._pool_numbers = {}
        self._reservations = {}
        self._recheck = []
        for pool in pools:
            self.pools[pool.value.pool_id] = PoolState(pool.value)
        for number in numbers:
            self._put_number(number.value, number.meta.mod_revision, refresh=False)
        for held in slots:
            self._put_slot(held.key, held.value, held.meta.create_revision, refresh=False)
        for rest in quarantine:
            self.quarantine[rest.key[len(keys.QUARANTINE) :]] = (
                rest.value.until.ToNanoseconds() / 1e9
            )
        for state in self.pools.values():
            self._refresh_pool(state)
        await self._advance(revision)
        log.info(
            "number view loaded",
            extra={
                "fields": {
                    "pools": len(self.pools),
                    "numbers": len(self.numbers),
                    "revision": revision,
                }
            },
        )

    # -- applying changes -------------------------------------------------------------

    def _apply(self, event: WatchEvent) -> None:
        key = event.key
        deleted = event.kind == EventKind.DELETE
        if key.startswith(keys.POOLS):
            pool_id = key[len(keys.POOLS) :]
            if deleted:
                self.pools.pop(pool_id, None)
            else:
                state = self.pools.get(pool_id)
                pool = event.decode(nd_pb2.Pool)
                if state is None:
                    state = PoolState(pool)
                    self.pools[pool_id] = state
                state.pool = pool
                self._refresh_pool(state)
        elif key.startswith(keys.NUMBERS):
            value = key[len(keys.NUMBERS) :]
            if deleted:
                self._drop_number(value)
            else:
                self._put_number(event.decode(storage_pb2.StoredNumber), event.meta.mod_revision)
        elif key.startswith(keys.SLOTS):
            if deleted:
                value, index = keys.split_slot(key)
                held = self.slots.get(value, {})
                gone = held.pop(index, None)
                if gone is not None:
                    self._reservations.pop(gone.reservation_id, None)
                if not held:
                    self.slots.pop(value, None)
                self._refresh(value)
            else:
                self._put_slot(
                    key, event.decode(storage_pb2.StoredReservation), event.meta.create_revision
                )
        elif key.startswith(keys.QUARANTINE):
            value = key[len(keys.QUARANTINE) :]
            if deleted:
                self.quarantine.pop(value, None)
            else:
                until = event.decode(storage_pb2.QuarantineRecord).until.ToNanoseconds() / 1e9
                self.quarantine[value] = until
            self._refresh(value)

    def _put_number(
        self, record: storage_pb2.StoredNumber, revision: int, refresh: bool = True
    ) -> None:
        previous = self.numbers.get(record.number)
        if previous is not None and previous.pool_id != record.pool_id:
            self._drop_number(record.number)
        self.numbers[record.number] = NumberState(
            record.number, record.pool_id, record.draining, revision
        )
        self._pool_numbers.setdefault(record.pool_id, set()).add(record.number)
        if refresh:
            self._refresh(record.number)

    def _drop_number(self, value: str) -> None:
        state = self.numbers.pop(value, None)
        if state is None:
            return
        self._pool_numbers.get(state.pool_id, set()).discard(value)
        pool = self.pools.get(state.pool_id)
        if pool is not None:
            pool.free.discard(value)
            pool.shareable.discard(value)

    def _put_slot(
        self,
        key: str,
        record: storage_pb2.StoredReservation,
        create_revision: int,
        refresh: bool = True,
    ) -> None:
        value, index = keys.split_slot(key)
        held = self.slots.setdefault(value, {})
        before = held.get(index)
        if before is not None and before.reservation_id != record.reservation_id:
            self._reservations.pop(before.reservation_id, None)
        held[index] = SlotState(
            record.reservation_id,
            record.expires_at.ToNanoseconds() / 1e9,
            record.quarantined_until.ToNanoseconds() / 1e9,
            record.shared,
            create_revision,
            record,
        )
        self._reservations[record.reservation_id] = (value, index)
        if refresh:
            self._refresh(value)

    def _refresh_pool(self, state: PoolState) -> None:
        state.free = RandomSet()
        state.shareable = RandomSet()
        for value in self._pool_numbers.get(state.pool.pool_id, ()):
            self._refresh(value)

    def _refresh(self, value: str) -> None:
        number = self.numbers.get(value)
        if number is None:
            return
        pool = self.pools.get(number.pool_id)
        if pool is None:
            return
        held = len(self.slots.get(value, ()))
        usable = not number.draining and value not in self.quarantine
        if usable and held == 0:
            pool.free.add(value)
        else:
            pool.free.discard(value)
        if usable and 0 < held < pool.max_shares:
            pool.shareable.add(value)
        else:
            pool.shareable.discard(value)

    def note_reservation(
        self, key: str, record: storage_pb2.StoredReservation, revision: int
    ) -> None:
        """Applies a reservation this replica just made, unless the watch already went
        past its revision (then the view knows better, maybe that it is gone again)."""
        if revision > self.revision:
            self._put_slot(key, record, revision)

    def mark_taken(self, pool_id: str, value: str, revision: int) -> None:
        """A compare on this number failed on a change made at `revision`: stop offering
        it until the view has applied every change up to `revision`, then judge it again
        by what the view knows. Not "until the number changes": the view may have
        applied the change that made the compare fail (another replica's reservation,
        and its release) before the failure is reported, or the compare may have failed
        on something that is no change of the number (a code a late caller may still
        key in), and then no later change of the number would ever bring it back.
        `revision` must be that of a change under NumberDistribution's keys, not the
        store's revision at the failure (another service's write, maybe): the view
        would not reach that one until NumberDistribution's keys changed again."""
        pool = self.pools.get(pool_id)
        if pool is None:
            return
        pool.free.discard(value)
        pool.shareable.discard(value)
        if revision <= self.revision:
            self._refresh(value)
        else:
            heapq.heappush(self._recheck, (revision, value))

    # -- queries ----------------------------------------------------------------------

    def pool_numbers(self, pool_id: str) -> Iterator[NumberState]:
        for value in self._pool_numbers.get(pool_id, ()):
            state = self.numbers.get(value)
            if state is not None:
                yield state

    def reservation(self, reservation_id: str) -> SlotState | None:
        """The reservation as the view last saw it (its record and fencing token), or
        None when the view does not know it (gone, or not seen yet)."""
        where = self._reservations.get(reservation_id)
        if where is None:
            return None
        return self.slots.get(where[0], {}).get(where[1])

    def free_slot(self, value: str, max_shares: int) -> int | None:
        held = self.slots.get(value, {})
        return next((i for i in range(max_shares) if i not in held), None)

    def live_slots(self, value: str, now: float | None = None) -> list[SlotState]:
        now = time.time() if now is None else now
        return [s for s in self.slots.get(value, {}).values() if s.expires_at > now]

    def soonest_release(self, pool_id: str, now: float | None = None) -> float | None:
        """Seconds until some number of the pool can be reserved again, if known."""
        now = time.time() if now is None else now
        soonest: float | None = None
        for number in self.pool_numbers(pool_id):
            times = [s.quarantined_until for s in self.slots.get(number.number, {}).values()]
            if number.number in self.quarantine:
                times.append(self.quarantine[number.number])
            for t in times:
                if t > now and (soonest is None or t < soonest):
                    soonest = t
        return None if soonest is None else soonest - now
