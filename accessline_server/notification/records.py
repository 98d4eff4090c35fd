"""A published notification as Notification keeps it until it expires, and its outbox."""

from __future__ import annotations

from google.protobuf import empty_pb2

from accessline.notification.storage.v1 import storage_pb2 as nt_store
from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline_server.notification.keys import INBOX, OUTBOX
from accessline_server.runtime import identity
from accessline_server.runtime.clock import timestamp
from accessline_server.runtime.store import Compare, Op, Store

EMPTY = empty_pb2.Empty()


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


def outbox_ops(
    notification_id: str, devices: list[nt_pb2.Device], lease: int, now: float
) -> list[Op]:
    """The outbox item of each device (and its in-app inbox entry), queued now."""
    ops = []
    for device in devices:
        delivery = nt_store.Delivery(
            notification_id=notification_id,
            device_id=device.device_id,
            status=nt_pb2.DELIVERY_STATUS_QUEUED,
            next_attempt_at=timestamp(now),
            updated_at=timestamp(now),
        )
        ops.append(Op.put(f"{OUTBOX}{notification_id}/{device.device_id}", delivery, lease))
        if device.platform == nt_pb2.PLATFORM_IN_APP:
            ops.append(Op.put(f"{INBOX}{device.device_id}/{notification_id}", EMPTY, lease))
    return ops


# Outbox items per transaction (two or three operations each).
BATCH = 60


async def stored_then_fanned_out(
    store: Store,
    txn: tuple[list[Compare], list[Op]],
    notification_id: str,
    rest: list[nt_pb2.Device],
    lease: int,
    now: float,
) -> bool:
    """Notification `notification_id` stored by `txn`, then its outbox for the devices of
    `rest` in batches; False when a compare failed (nothing written)."""
    if not (await store.txn(*txn)).succeeded:
        return False
    if rest:
        await fan_out(store, notification_id, rest, lease, now)
    return True


async def fan_out(
    store: Store, notification_id: str, devices: list[nt_pb2.Device], lease: int, now: float
) -> None:
    """Writes the outbox item of every device that has none yet (and the in-app inbox
    entry), a batch per transaction: the repeat of a publish interrupted half way writes
    only what is missing."""
    written, _ = await store.get_prefix(f"{OUTBOX}{notification_id}/", nt_store.Delivery)
    done = {row.key.rsplit("/", 1)[1] for row in written}
    missing = [d for d in devices if d.device_id not in done]
    for start in range(0, len(missing), BATCH):
        batch = missing[start : start + BATCH]
        await store.txn([], outbox_ops(notification_id, batch, lease, now))
