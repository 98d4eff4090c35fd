"""gRPC methods of NumberDistributionService: validate the request, call the domain, map
domain errors.

RPCs not implemented yet answer UNIMPLEMENTED through the generated base class.
"""

from __future__ import annotations

from accessline.numberdistribution.v1 import number_distribution_pb2_grpc


class NumberDistributionServicer(number_distribution_pb2_grpc.NumberDistributionServiceServicer):
    """The NumberDistributionService contract as served by this process."""
