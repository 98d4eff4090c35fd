"""Runs the Routing service: `python -m services.routing` or `accessline serve routing`."""

from __future__ import annotations

from collections.abc import Sequence

from accessline.callmatching.v1 import call_matching_pb2_grpc
from accessline.presence.v1 import presence_pb2_grpc
from accessline.routing.v1 import routing_pb2, routing_pb2_grpc
from services.routing.domain import Router, Rules
from services.routing.servicer import RoutingServicer
from services.routing.settings import RoutingSettings
from services.runtime.peers import PeerStub
from services.runtime.server import Registration, RuntimeContext, ServiceSpec, run


async def build(context: RuntimeContext) -> Sequence[Registration]:
    settings = context.settings
    assert isinstance(settings, RoutingSettings)
    timeout = settings.etcd_timeout_seconds * 2
    matching = PeerStub(
        call_matching_pb2_grpc.CallMatchingServiceStub(
            context.channel(settings.callmatching_address)
        ),
        "callmatching",
        timeout,
    )
    presence = PeerStub(
        presence_pb2_grpc.PresenceServiceStub(context.channel(settings.presence_address)),
        "presence",
        timeout,
    )
    router = Router(
        context.store,
        matching,
        presence,
        Rules(
            offer_timeout=settings.routing_offer_timeout_seconds,
            default_group=settings.routing_default_group,
            skill_weight=settings.routing_skill_weight,
            language_weight=settings.routing_language_weight,
        ),
        meter=context.telemetry.meter("accessline.routing"),
    )
    return [
        Registration(
            servicer=RoutingServicer(router),  # type: ignore[abstract]  # queue and callback RPCs answer UNIMPLEMENTED
            add_to_server=routing_pb2_grpc.add_RoutingServiceServicer_to_server,
            descriptor=routing_pb2.DESCRIPTOR.services_by_name["RoutingService"],
        )
    ]


SPEC = ServiceSpec(name="routing", build=build)


def main() -> None:
    run(SPEC, RoutingSettings)


if __name__ == "__main__":
    main()
