"""The rules of access number distribution: pools and their numbers, choosing the pool
nearest the device, reserving a number by compare-and-swap under a lease, access codes,
sharing on exhaustion, extension, release into quarantine and resolution of a dialled
number. Given its store, view and code book in the constructor; no gRPC here."""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from opentelemetry import metrics

from accessline.common.v1 import common_pb2
from accessline.numberdistribution.storage.v1 import storage_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from services.numberdistribution import keys
from services.numberdistribution.codes import (
    DEFAULT_CODE_LENGTH,
    CodeBook,
    clean_digits,
    idempotency_hash,
)
from services.numberdistribution.geo import distance_km, lookup_city
from services.numberdistribution.reservations import EMPTY, read_reservation, release_ops
from services.numberdistribution.view import NumberView, PoolState
from services.runtime.clock import seconds, timestamp
from services.runtime.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from services.runtime.phone import NumberFormatError, normalize_number
from services.runtime.store import Compare, KeyMeta, Op, Store, decode

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


@dataclass(frozen=True)
class ReserveRequest:
    min_quarantine: float
    location: tuple[float, float] | None
    subject: str
    segment: str
    resource_group: str
    ttl: float | None
    want_access_code: bool
    session_id: str
    idempotency_key: str


@dataclass(frozen=True)
class Resolution:
    access_number: str
    pool_id: str
    resource_group: str
    reservations: list[nd_pb2.ResolvedReservation]
    quarantined: bool
    expired_reservations: int


class NumberDistribution:
    """Access number distribution on one etcd, safe to run as several replicas."""

    def __init__(
        self,
        store: Store,
        view: NumberView,
        codes: CodeBook,
        *,
        attempts: int = 16,
        code_memory: float = 3600.0,
        meter: metrics.Meter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._view = view
        self._codes = codes
        self._attempts = attempts
        self._code_memory = code_memory
        self._clock = clock
        self._replica = secrets.token_hex(6)
        self._exhaustion: dict[str, int] = {}
        meter = meter or metrics.get_meter("accessline.numberdistribution")
        self._reservations = meter.create_counter(
            "accessline.numbers.reservations",
            unit="{reservation}",
            description="Reservations made, by pool",
        )
        self._exhausted = meter.create_counter(
            "accessline.numbers.exhaustion",
            unit="{request}",
            description="Reservation requests that found a pool exhausted, by pool",
        )
        meter.create_observable_gauge(
            "accessline.numbers.pool",
            callbacks=[self._observe_pools],
            unit="{number}",
            description="Numbers of each pool by state (free, reserved, quarantined, draining)",
        )

    # -- pools ------------------------------------------------------------------------

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
        revision = await self._store.create(keys.pool(stored.pool_id), stored)
        if revision is None:
            raise AlreadyExists(
                f"pool {stored.pool_id} exists",
                reason="POOL_EXISTS",
                metadata={"pool_id": stored.pool_id},
            )
        await self._view.wait_for(revision)
        return stored

    async def update_pool(self, pool: nd_pb2.Pool) -> nd_pb2.Pool:
        await self._view.ready(READY_TIMEOUT)
        current = await self._store.get(keys.pool(pool.pool_id), nd_pb2.Pool)
        if current is None:
            raise self._pool_not_found(pool.pool_id)
        stored = self._complete_pool(pool)
        result = await self._store.txn(
            [Compare.modified_at(keys.pool(pool.pool_id), current.meta.mod_revision)],
            [Op.put(keys.pool(pool.pool_id), stored)],
        )
        if not result.succeeded:
            raise Aborted(
                "the pool changed while it was being updated; retry", reason="CONCURRENT_UPDATE"
            )
        await self._view.wait_for(result.revision)
        return stored

    @staticmethod
    def _pool_not_found(pool_id: str) -> NotFound:
        return NotFound(
            f"pool {pool_id} does not exist", reason="POOL_NOT_FOUND", metadata={"pool_id": pool_id}
        )

    async def get_pool(self, pool_id: str) -> nd_pb2.Pool:
        entry = await self._store.get(keys.pool(pool_id), nd_pb2.Pool)
        if entry is None:
            raise self._pool_not_found(pool_id)
        return entry.value

    async def list_pools(self, page_size: int, page_token: str) -> tuple[list[nd_pb2.Pool], str]:
        entries, _ = await self._store.get_prefix(
            keys.POOLS,
            nd_pb2.Pool,
            limit=page_size + 1,
            start_after=keys.pool(page_token) if page_token else None,
        )
        pools = [e.value for e in entries[:page_size]]
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
            raise self._pool_not_found(pool_id)
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
            raise self._pool_not_found(pool_id)
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
            raise self._pool_not_found(pool_id)
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
            raise self._pool_not_found(pool_id)
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

    # -- reservations -----------------------------------------------------------------

    def _eligible(self, request: ReserveRequest) -> list[tuple[PoolState, float | None]]:
        chosen: list[tuple[PoolState, float | None]] = []
        for state in self._view.pools.values():
            pool = state.pool
            if pool.subjects and request.subject not in pool.subjects:
                continue
            if pool.segments and request.segment not in pool.segments:
                continue
            if request.resource_group and pool.resource_group != request.resource_group:
                continue
            distance = None
            if request.location is not None and pool.city.HasField("location"):
                loc = pool.city.location
                distance = distance_km(
                    request.location[0], request.location[1], loc.latitude, loc.longitude
                )
            chosen.append((state, distance))

        def order(item: tuple[PoolState, float | None]) -> tuple[float, int, int, str]:
            state, distance = item
            dedicated = 0 if request.subject and request.subject in state.pool.subjects else 1
            return (
                distance if distance is not None else math.inf,
                dedicated,
                state.pool.default_order,
                state.pool.pool_id,
            )

        return sorted(chosen, key=order)

    async def reserve(
        self, request: ReserveRequest
    ) -> tuple[common_pb2.Reservation, str, nd_pb2.SelectionReason]:
        await self._view.ready(READY_TIMEOUT)
        if request.idempotency_key:
            replay = await self._replay(request.idempotency_key)
            if replay is not None:
                return replay
        eligible = self._eligible(request)
        if not eligible:
            raise FailedPrecondition(
                "no pool serves this subject, segment and resource group",
                reason="NO_ELIGIBLE_POOL",
                metadata={"subject": request.subject, "segment": request.segment},
            )
        resting = [(s, d) for s, d in eligible if pool_ttls(s.pool)[2] >= request.min_quarantine]
        if not resting:
            raise FailedPrecondition(
                f"no eligible pool has a quarantine of at least {request.min_quarantine:g} s,"
                " which matching calls by the number alone needs",
                reason="QUARANTINE_TOO_SHORT",
                metadata={"min_quarantine_seconds": f"{request.min_quarantine:g}"},
            )
        fitting = [
            (s, d)
            for s, d in resting
            if request.ttl is None or request.ttl <= pool_ttls(s.pool)[1] + 1e-9
        ]
        if not fitting:
            longest = max(pool_ttls(s.pool)[1] for s, _ in resting)
            raise InvalidArgument(
                [
                    FieldViolation(
                        "ttl",
                        "exceeds the maximum reservation TTL of every eligible pool"
                        f" ({longest:g} s)",
                    )
                ]
            )
        # Leases granted for this request, by TTL, with the time just before each grant;
        # the one a reservation used is kept.
        leases: dict[int, tuple[int, float]] = {}
        used: set[int] = set()
        failed: list[str] = []
        try:
            for position, (state, distance) in enumerate(fitting):
                made = await self._try_pool(
                    state,
                    request,
                    leases,
                    used,
                    share=False,
                    fallback=position > 0,
                    distance=distance,
                )
                if made is not None:
                    return made
                if state.pool.mode != nd_pb2.POOL_MODE_SHARED:
                    failed.append(state.pool.pool_id)
            for position, (state, distance) in enumerate(fitting):
                if state.pool.mode != nd_pb2.POOL_MODE_SHARED:
                    continue
                made = await self._try_pool(
                    state,
                    request,
                    leases,
                    used,
                    share=True,
                    fallback=position > 0,
                    distance=distance,
                )
                if made is not None:
                    return made
                failed.append(state.pool.pool_id)
        finally:
            for lease, _ in leases.values():
                if lease not in used:
                    await self._store.revoke_lease(lease)
            for pool_id in failed:
                await self._count_exhaustion(pool_id)
        waits = [
            w for s, _ in fitting if (w := self._view.soonest_release(s.pool.pool_id)) is not None
        ]
        retry = min(waits) if waits else FALLBACK_RETRY_SECONDS
        raise ResourceExhausted(
            "no access number is free in any eligible pool",
            reason="POOLS_EXHAUSTED",
            metadata={"pools": ",".join(s.pool.pool_id for s, _ in fitting)},
            retry_after=max(retry, 0.1),
        )

    async def _count_exhaustion(self, pool_id: str) -> None:
        self._exhaustion[pool_id] = self._exhaustion.get(pool_id, 0) + 1
        self._exhausted.add(1, {"accessline.pool": pool_id})
        await self._store.put(
            keys.exhaustion(pool_id, self._replica),
            storage_pb2.ExhaustionCount(count=self._exhaustion[pool_id]),
        )

    async def _try_pool(
        self,
        state: PoolState,
        request: ReserveRequest,
        leases: dict[int, tuple[int, float]],
        used: set[int],
        *,
        share: bool,
        fallback: bool,
        distance: float | None,
    ) -> tuple[common_pb2.Reservation, str, nd_pb2.SelectionReason] | None:
        pool = state.pool
        default_ttl, _, quarantine = pool_ttls(pool)
        ttl = request.ttl if request.ttl is not None else default_ttl
        policy = pool.access_code_policy.mode
        shared_pool = pool.mode == nd_pb2.POOL_MODE_SHARED
        wants_code = (
            shared_pool
            or policy == nd_pb2.ACCESS_CODE_MODE_REQUIRED
            or (policy == nd_pb2.ACCESS_CODE_MODE_OPTIONAL and request.want_access_code)
        )
        lease_ttl = max(1, math.ceil(ttl + quarantine))
        idem = idempotency_hash(request.idempotency_key) if request.idempotency_key else ""
        for _ in range(self._attempts):
            value = (state.shareable if share else state.free).choice()
            if value is None:
                return None
            number = self._view.numbers.get(value)
            slot = self._view.free_slot(value, state.max_shares) if share else 0
            if number is None or slot is None:
                self._view.mark_taken(pool.pool_id, value)
                continue
            if lease_ttl not in leases:
                before = self._clock()
                leases[lease_ttl] = (await self._store.grant_lease(lease_ttl), before)
            # Expiry counts from just before the grant, so the lease (and with it the
            # number's rest) never ends before the recorded expiry plus quarantine.
            lease, now = leases[lease_ttl]
            reservation_id = "r" + secrets.token_urlsafe(15)
            code = self._codes.new_code(code_length(pool)) if wants_code else ""
            code_hash = self._codes.hash(value, code) if code else b""
            record = storage_pb2.StoredReservation(
                reservation_id=reservation_id,
                number=value,
                pool_id=pool.pool_id,
                session_id=request.session_id,
                slot=slot,
                lease_id=lease,
                created_at=timestamp(now),
                expires_at=timestamp(now + ttl),
                quarantined_until=timestamp(now + ttl + quarantine),
                code_hash=code_hash,
                shared=share,
                idempotency_hash=idem,
            )
            if code:
                record.code_memory.FromNanoseconds(int(self._code_memory * 1e9))
            reason = nd_pb2.SelectionReason(
                pool_id=pool.pool_id,
                city=pool.city.name,
                distance_km=round(distance, 1) if distance is not None else 0.0,
                fallback=fallback,
                shared=share,
            )
            compares = [
                Compare.modified_at(keys.number(value), number.revision),
                Compare.absent(keys.slot(value, slot)),
                Compare.absent(keys.quarantine_key(value)),
            ]
            ops = [
                Op.put(keys.slot(value, slot), record, lease),
                Op.put(
                    keys.reservation(reservation_id),
                    storage_pb2.ReservationLocator(number=value, slot=slot),
                    lease,
                ),
            ]
            failure: list[Op] = []
            if idem:
                compares.append(Compare.absent(keys.idempotency(idem)))
                sealed = self._codes.seal(code, reservation_id) if code else b""
                ops.append(
                    Op.put(
                        keys.idempotency(idem),
                        storage_pb2.IdempotencyRecord(
                            reservation_id=reservation_id,
                            sealed_access_code=sealed,
                            selection_reason=reason.SerializeToString(),
                        ),
                        lease,
                    )
                )
                failure.append(Op.get(keys.idempotency(idem)))
            if code:
                # Never the code of an ended reservation a late caller may still key in.
                compares.append(Compare.absent(keys.spent(value, code_hash)))
            if code and shared_pool:
                compares.append(Compare.absent(keys.code(value, code_hash)))
                ops.append(Op.put(keys.code(value, code_hash), EMPTY, lease))
            result = await self._store.txn(compares, ops, failure)
            if result.succeeded:
                used.add(lease)
                # Seen at once by this replica's next request; the watch confirms it.
                self._view.note_reservation(keys.slot(value, slot), record, result.revision)
                self._reservations.add(
                    1, {"accessline.pool": pool.pool_id, "accessline.shared": share}
                )
                return self._public(record), code, reason
            if idem and result.gets and result.gets[0]:
                replay = await self._replay(request.idempotency_key)
                if replay is not None:
                    return replay
            self._view.mark_taken(pool.pool_id, value)
        return None

    @staticmethod
    def _public(record: storage_pb2.StoredReservation) -> common_pb2.Reservation:
        return common_pb2.Reservation(
            reservation_id=record.reservation_id,
            access_number=record.number,
            pool_id=record.pool_id,
            session_id=record.session_id,
            expires_at=record.expires_at,
            shared=record.shared,
            has_access_code=bool(record.code_hash),
        )

    async def _replay(
        self, idempotency_key: str
    ) -> tuple[common_pb2.Reservation, str, nd_pb2.SelectionReason] | None:
        entry = await self._store.get(
            keys.idempotency(idempotency_hash(idempotency_key)), storage_pb2.IdempotencyRecord
        )
        if entry is None:
            return None
        found = await self._find(entry.value.reservation_id)
        if found is None:
            return None
        record = found[0]
        code = (
            self._codes.unseal(entry.value.sealed_access_code, record.reservation_id)
            if entry.value.sealed_access_code
            else ""
        )
        return (
            self._public(record),
            code,
            decode(nd_pb2.SelectionReason, "reason", entry.value.selection_reason),
        )

    async def _find(
        self, reservation_id: str
    ) -> tuple[storage_pb2.StoredReservation, KeyMeta] | None:
        return await read_reservation(self._store, reservation_id)

    def _reservation_not_found(self, reservation_id: str) -> NotFound:
        return NotFound(
            f"reservation {reservation_id} does not exist"
            " (released, or expired and out of quarantine)",
            reason="RESERVATION_NOT_FOUND",
            metadata={"reservation_id": reservation_id},
        )

    async def _live(
        self, reservation_id: str
    ) -> tuple[storage_pb2.StoredReservation, KeyMeta, float]:
        """A reservation that has not expired yet, its key's meta and the time now."""
        await self._view.ready(READY_TIMEOUT)
        found = await self._find(reservation_id)
        if found is None:
            raise self._reservation_not_found(reservation_id)
        record, meta = found
        now = self._clock()
        if seconds(record.expires_at) <= now:
            raise FailedPrecondition(
                f"reservation {reservation_id} already expired; its number rests in quarantine",
                reason="RESERVATION_EXPIRED",
                metadata={"reservation_id": reservation_id},
            )
        return record, meta, now

    async def release(self, reservation_id: str) -> float:
        """Ends a live reservation; returns when the number leaves quarantine."""
        record, meta, now = await self._live(reservation_id)
        compares, ops, until = await release_ops(self._store, record, meta.create_revision, now)
        result = await self._store.txn(compares, ops)
        if not result.succeeded:
            raise self._reservation_not_found(reservation_id)
        # Its keys are gone; ending the lease now keeps etcd's lease table small.
        await self._store.revoke_lease(record.lease_id)
        return until

    async def extend(self, reservation_id: str, ttl: float) -> common_pb2.Reservation:
        record, meta, now = await self._live(reservation_id)
        state = self._view.pools.get(record.pool_id)
        if state is None:
            raise self._pool_not_found(record.pool_id)
        _, maximum, quarantine = pool_ttls(state.pool)
        remaining = seconds(record.created_at) + maximum - now
        if ttl > remaining + 1e-9:
            raise InvalidArgument(
                [
                    FieldViolation(
                        "ttl",
                        f"at most {max(0.0, remaining):.0f} s remain"
                        f" within the pool's maximum of {maximum:g} s",
                    )
                ]
            )
        lease = await self._store.grant_lease(max(1, math.ceil(ttl + quarantine)))
        updated = storage_pb2.StoredReservation()
        updated.CopyFrom(record)
        updated.lease_id = lease
        updated.expires_at.CopyFrom(timestamp(now + ttl))
        updated.quarantined_until.CopyFrom(timestamp(now + ttl + quarantine))
        ops = [
            Op.put(keys.slot(record.number, record.slot), updated, lease),
            Op.put(
                keys.reservation(reservation_id),
                storage_pb2.ReservationLocator(number=record.number, slot=record.slot),
                lease,
            ),
        ]
        if record.code_hash and state.pool.mode == nd_pb2.POOL_MODE_SHARED:
            ops.append(Op.put(keys.code(record.number, record.code_hash), EMPTY, lease))
        if record.idempotency_hash:
            idem = await self._store.get(
                keys.idempotency(record.idempotency_hash), storage_pb2.IdempotencyRecord
            )
            if idem is not None:
                ops.append(Op.put(keys.idempotency(record.idempotency_hash), idem.value, lease))
        result = await self._store.txn(
            [Compare.modified_at(keys.slot(record.number, record.slot), meta.mod_revision)],
            ops,
        )
        if not result.succeeded:
            await self._store.revoke_lease(lease)
            raise Aborted("the reservation changed meanwhile; retry", reason="CONCURRENT_UPDATE")
        await self._store.revoke_lease(record.lease_id)
        return self._public(updated)

    async def resolve(self, dialled: str, region: str, dtmf: str) -> Resolution:
        await self._view.ready(READY_TIMEOUT)
        try:
            value = normalize_number(dialled, region)
        except NumberFormatError as exc:
            raise InvalidArgument([FieldViolation("dialled_number", str(exc))]) from None
        digits = clean_digits(dtmf)
        reads = [
            Op.get(keys.number(value)),
            Op.get_prefix(keys.slots(value)),
            Op.get(keys.quarantine_key(value)),
        ]
        if digits:
            # Whether the digits are the code of an ended reservation of this number.
            reads.append(Op.get(keys.spent(value, self._codes.hash(value, digits))))
        result = await self._store.txn([], reads)
        number_rows, slot_rows, quarantine_rows = result.gets[:3]
        spent = bool(digits) and bool(result.gets[3])
        pool_id = (
            decode(storage_pb2.StoredNumber, value, number_rows[0][1]).pool_id
            if number_rows
            else ""
        )
        state = self._view.pools.get(pool_id)
        now = self._clock()
        resolved: list[nd_pb2.ResolvedReservation] = []
        expired = 0
        for key, raw, _ in slot_rows:
            record = decode(storage_pb2.StoredReservation, key, raw)
            if seconds(record.expires_at) <= now:
                expired += 1
                continue
            if not record.code_hash:
                check = nd_pb2.CODE_CHECK_NO_CODE
            elif not digits:
                check = nd_pb2.CODE_CHECK_MISSING
            elif self._codes.matches(value, digits, record.code_hash):
                check = nd_pb2.CODE_CHECK_MATCH
            elif spent:
                check = nd_pb2.CODE_CHECK_SPENT
            else:
                check = nd_pb2.CODE_CHECK_MISMATCH
            resolved.append(
                nd_pb2.ResolvedReservation(
                    reservation=self._public(record),
                    code_check=check,
                    failed_code_attempts=record.failed_code_attempts,
                )
            )
        return Resolution(
            access_number=value,
            pool_id=pool_id,
            resource_group=state.pool.resource_group if state is not None else "",
            reservations=resolved,
            quarantined=bool(quarantine_rows) or expired > 0,
            expired_reservations=expired,
        )


def _chunks(items: Sequence[str], size: int = BATCH) -> list[list[str]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]
