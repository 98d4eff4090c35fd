"""A service process for runtime tests: the real runtime serving test servicers that
take time (to prove draining), hold streams open (to prove they end on shutdown) and
read etcd (to prove etcd outages surface as UNAVAILABLE), and fail once with UNAVAILABLE
on cue (a pool or session id starting with `flaky`, to prove which calls peers retry).

Run as `python -m tests.support.probe_service`; settings as for any service.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

from accessline.numberdistribution.v1 import (
    number_distribution_pb2 as nd_pb2,
)
from accessline.numberdistribution.v1 import (
    number_distribution_pb2_grpc as nd_grpc,
)
from accessline.presence.v1 import presence_pb2, presence_pb2_grpc
from accessline_server.runtime.errors import Unavailable
from accessline_server.runtime.server import Registration, RuntimeContext, ServiceSpec, run
from accessline_server.runtime.settings import ServiceSettings
from accessline_server.runtime.store import Store

log = logging.getLogger("accessline.probe")

# How long GetPool "works" before answering.
WORK_SECONDS = float(os.environ.get("PROBE_WORK_SECONDS", "1.0"))


class ProbeNumbers(nd_grpc.NumberDistributionServiceServicer):
    def __init__(self, store: Store) -> None:
        self._store = store
        self._seen: set[str] = set()

    def _flaky(self, name: str) -> None:
        """Fails the first call naming `flaky…`, as a replica that is going away would."""
        if name.startswith("flaky") and name not in self._seen:
            self._seen.add(name)
            log.info("refused once", extra={"fields": {"id": name}})
            raise Unavailable("probe: unavailable once", reason="PROBE_FLAKY")

    async def ReserveNumber(
        self, request: nd_pb2.ReserveNumberRequest, context: Any
    ) -> nd_pb2.ReserveNumberResponse:
        self._flaky(request.session_id)
        return nd_pb2.ReserveNumberResponse()

    async def GetPool(self, request: nd_pb2.GetPoolRequest, context: Any) -> nd_pb2.GetPoolResponse:
        self._flaky(request.pool_id)
        log.info("GetPool in flight")
        await asyncio.sleep(WORK_SECONDS)
        log.info("GetPool done")
        return nd_pb2.GetPoolResponse(pool=nd_pb2.Pool(pool_id=request.pool_id))

    async def GetPoolStats(
        self, request: nd_pb2.GetPoolStatsRequest, context: Any
    ) -> nd_pb2.GetPoolStatsResponse:
        count = await self._store.count_prefix(f"pools/{request.pool_id}/")
        return nd_pb2.GetPoolStatsResponse(
            stats=nd_pb2.PoolStats(pool_id=request.pool_id, total=count)
        )


class ProbePresence(presence_pb2_grpc.PresenceServiceServicer):
    def __init__(self, stopping: asyncio.Event) -> None:
        self._stopping = stopping

    async def WatchPresence(
        self, request: presence_pb2.WatchPresenceRequest, context: Any
    ) -> AsyncIterator[presence_pb2.WatchPresenceResponse]:
        yield presence_pb2.WatchPresenceResponse(
            snapshot=presence_pb2.PresenceSnapshot(), resume_token="1"
        )
        log.info("WatchPresence open")
        await self._stopping.wait()
        yield presence_pb2.WatchPresenceResponse(
            change=presence_pb2.AgentPresence(agent_id="last-before-shutdown"), resume_token="2"
        )


async def build(context: RuntimeContext) -> Sequence[Registration]:
    return [
        Registration(
            ProbeNumbers(context.store),
            nd_grpc.add_NumberDistributionServiceServicer_to_server,
            nd_pb2.DESCRIPTOR.services_by_name["NumberDistributionService"],
        ),
        Registration(
            ProbePresence(context.stopping),
            presence_pb2_grpc.add_PresenceServiceServicer_to_server,
            presence_pb2.DESCRIPTOR.services_by_name["PresenceService"],
        ),
    ]


if __name__ == "__main__":
    run(ServiceSpec(name="probe", build=build), ServiceSettings)
