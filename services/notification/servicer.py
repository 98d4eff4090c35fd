"""gRPC methods of NotificationService: validate the request, call the domain, map domain errors.

RPCs not implemented yet answer UNIMPLEMENTED through the generated base class.
"""

from __future__ import annotations

from accessline.notification.v1 import notification_pb2_grpc


class NotificationServicer(notification_pb2_grpc.NotificationServiceServicer):
    """The NotificationService contract as served by this process."""
