"""A published notification as Notification keeps it until it expires."""

from __future__ import annotations

from accessline.notification.storage.v1 import storage_pb2 as nt_store
from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline_server.runtime import identity
from accessline_server.runtime.clock import timestamp


def stored_notification(
    request: nt_pb2.PublishRequest,
    notification_id: str,
    now: float,
    ttl: float,
    link_url: str,
    devices: list[nt_pb2.Device],
) -> nt_store.StoredNotification:
    """The notification as kept until it expires, with the devices it goes to."""
    return nt_store.StoredNotification(
        notification=nt_pb2.Notification(
            notification_id=notification_id,
            event_type=request.event_type,
            title=request.title,
            body=request.body,
            data=request.data,
            published_at=timestamp(now),
            link_url=link_url,
        ),
        expires_at=timestamp(now + ttl),
        priority=request.priority,
        collapse_key=request.collapse_key,
        device_ids=[d.device_id for d in devices],
        publisher=identity.current().subject,
    )
