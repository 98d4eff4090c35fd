"""gRPC methods of NumberDistributionService: validate the request, call the domain, map
the answer. Domain errors become statuses in the runtime's error interceptor."""

from __future__ import annotations

from typing import Any

from accessline.access.v1 import access_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2_grpc as nd_grpc
from accessline_server.numberdistribution import pools
from accessline_server.numberdistribution.codes import MAX_CODE_LENGTH, MIN_CODE_LENGTH
from accessline_server.numberdistribution.pools import Pools
from accessline_server.numberdistribution.reserving import Reservations, ReserveRequest
from accessline_server.runtime import identity
from accessline_server.runtime.errors import PermissionDenied
from accessline_server.runtime.masks import check_mask
from accessline_server.runtime.server import ServicerContext
from accessline_server.runtime.validation import Violations

MAX_NUMBERS_PER_CALL = 10_000
MAX_TAGS = 64
MAX_DAY = 24 * 3600.0


def _check_pool(pool: nd_pb2.Pool, v: Violations) -> None:
    v.id("pool.pool_id", pool.pool_id)
    v.text("pool.display_name", pool.display_name, 128)
    v.text("pool.city.name", pool.city.name, 128)
    v.region("pool.city.country_code", pool.city.country_code)
    if pool.city.HasField("location"):
        v.latitude_longitude(
            "pool.city.location", pool.city.location.latitude, pool.city.location.longitude
        )
    v.items_list("pool.subjects", pool.subjects, MAX_TAGS, 64)
    v.items_list("pool.segments", pool.segments, MAX_TAGS, 64)
    v.id("pool.resource_group", pool.resource_group, required=False)
    if pool.mode not in nd_pb2.PoolMode.values():
        v.add("pool.mode", "unknown mode")
    if pool.access_code_policy.mode not in nd_pb2.AccessCodeMode.values():
        v.add("pool.access_code_policy.mode", "unknown mode")
    length = pool.access_code_policy.length
    if length and not MIN_CODE_LENGTH <= length <= MAX_CODE_LENGTH:
        v.add(
            "pool.access_code_policy.length",
            f"must be {MIN_CODE_LENGTH} to {MAX_CODE_LENGTH} digits",
        )
    if pool.HasField("default_reservation_ttl"):
        v.duration("pool.default_reservation_ttl", pool.default_reservation_ttl, 1, MAX_DAY)
    if pool.HasField("max_reservation_ttl"):
        v.duration("pool.max_reservation_ttl", pool.max_reservation_ttl, 1, MAX_DAY)
    if pool.HasField("quarantine"):
        v.duration("pool.quarantine", pool.quarantine, 0, MAX_DAY)
    if pool.max_shares_per_number and not 2 <= pool.max_shares_per_number <= 100:
        v.add("pool.max_shares_per_number", "must be 2 to 100")
    if pool.default_order < 0:
        v.add("pool.default_order", "must not be negative")
    v.text("pool.etag", pool.etag, 64)


def _check_numbers(request: Any, v: Violations) -> None:
    v.id("pool_id", request.pool_id)
    v.region("default_region", request.default_region)
    if not request.numbers:
        v.add("numbers", "must list at least one number")
    elif len(request.numbers) > MAX_NUMBERS_PER_CALL:
        v.add("numbers", f"must list at most {MAX_NUMBERS_PER_CALL} numbers; split the import")
    else:
        for i, number in enumerate(request.numbers):
            if len(number) > 256:
                v.add(f"numbers[{i}]", "must be at most 256 characters")


class NumberDistributionServicer(nd_grpc.NumberDistributionServiceServicer):
    """The NumberDistributionService contract on top of the domain."""

    def __init__(self, pools: Pools, reservations: Reservations) -> None:
        self._pools = pools
        self._reservations = reservations

    async def CreatePool(
        self, request: nd_pb2.CreatePoolRequest, context: ServicerContext
    ) -> nd_pb2.CreatePoolResponse:
        v = Violations()
        _check_pool(request.pool, v)
        v.raise_if_any()
        return nd_pb2.CreatePoolResponse(pool=await self._pools.create_pool(request.pool))

    async def UpdatePool(
        self, request: nd_pb2.UpdatePoolRequest, context: ServicerContext
    ) -> nd_pb2.UpdatePoolResponse:
        v = Violations()
        _check_pool(request.pool, v)
        paths = list(request.update_mask.paths)
        check_mask(paths, nd_pb2.Pool.DESCRIPTOR, pools.UPDATABLE, v)
        v.raise_if_any()
        return nd_pb2.UpdatePoolResponse(pool=await self._pools.update_pool(request.pool, paths))

    async def GetPool(
        self, request: nd_pb2.GetPoolRequest, context: ServicerContext
    ) -> nd_pb2.GetPoolResponse:
        v = Violations()
        v.id("pool_id", request.pool_id)
        v.raise_if_any()
        return nd_pb2.GetPoolResponse(pool=await self._pools.get_pool(request.pool_id))

    async def ListPools(
        self, request: nd_pb2.ListPoolsRequest, context: ServicerContext
    ) -> nd_pb2.ListPoolsResponse:
        v = Violations()
        size = v.page("page_size", request.page_size, 500, 100)
        v.id("page_token", request.page_token, required=False)
        v.raise_if_any()
        pools, token = await self._pools.list_pools(size, request.page_token)
        return nd_pb2.ListPoolsResponse(pools=pools, next_page_token=token)

    async def DeletePool(
        self, request: nd_pb2.DeletePoolRequest, context: ServicerContext
    ) -> nd_pb2.DeletePoolResponse:
        v = Violations()
        v.id("pool_id", request.pool_id)
        v.raise_if_any()
        await self._pools.delete_pool(request.pool_id, request.force)
        return nd_pb2.DeletePoolResponse()

    async def AddNumbers(
        self, request: nd_pb2.AddNumbersRequest, context: ServicerContext
    ) -> nd_pb2.AddNumbersResponse:
        v = Violations()
        _check_numbers(request, v)
        v.raise_if_any()
        return await self._pools.add_numbers(
            request.pool_id, request.numbers, request.default_region
        )

    async def RemoveNumbers(
        self, request: nd_pb2.RemoveNumbersRequest, context: ServicerContext
    ) -> nd_pb2.RemoveNumbersResponse:
        v = Violations()
        _check_numbers(request, v)
        v.raise_if_any()
        return await self._pools.remove_numbers(
            request.pool_id, request.numbers, request.default_region
        )

    async def DrainNumber(
        self, request: nd_pb2.DrainNumberRequest, context: ServicerContext
    ) -> nd_pb2.DrainNumberResponse:
        v = Violations()
        v.id("pool_id", request.pool_id)
        v.text("number", request.number, 256, required=True)
        v.raise_if_any()
        return await self._pools.drain_number(request.pool_id, request.number, request.draining)

    async def GetPoolStats(
        self, request: nd_pb2.GetPoolStatsRequest, context: ServicerContext
    ) -> nd_pb2.GetPoolStatsResponse:
        v = Violations()
        v.id("pool_id", request.pool_id)
        v.raise_if_any()
        return nd_pb2.GetPoolStatsResponse(stats=await self._pools.pool_stats(request.pool_id))

    async def ReserveNumber(
        self, request: nd_pb2.ReserveNumberRequest, context: ServicerContext
    ) -> nd_pb2.ReserveNumberResponse:
        v = Violations()
        location = None
        if request.HasField("device_location"):
            loc = request.device_location
            v.latitude_longitude("device_location", loc.latitude, loc.longitude)
            location = (loc.latitude, loc.longitude)
        v.text("subject", request.subject, 64)
        v.text("segment", request.segment, 64)
        v.id("resource_group", request.resource_group, required=False)
        ttl = v.duration("ttl", request.ttl, 1, MAX_DAY) if request.HasField("ttl") else None
        min_quarantine = (
            v.duration("min_quarantine", request.min_quarantine, 0, MAX_DAY)
            if request.HasField("min_quarantine")
            else 0.0
        )
        v.id("session_id", request.session_id, required=False)
        v.text("idempotency_key", request.idempotency_key, 128)
        v.raise_if_any()
        reserved = await self._reservations.reserve(
            ReserveRequest(
                min_quarantine=min_quarantine,
                location=location,
                subject=request.subject,
                segment=request.segment,
                resource_group=request.resource_group,
                ttl=ttl,
                want_access_code=request.want_access_code,
                session_id=request.session_id,
                idempotency_key=request.idempotency_key,
            )
        )
        return nd_pb2.ReserveNumberResponse(
            reservation=reserved.reservation,
            access_code=reserved.code,
            reason=reserved.reason,
            stored=reserved.stored,
            fencing_revision=reserved.fencing_revision,
        )

    async def ExtendReservation(
        self, request: nd_pb2.ExtendReservationRequest, context: ServicerContext
    ) -> nd_pb2.ExtendReservationResponse:
        v = Violations()
        v.id("reservation_id", request.reservation_id)
        ttl = v.duration("ttl", request.ttl, 1, MAX_DAY)
        v.raise_if_any()
        return nd_pb2.ExtendReservationResponse(
            reservation=await self._reservations.extend(request.reservation_id, ttl)
        )

    async def ReleaseNumber(
        self, request: nd_pb2.ReleaseNumberRequest, context: ServicerContext
    ) -> nd_pb2.ReleaseNumberResponse:
        v = Violations()
        v.id("reservation_id", request.reservation_id)
        if request.reason not in nd_pb2.ReleaseReason.values():
            v.add("reason", "unknown reason")
        v.raise_if_any()
        until = await self._reservations.release(request.reservation_id)
        response = nd_pb2.ReleaseNumberResponse()
        response.quarantined_until.FromNanoseconds(int(until * 1e9))
        return response

    async def ResolveNumber(
        self, request: nd_pb2.ResolveNumberRequest, context: ServicerContext
    ) -> nd_pb2.ResolveNumberResponse:
        v = Violations()
        v.text("dialled_number", request.dialled_number, 256, required=True)
        v.region("default_region", request.default_region)
        v.dtmf("dtmf_digits", request.dtmf_digits)
        v.raise_if_any()
        caller = identity.current()
        matcher = caller.unchecked or caller.service == access_pb2.SERVICE_CALLMATCHING
        if not matcher and request.dtmf_digits:
            # Anyone else could try codes one after the other here, never counted.
            raise PermissionDenied(
                "only CallMatching compares access codes", reason="CODE_CHECK_NOT_ALLOWED"
            )
        found = await self._reservations.resolver.resolve(
            request.dialled_number, request.default_region, request.dtmf_digits
        )
        reservations = list(found.reservations)
        if not matcher:
            # An operator sees that a number is in use, not whose session holds it.
            for resolved in reservations:
                resolved.reservation.ClearField("reservation_id")
                resolved.reservation.ClearField("session_id")
        return nd_pb2.ResolveNumberResponse(
            access_number=found.access_number,
            pool_id=found.pool_id,
            resource_group=found.resource_group,
            reservations=reservations,
            quarantined=found.quarantined,
            expired_reservations=found.expired_reservations,
        )
