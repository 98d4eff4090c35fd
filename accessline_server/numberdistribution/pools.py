"""NumberDistribution's pools: their settings (defaults filled in, the city looked up),
numbers added, removed and drained in batches, counts by state. No gRPC here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from opentelemetry import metrics

from accessline.numberdistribution.storage.v1 import storage_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline_server.numberdistribution import keys
from accessline_server.numberdistribution.codes import (
    DEFAULT_CODE_LENGTH,
)
from accessline_server.numberdistribution.geo import lookup_city
from accessline_server.numberdistribution.view import NumberView, PoolState
from accessline_server.runtime.clock import seconds
from accessline_server.runtime.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)
from accessline_server.runtime.masks import (
    check_etag,
    merged,
    put_if_unchanged,
    updatable,
    with_etag,
)
from accessline_server.runtime.phone import NumberFormatError, normalize_number
from accessline_server.runtime.store import Compare, Op, Store

log = logging.getLogger("accessline.numberdistribution")

DEFAULT_TTL = 300.0
DEFAULT_MAX_TTL = 1800.0
DEFAULT_QUARANTINE = 60.0
# etcd allows 128 operations per transaction by default.
BATCH = 128
BATCH_CONCURRENCY = 8
# When nothing at all is known about when a pool frees up.
FALLBACK_RETRY_SECONDS = 5.0
# How long a request waits for the number view's first load before UNAVAILABLE.
READY_TIMEOUT = 5.0


def pool_ttls(pool: nd_pb2.Pool) -> tuple[float, float, float]:
    """(default TTL, maximum TTL, quarantine) of a pool, defaults applied: an unset
    default TTL is 5 minutes, or the maximum when that is shorter."""
    has = pool.HasField
    maximum = seconds(pool.max_reservation_ttl) if has("max_reservation_ttl") else DEFAULT_MAX_TTL
    if has("default_reservation_ttl"):
        default = seconds(pool.default_reservation_ttl)
    else:
        default = min(DEFAULT_TTL, maximum)
    quarantine = seconds(pool.quarantine) if has("quarantine") else DEFAULT_QUARANTINE
    return default, maximum, quarantine


def code_length(pool: nd_pb2.Pool) -> int:
    return pool.access_code_policy.length or DEFAULT_CODE_LENGTH


def _chunks(items: Sequence[str], size: int = BATCH) -> list[list[str]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


# The fields UpdatePool may be asked to change (paths of `update_mask`).
UPDATABLE = updatable(nd_pb2.Pool.DESCRIPTOR, ("pool_id", "etag"))


def pool_not_found(pool_id: str) -> NotFound:
    return NotFound(
        f"pool {pool_id} does not exist", reason="POOL_NOT_FOUND", metadata={"pool_id": pool_id}
    )


def issues_code(pool: nd_pb2.Pool, *, wanted: bool) -> bool:
    """Whether a reservation of the pool gets an access code: always on a shared pool,
    by the pool's policy otherwise (optional: when `wanted`)."""
    policy = pool.access_code_policy.mode
    return (
        pool.mode == nd_pb2.POOL_MODE_SHARED
        or policy == nd_pb2.ACCESS_CODE_MODE_REQUIRED
        or (policy == nd_pb2.ACCESS_CODE_MODE_OPTIONAL and wanted)
    )


def selection_reason(
    pool: nd_pb2.Pool, *, fallback: bool, distance: float | None, shared: bool
) -> nd_pb2.SelectionReason:
    """Why the pool was chosen, as the answer tells it."""
    return nd_pb2.SelectionReason(
        pool_id=pool.pool_id,
        city=pool.city.name,
        distance_km=round(distance, 1) if distance is not None else 0.0,
        fallback=fallback,
        shared=shared,
    )


class Pools:
    """Pools and their numbers on one etcd, safe to run as several replicas: creation and
    updates, numbers added, removed and drained, counts by state from the view."""

    def __init__(
        self,
        store: Store,
        view: NumberView,
        *,
        meter: metrics.Meter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._view = view
        self._clock = clock
        meter = meter or metrics.get_meter("accessline.numberdistribution")
        meter.create_observable_gauge(
            "accessline.numbers.pool",
            callbacks=[self._observe_pools],
            unit="{number}",
            description="Numbers of each pool by state (free, reserved, quarantined, draining)",
        )

    def _complete_pool(self, pool: nd_pb2.Pool) -> nd_pb2.Pool:
        """Defaults filled in and the city's coordinates looked up when only named."""
        out = nd_pb2.Pool()
        out.CopyFrom(pool)
        if out.mode == nd_pb2.POOL_MODE_UNSPECIFIED:
            out.mode = nd_pb2.POOL_MODE_EXCLUSIVE
        if out.access_code_policy.mode == nd_pb2.ACCESS_CODE_MODE_UNSPECIFIED:
            out.access_code_policy.mode = nd_pb2.ACCESS_CODE_MODE_OFF
        if not out.access_code_policy.length:
            out.access_code_policy.length = DEFAULT_CODE_LENGTH
        default, maximum, quarantine = pool_ttls(out)
        out.default_reservation_ttl.FromNanoseconds(int(default * 1e9))
        out.max_reservation_ttl.FromNanoseconds(int(maximum * 1e9))
        out.quarantine.FromNanoseconds(int(quarantine * 1e9))
        if out.mode == nd_pb2.POOL_MODE_SHARED and not out.max_shares_per_number:
            out.max_shares_per_number = 10
        violations: list[FieldViolation] = []
        if default > maximum:
            violations.append(
                FieldViolation(
                    "pool.default_reservation_ttl", "must not exceed max_reservation_ttl"
                )
            )
        if (
            out.mode == nd_pb2.POOL_MODE_SHARED
            and out.access_code_policy.mode != nd_pb2.ACCESS_CODE_MODE_REQUIRED
        ):
            violations.append(
                FieldViolation(
                    "pool.access_code_policy.mode",
                    "a shared pool needs ACCESS_CODE_MODE_REQUIRED:"
                    " codes tell its reservations apart",
                )
            )
        if out.city.name and not out.city.HasField("location"):
            found = lookup_city(out.city.name, out.city.country_code)
            if found is None:
                violations.append(
                    FieldViolation(
                        "pool.city.location",
                        f"city {out.city.name!r} is not in the gazetteer; give its coordinates",
                    )
                )
            else:
                out.city.location.latitude, out.city.location.longitude = found[0], found[1]
                out.city.country_code = out.city.country_code or found[2]
        if violations:
            raise InvalidArgument(violations)
        return out

    async def create_pool(self, pool: nd_pb2.Pool) -> nd_pb2.Pool:
        await self._view.ready(READY_TIMEOUT)
        stored = self._complete_pool(pool)
        stored.ClearField("etag")
        revision = await self._store.create(keys.pool(stored.pool_id), stored)
        if revision is None:
            raise AlreadyExists(
                f"pool {stored.pool_id} exists",
                reason="POOL_EXISTS",
                metadata={"pool_id": stored.pool_id},
            )
        await self._view.wait_for(revision)
        return with_etag(stored, revision)

    async def update_pool(self, pool: nd_pb2.Pool, mask: Sequence[str] = ()) -> nd_pb2.Pool:
        """The pool with the fields of `mask` (all of them when empty or `*`) taken from
        `pool`, if it is still the version of `pool.etag` (when given)."""
        await self._view.ready(READY_TIMEOUT)
        current = await self._store.get(keys.pool(pool.pool_id), nd_pb2.Pool)
        if current is None:
            raise pool_not_found(pool.pool_id)
        check_etag(
            pool.etag, current.meta.mod_revision, f"pool {pool.pool_id}", {"pool_id": pool.pool_id}
        )
        stored = self._complete_pool(merged(current.value, pool, mask))
        revision = await put_if_unchanged(
            self._store, keys.pool(pool.pool_id), current.meta.mod_revision, stored, "the pool"
        )
        await self._view.wait_for(revision)
        return with_etag(stored, revision)

    async def get_pool(self, pool_id: str) -> nd_pb2.Pool:
        entry = await self._store.get(keys.pool(pool_id), nd_pb2.Pool)
        if entry is None:
            raise pool_not_found(pool_id)
        return with_etag(entry.value, entry.meta.mod_revision)

    async def list_pools(self, page_size: int, page_token: str) -> tuple[list[nd_pb2.Pool], str]:
        entries, _ = await self._store.get_prefix(
            keys.POOLS,
            nd_pb2.Pool,
            limit=page_size + 1,
            start_after=keys.pool(page_token) if page_token else None,
        )
        pools = [with_etag(e.value, e.meta.mod_revision) for e in entries[:page_size]]
        token = pools[-1].pool_id if len(entries) > page_size else ""
        return pools, token

    async def _live_reservations(self, pool_id: str) -> list[storage_pb2.StoredReservation]:
        """Authoritative: every live reservation of the pool, read from etcd."""
        now = self._clock()
        out: list[storage_pb2.StoredReservation] = []
        after: str | None = None
        while True:
            page, _ = await self._store.get_prefix(
                keys.SLOTS, storage_pb2.StoredReservation, limit=1000, start_after=after
            )
            out += [
                e.value
                for e in page
                if e.value.pool_id == pool_id and seconds(e.value.expires_at) > now
            ]
            if len(page) < 1000:
                return out
            after = page[-1].key

    async def delete_pool(self, pool_id: str, force: bool) -> None:
        await self._view.ready(READY_TIMEOUT)
        current = await self._store.get(keys.pool(pool_id), nd_pb2.Pool)
        if current is None:
            raise pool_not_found(pool_id)
        live = await self._live_reservations(pool_id)
        if live and not force:
            raise FailedPrecondition(
                f"pool {pool_id} has {len(live)} live reservations;"
                " drain its numbers and delete with force",
                reason="POOL_HAS_RESERVATIONS",
                metadata={"pool_id": pool_id, "live_reservations": str(len(live))},
            )
        undrained = sorted(
            {
                r.number
                for r in live
                if not (s := self._view.numbers.get(r.number)) or not s.draining
            }
        )
        if undrained:
            raise FailedPrecondition(
                f"{len(undrained)} numbers with live reservations are not draining"
                f" (first: {undrained[0]})",
                reason="NUMBERS_NOT_DRAINED",
                metadata={"pool_id": pool_id, "not_drained": str(len(undrained))},
            )
        # The pool goes first: replicas stop choosing it as soon as they see the delete.
        result = await self._store.txn(
            [Compare.modified_at(keys.pool(pool_id), current.meta.mod_revision)],
            [Op.delete(keys.pool(pool_id)), Op.delete_prefix(keys.exhaustion(pool_id))],
        )
        if not result.succeeded:
            raise Aborted(
                "the pool changed while it was being deleted; retry", reason="CONCURRENT_UPDATE"
            )
        numbers = [n.number for n in self._view.pool_numbers(pool_id)]
        last = await self._batched(
            [[Op.delete(keys.number(n)) for n in chunk] for chunk in _chunks(numbers)]
        )
        await self._view.wait_for(max(result.revision, last))
        log.info("pool deleted", extra={"fields": {"pool_id": pool_id, "numbers": len(numbers)}})

    async def _batched(self, batches: Sequence[Sequence[Op]]) -> int:
        """Runs unconditional transactions a few at a time; returns the last revision."""
        gate = asyncio.Semaphore(BATCH_CONCURRENCY)
        revisions = [0]

        async def run(ops: Sequence[Op]) -> None:
            async with gate:
                revisions.append((await self._store.txn([], ops)).revision)

        await asyncio.gather(*(run(ops) for ops in batches if ops))
        return max(revisions)

    # -- numbers ----------------------------------------------------------------------

    @staticmethod
    def normalize_all(numbers: Sequence[str], region: str, field: str = "numbers") -> list[str]:
        violations: list[FieldViolation] = []
        out: list[str] = []
        for i, raw in enumerate(numbers):
            try:
                out.append(normalize_number(raw, region))
            except NumberFormatError as exc:
                violations.append(FieldViolation(f"{field}[{i}]", str(exc)))
        if violations:
            raise InvalidArgument(violations[:100])
        return out

    async def add_numbers(
        self, pool_id: str, numbers: Sequence[str], region: str
    ) -> nd_pb2.AddNumbersResponse:
        await self._view.ready(READY_TIMEOUT)
        normalized = list(dict.fromkeys(self.normalize_all(numbers, region)))
        if await self._store.get(keys.pool(pool_id), nd_pb2.Pool) is None:
            raise pool_not_found(pool_id)
        present, conflicting, fresh = 0, [], []
        for value in normalized:
            known = self._view.numbers.get(value)
            if known is None:
                fresh.append(value)
            elif known.pool_id == pool_id:
                present += 1
            else:
                conflicting.append(value)
        added = 0
        revisions = [0]
        gate = asyncio.Semaphore(BATCH_CONCURRENCY)

        async def add_batch(chunk: list[str]) -> None:
            nonlocal added, present
            records = {v: storage_pb2.StoredNumber(number=v, pool_id=pool_id) for v in chunk}
            async with gate:
                result = await self._store.txn(
                    [Compare.absent(keys.number(v)) for v in chunk],
                    [Op.put(keys.number(v), r) for v, r in records.items()],
                )
                if result.succeeded:
                    added += len(chunk)
                    revisions.append(result.revision)
                    return
                # Someone added some of these meanwhile: one at a time, then classify.
                for value, record in records.items():
                    created = await self._store.create(keys.number(value), record)
                    if created is not None:
                        added += 1
                        revisions.append(created)
                        continue
                    existing = await self._store.get(keys.number(value), storage_pb2.StoredNumber)
                    if existing is not None and existing.value.pool_id == pool_id:
                        present += 1
                    else:
                        conflicting.append(value)

        await asyncio.gather(*(add_batch(chunk) for chunk in _chunks(fresh)))
        await self._view.wait_for(max(revisions))
        return nd_pb2.AddNumbersResponse(
            added=added, already_present=present, conflicting=conflicting
        )

    async def remove_numbers(
        self, pool_id: str, numbers: Sequence[str], region: str
    ) -> nd_pb2.RemoveNumbersResponse:
        await self._view.ready(READY_TIMEOUT)
        normalized = list(dict.fromkeys(self.normalize_all(numbers, region)))
        if pool_id not in self._view.pools:
            raise pool_not_found(pool_id)
        targets, not_found, blocked = [], 0, []
        for value in normalized:
            known = self._view.numbers.get(value)
            if known is None or known.pool_id != pool_id:
                not_found += 1
            elif self._view.live_slots(value) and not known.draining:
                blocked.append(value)
            else:
                targets.append(value)
        if blocked:
            raise FailedPrecondition(
                f"{len(blocked)} numbers have live reservations; drain them first"
                f" (first: {blocked[0]})",
                reason="NUMBERS_RESERVED",
                metadata={"pool_id": pool_id, "reserved": str(len(blocked))},
            )
        last = await self._batched(
            [[Op.delete(keys.number(v)) for v in chunk] for chunk in _chunks(targets)]
        )
        await self._view.wait_for(last)
        return nd_pb2.RemoveNumbersResponse(removed=len(targets), not_found=not_found)

    async def drain_number(
        self, pool_id: str, raw: str, draining: bool
    ) -> nd_pb2.DrainNumberResponse:
        await self._view.ready(READY_TIMEOUT)
        try:
            value = normalize_number(raw)
        except NumberFormatError as exc:
            raise InvalidArgument([FieldViolation("number", str(exc))]) from None
        entry = await self._store.get(keys.number(value), storage_pb2.StoredNumber)
        if entry is None or entry.value.pool_id != pool_id:
            raise NotFound(
                f"{value} is not in pool {pool_id}",
                reason="NUMBER_NOT_FOUND",
                metadata={"pool_id": pool_id},
            )
        record = entry.value
        record.draining = draining
        result = await self._store.txn(
            [Compare.modified_at(keys.number(value), entry.meta.mod_revision)],
            [Op.put(keys.number(value), record)],
        )
        if not result.succeeded:
            raise Aborted("the number changed meanwhile; retry", reason="CONCURRENT_UPDATE")
        slots, _ = await self._store.get_prefix(keys.slots(value), storage_pb2.StoredReservation)
        now = self._clock()
        live = sum(1 for s in slots if seconds(s.value.expires_at) > now)
        await self._view.wait_for(result.revision)
        return nd_pb2.DrainNumberResponse(
            number=nd_pb2.AccessNumber(number=value, draining=draining), live_reservations=live
        )

    async def pool_stats(self, pool_id: str) -> nd_pb2.PoolStats:
        await self._view.ready(READY_TIMEOUT)
        state = self._view.pools.get(pool_id)
        if state is None:
            raise pool_not_found(pool_id)
        stats = self._counts(pool_id, state)
        counts, _ = await self._store.get_prefix(
            keys.exhaustion(pool_id), storage_pb2.ExhaustionCount
        )
        stats.exhaustion_count = sum(e.value.count for e in counts)
        return stats

    def _counts(self, pool_id: str, state: PoolState) -> nd_pb2.PoolStats:
        """A pool's counts by state, from this replica's view."""
        now = self._clock()
        stats = nd_pb2.PoolStats(pool_id=pool_id, free=len(state.free))
        for number in self._view.pool_numbers(pool_id):
            stats.total += 1
            stats.draining += number.draining
            held = self._view.slots.get(number.number, {}).values()
            live = [s for s in held if s.expires_at > now]
            if live:
                stats.reserved += 1
                stats.shared_reservations += sum(1 for s in live if s.shared)
            elif held or number.number in self._view.quarantine:
                stats.quarantined += 1
        return stats

    def _observe_pools(self, _: object) -> list[metrics.Observation]:
        """Numbers per pool and state; every replica reports the same view, so dashboards
        take the maximum across replicas."""
        out = []
        for pool_id, state in list(self._view.pools.items()):
            stats = self._counts(pool_id, state)
            for name in ("free", "reserved", "quarantined", "draining"):
                out.append(
                    metrics.Observation(
                        getattr(stats, name), {"accessline.pool": pool_id, "state": name}
                    )
                )
        return out
