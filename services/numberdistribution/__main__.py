"""Runs the NumberDistribution service: `python -m services.numberdistribution` or
`accessline serve numberdistribution`."""

from __future__ import annotations

from collections.abc import Sequence

from accessline.numberdistribution.v1 import number_distribution_pb2, number_distribution_pb2_grpc
from services.numberdistribution.servicer import NumberDistributionServicer
from services.numberdistribution.settings import NumberDistributionSettings
from services.runtime.server import Registration, RuntimeContext, ServiceSpec, run


async def build(context: RuntimeContext) -> Sequence[Registration]:
    return [
        Registration(
            servicer=NumberDistributionServicer(),  # type: ignore[abstract]  # unserved RPCs answer UNIMPLEMENTED
            add_to_server=number_distribution_pb2_grpc.add_NumberDistributionServiceServicer_to_server,
            descriptor=number_distribution_pb2.DESCRIPTOR.services_by_name[
                "NumberDistributionService"
            ],
        )
    ]


SPEC = ServiceSpec(name="numberdistribution", build=build)


def main() -> None:
    run(SPEC, NumberDistributionSettings)


if __name__ == "__main__":
    main()
