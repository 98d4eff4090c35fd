"""Runs the Routing service: `python -m services.routing` or `accessline serve routing`."""

from __future__ import annotations

from collections.abc import Sequence

from accessline.routing.v1 import routing_pb2, routing_pb2_grpc
from services.routing.servicer import RoutingServicer
from services.routing.settings import RoutingSettings
from services.runtime.server import Registration, RuntimeContext, ServiceSpec, run


async def build(context: RuntimeContext) -> Sequence[Registration]:
    return [
        Registration(
            servicer=RoutingServicer(),  # type: ignore[abstract]  # unserved RPCs answer UNIMPLEMENTED
            add_to_server=routing_pb2_grpc.add_RoutingServiceServicer_to_server,
            descriptor=routing_pb2.DESCRIPTOR.services_by_name["RoutingService"],
        )
    ]


SPEC = ServiceSpec(name="routing", build=build)


def main() -> None:
    run(SPEC, RoutingSettings)


if __name__ == "__main__":
    main()
