"""NumberDistribution's reservations: choosing the pool nearest the device, reserving a
number by compare-and-swap under a lease, access codes, sharing on exhaustion, extension
and release into quarantine (resolving a dialled number is resolving.py's). No gRPC
here."""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from opentelemetry import metrics

from accessline.common.v1 import common_pb2
from accessline.numberdistribution.storage.v1 import storage_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline_server.numberdistribution import keys
from accessline_server.numberdistribution.codes import (
    CodeBook,
    idempotency_hash,
)
from accessline_server.numberdistribution.dialled import public_reservation
from accessline_server.numberdistribution.geo import distance_km
from accessline_server.numberdistribution.pools import (
    FALLBACK_RETRY_SECONDS,
    READY_TIMEOUT,
    code_length,
    issues_code,
    pool_not_found,
    pool_ttls,
    selection_reason,
)
from accessline_server.numberdistribution.reservations import EMPTY, read_reservation, release_ops
from accessline_server.numberdistribution.resolving import Resolver
from accessline_server.numberdistribution.view import NumberView, PoolState, refused_at
from accessline_server.runtime.clock import seconds, timestamp
from accessline_server.runtime.errors import (
    Aborted,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from accessline_server.runtime.store import Compare, KeyMeta, Op, Store, decode

log = logging.getLogger("accessline.numberdistribution")

# Reservations asking for the same time within this many seconds share one etcd lease.
LEASE_WINDOW = 1.0


@dataclass(frozen=True)
class Reserved:
    """A reservation made: what the caller sees of it, its code in clear (this once) and
    why this pool, and the stored record with its fencing token (the create revision of
    its slot key) for the caller's own fenced transaction."""

    reservation: common_pb2.Reservation
    code: str
    reason: nd_pb2.SelectionReason
    stored: storage_pb2.StoredReservation
    fencing_revision: int


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


class Reservations:
    """Reservations of access numbers on one etcd, safe to run as several replicas: the
    pool nearest the device, a number by compare-and-swap under a lease, access codes,
    sharing on exhaustion, extension, release into quarantine, resolution."""

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
        # Resolving a dialled number reads what reserving wrote, with the same codes.
        self.resolver = Resolver(store, view, codes, clock)
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

    def _fitting(self, request: ReserveRequest) -> list[tuple[PoolState, float | None]]:
        """The pools a reservation may come from, nearest first: eligible for the
        request, resting numbers at least `min_quarantine`, allowing its TTL. Each
        filter that leaves nothing is its own clear refusal."""
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
        return fitting

    async def reserve(self, request: ReserveRequest) -> Reserved:
        """A number from the nearest fitting pool (exclusive first, then sharing a
        number of a shared pool), with its code and why it was chosen; a repeat of an
        idempotent request gets the first answer; RESOURCE_EXHAUSTED with RetryInfo
        (the soonest release) when every fitting pool is full."""
        await self._view.ready(READY_TIMEOUT)
        if request.idempotency_key:
            replay = await self._replay(request.idempotency_key)
            if replay is not None:
                return replay
        fitting = self._fitting(request)
        failed: list[str] = []
        try:
            for position, (state, distance) in enumerate(fitting):
                made = await self._try_pool(
                    state,
                    request,
                    share=False,
                    fallback=position > 0,
                    distance=distance,
                )
                if made is not None:
                    return made
                if state.pool.mode != nd_pb2.POOL_MODE_SHARED and not state.free:
                    failed.append(state.pool.pool_id)
            for position, (state, distance) in enumerate(fitting):
                if state.pool.mode != nd_pb2.POOL_MODE_SHARED:
                    continue
                made = await self._try_pool(
                    state,
                    request,
                    share=True,
                    fallback=position > 0,
                    distance=distance,
                )
                if made is not None:
                    return made
                if not state.shareable:
                    failed.append(state.pool.pool_id)
        finally:
            # Only pools found with nothing left: a pool whose attempts all lost their
            # races to other replicas still has numbers and is not exhausted.
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

    async def _reservation_lease(self, lasts: float) -> int:
        """A lease that outlives `lasts` seconds from now, shared by the reservations of
        this replica asking for the same time within LEASE_WINDOW seconds: a reservation
        costs no lease grant of its own, and none is revoked when one ends (its keys are
        deleted). Its number may rest up to LEASE_WINDOW + 1 s longer than its quarantine
        before the lease lets it go."""
        return await self._store.shared_lease(lasts, window=LEASE_WINDOW)

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
        *,
        share: bool,
        fallback: bool,
        distance: float | None,
    ) -> Reserved | None:
        """A number of the pool reserved for the request (picked at random from the
        view's free or shareable numbers, confirmed by the transaction's compares), or
        None when every attempt lost its race or the pool has nothing left."""
        pool = state.pool
        default_ttl, _, quarantine = pool_ttls(pool)
        ttl = request.ttl if request.ttl is not None else default_ttl
        shared_pool = pool.mode == nd_pb2.POOL_MODE_SHARED
        wants_code = issues_code(pool, wanted=request.want_access_code)
        idem = idempotency_hash(request.idempotency_key) if request.idempotency_key else ""
        for _ in range(self._attempts):
            value = (state.shareable if share else state.free).choice()
            if value is None:
                return None
            number = self._view.numbers.get(value)
            slot = self._view.free_slot(value, state.max_shares) if share else 0
            if number is None or slot is None:
                # The view's own state says no (the sets lagged it): judged again now.
                self._view.mark_taken(pool.pool_id, value, self._view.revision)
                continue
            # Expiry counts from before the lease is asked for, and the lease outlives
            # that moment by the TTL plus quarantine: it (and with it the number's rest)
            # never ends before the recorded expiry plus quarantine.
            now = self._clock()
            lease = await self._reservation_lease(ttl + quarantine)
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
            reason = selection_reason(pool, fallback=fallback, distance=distance, shared=share)
            compares, ops, failure = self._reservation_txn(
                record, number.revision, code, reason, shared_pool=shared_pool
            )
            result = await self._store.txn(compares, ops, failure)
            if result.succeeded:
                # Seen at once by this replica's next request; the watch confirms it.
                self._view.note_reservation(keys.slot(value, slot), record, result.revision)
                self._reservations.add(
                    1, {"accessline.pool": pool.pool_id, "accessline.shared": share}
                )
                return Reserved(public_reservation(record), code, reason, record, result.revision)
            if idem and result.gets[0]:
                replay = await self._replay(request.idempotency_key)
                if replay is not None:
                    return replay
            compared = result.gets[1:] if idem else result.gets
            self._view.mark_taken(pool.pool_id, value, refused_at(compared, self._view.revision))
        return None

    def _reservation_txn(
        self,
        record: storage_pb2.StoredReservation,
        number_revision: int,
        code: str,
        reason: nd_pb2.SelectionReason,
        *,
        shared_pool: bool,
    ) -> tuple[list[Compare], list[Op], list[Op]]:
        """The transaction that takes the number's slot for `record` (compares, success
        ops, failure ops): only if the number is unchanged since the view read it, the
        slot free, the number out of quarantine, the idempotency key unused, the code
        not one a late caller may still key in, and (shared pools) not another
        reservation's code on the number."""
        value, slot, lease = record.number, record.slot, record.lease_id
        compares = [
            Compare.modified_at(keys.number(value), number_revision),
            Compare.absent(keys.slot(value, slot)),
            Compare.absent(keys.quarantine_key(value)),
        ]
        ops = [
            Op.put(keys.slot(value, slot), record, lease),
            Op.put(
                keys.reservation(record.reservation_id),
                storage_pb2.ReservationLocator(number=value, slot=slot),
                lease,
            ),
        ]
        idem = record.idempotency_hash
        # On failure, what refused it: the idempotency record first (a replay), then
        # each compared key of the number as it is.
        failure = [Op.get(keys.idempotency(idem))] if idem else []
        failure += [Op.get(keys.number(value)), Op.get(keys.slot(value, slot))]
        failure.append(Op.get(keys.quarantine_key(value)))
        if idem:
            compares.append(Compare.absent(keys.idempotency(idem)))
            sealed = self._codes.seal(code, record.reservation_id) if code else b""
            ops.append(
                Op.put(
                    keys.idempotency(idem),
                    storage_pb2.IdempotencyRecord(
                        reservation_id=record.reservation_id,
                        sealed_access_code=sealed,
                        selection_reason=reason.SerializeToString(),
                    ),
                    lease,
                )
            )
        if code:
            compares.append(Compare.absent(keys.spent(value, record.code_hash)))
            failure.append(Op.get(keys.spent(value, record.code_hash)))
        if code and shared_pool:
            compares.append(Compare.absent(keys.code(value, record.code_hash)))
            failure.append(Op.get(keys.code(value, record.code_hash)))
            ops.append(Op.put(keys.code(value, record.code_hash), EMPTY, lease))
        return compares, ops, failure

    async def _replay(self, idempotency_key: str) -> Reserved | None:
        entry = await self._store.get(
            keys.idempotency(idempotency_hash(idempotency_key)), storage_pb2.IdempotencyRecord
        )
        if entry is None:
            return None
        found = await read_reservation(self._store, entry.value.reservation_id)
        if found is None:
            return None
        record, meta = found
        sealed = entry.value.sealed_access_code
        code = self._codes.unseal(sealed, record.reservation_id) if sealed else ""
        return Reserved(
            public_reservation(record),
            code,
            decode(nd_pb2.SelectionReason, "reason", entry.value.selection_reason),
            record,
            meta.create_revision,
        )

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
        found = await read_reservation(self._store, reservation_id)
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
        """Ends a live reservation; returns when the number leaves quarantine. The
        reservation is read from the view when the view knows it alive: the release's
        compare (its fencing token) makes a stale view harmless, as a reservation that
        ended meanwhile fails it. Otherwise (not seen yet, or expired as the view saw
        it) from etcd."""
        await self._view.ready(READY_TIMEOUT)
        now = self._clock()
        seen = self._view.reservation(reservation_id)
        if seen is not None and seen.expires_at > now:
            record, fence = seen.record, seen.create_revision
        else:
            record, meta, now = await self._live(reservation_id)
            fence = meta.create_revision
        compares, ops, until = await release_ops(self._store, record, fence, now)
        result = await self._store.txn(compares, ops)
        if not result.succeeded:
            raise self._reservation_not_found(reservation_id)
        # Its keys are gone. Its lease is shared with the other reservations made with it
        # (never revoked for one of them): it ends by itself.
        return until

    async def extend(self, reservation_id: str, ttl: float) -> common_pb2.Reservation:
        record, meta, now = await self._live(reservation_id)
        state = self._view.pools.get(record.pool_id)
        if state is None:
            raise pool_not_found(record.pool_id)
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
        lease = await self._reservation_lease(ttl + quarantine)
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
            raise Aborted("the reservation changed meanwhile; retry", reason="CONCURRENT_UPDATE")
        return public_reservation(updated)
