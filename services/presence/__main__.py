"""Runs the Presence service: `python -m services.presence` or `accessline serve presence`."""

from __future__ import annotations

from collections.abc import Sequence

from accessline.presence.v1 import presence_pb2, presence_pb2_grpc
from services.presence.servicer import PresenceServicer
from services.presence.settings import PresenceSettings
from services.runtime.server import Registration, RuntimeContext, ServiceSpec, run


async def build(context: RuntimeContext) -> Sequence[Registration]:
    return [
        Registration(
            servicer=PresenceServicer(),  # type: ignore[abstract]  # unserved RPCs answer UNIMPLEMENTED
            add_to_server=presence_pb2_grpc.add_PresenceServiceServicer_to_server,
            descriptor=presence_pb2.DESCRIPTOR.services_by_name["PresenceService"],
        )
    ]


SPEC = ServiceSpec(name="presence", build=build)


def main() -> None:
    run(SPEC, PresenceSettings)


if __name__ == "__main__":
    main()
