"""gRPC methods of RoutingService: validate the request, call the domain, map domain errors.

RPCs not implemented yet answer UNIMPLEMENTED through the generated base class.
"""

from __future__ import annotations

from accessline.routing.v1 import routing_pb2_grpc


class RoutingServicer(routing_pb2_grpc.RoutingServiceServicer):
    """The RoutingService contract as served by this process."""
