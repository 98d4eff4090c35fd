"""gRPC methods of RoutingService: validate the request, call the domain, map the answer.
Domain errors become statuses in the runtime's error interceptor. RPCs of the queue,
callbacks and notify-when-available answer UNIMPLEMENTED through the generated base."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline.routing.v1 import routing_pb2_grpc as rt_grpc
from services.routing.domain import Router
from services.runtime.validation import Violations

Context = Any


class RoutingServicer(rt_grpc.RoutingServiceServicer):
    """The RoutingService contract on top of the domain."""

    def __init__(self, router: Router) -> None:
        self._router = router

    async def RouteInboundCall(
        self, request: rt_pb2.RouteInboundCallRequest, context: Context
    ) -> AsyncIterator[rt_pb2.RouteInboundCallResponse]:
        v = Violations()
        v.id("call_id", request.call_id, long=True)
        v.text("dnis", request.dnis, 256, required=True)
        v.text("ani", request.ani, 256)
        v.dtmf("dtmf_digits", request.dtmf_digits)
        v.raise_if_any()
        async for event in self._router.route(request):
            yield event
