"""Runs the Notification service: `python -m services.notification` or `accessline serve
notification`."""

from __future__ import annotations

from collections.abc import Sequence

from accessline.notification.v1 import notification_pb2, notification_pb2_grpc
from services.notification.servicer import NotificationServicer
from services.notification.settings import NotificationSettings
from services.runtime.server import Registration, RuntimeContext, ServiceSpec, run


async def build(context: RuntimeContext) -> Sequence[Registration]:
    return [
        Registration(
            servicer=NotificationServicer(),  # type: ignore[abstract]  # unserved RPCs answer UNIMPLEMENTED
            add_to_server=notification_pb2_grpc.add_NotificationServiceServicer_to_server,
            descriptor=notification_pb2.DESCRIPTOR.services_by_name["NotificationService"],
        )
    ]


SPEC = ServiceSpec(name="notification", build=build)


def main() -> None:
    run(SPEC, NotificationSettings)


if __name__ == "__main__":
    main()
