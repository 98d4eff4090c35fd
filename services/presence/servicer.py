"""gRPC methods of PresenceService: validate the request, call the domain, map domain errors.

RPCs not implemented yet answer UNIMPLEMENTED through the generated base class.
"""

from __future__ import annotations

from accessline.presence.v1 import presence_pb2_grpc


class PresenceServicer(presence_pb2_grpc.PresenceServiceServicer):
    """The PresenceService contract as served by this process."""
