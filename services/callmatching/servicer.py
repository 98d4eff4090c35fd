"""gRPC methods of CallMatchingService: validate the request, call the domain, map domain errors.

RPCs not implemented yet answer UNIMPLEMENTED through the generated base class.
"""

from __future__ import annotations

from accessline.callmatching.v1 import call_matching_pb2_grpc


class CallMatchingServicer(call_matching_pb2_grpc.CallMatchingServiceServicer):
    """The CallMatchingService contract as served by this process."""
