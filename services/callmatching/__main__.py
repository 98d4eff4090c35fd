"""Runs the CallMatching service: `python -m services.callmatching` or `accessline serve
callmatching`."""

from __future__ import annotations

from collections.abc import Sequence

from accessline.callmatching.v1 import call_matching_pb2, call_matching_pb2_grpc
from services.callmatching.servicer import CallMatchingServicer
from services.callmatching.settings import CallMatchingSettings
from services.runtime.server import Registration, RuntimeContext, ServiceSpec, run


async def build(context: RuntimeContext) -> Sequence[Registration]:
    return [
        Registration(
            servicer=CallMatchingServicer(),  # type: ignore[abstract]  # unserved RPCs answer UNIMPLEMENTED
            add_to_server=call_matching_pb2_grpc.add_CallMatchingServiceServicer_to_server,
            descriptor=call_matching_pb2.DESCRIPTOR.services_by_name["CallMatchingService"],
        )
    ]


SPEC = ServiceSpec(name="callmatching", build=build)


def main() -> None:
    run(SPEC, CallMatchingSettings)


if __name__ == "__main__":
    main()
