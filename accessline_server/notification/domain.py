"""The rules of notification: devices and subscriptions, publishing through a durable
outbox in etcd (one item per device, written before anything is sent; delivery.py's
workers on every replica claim items under their lease and deliver them through the
providers with retries), and the in-app stream that replays what a device has not
acknowledged. Ids are hashed (keyed) where a key needs them, so no id is a prefix of
another's keys and no customer id is in a key name; push tokens are sealed (the key
layout is in keys.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from google.protobuf import empty_pb2
from opentelemetry import metrics

from accessline.access.v1 import access_pb2
from accessline.notification.storage.v1 import storage_pb2 as nt_store
from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline_server.notification.keys import (
    DEVICES,
    IDEMPOTENCY,
    INBOX,
    NOTIFICATIONS,
    OUTBOX,
    STREAMS,
    SUBSCRIPTION_IDS,
    Keys,
)
from accessline_server.notification.records import (
    BATCH,
    fan_out,
    outbox_ops,
    stored_notification,
    stored_then_fanned_out,
)
from accessline_server.runtime import identity
from accessline_server.runtime.clock import seconds, timestamp
from accessline_server.runtime.errors import (
    AccesslineError,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from accessline_server.runtime.identity import Caller
from accessline_server.runtime.kept import Kept
from accessline_server.runtime.sealing import Sealer
from accessline_server.runtime.store import Compare, Entry, EventKind, Op, Store, decode
from accessline_server.runtime.streams import until

log = logging.getLogger("accessline.notification")

EMPTY = empty_pb2.Empty()


def owns_device(caller: Caller, device: nt_pb2.Device) -> bool:
    """Whether the caller may act on the device: its app's backend, its own person."""
    if caller.trusted:
        return True
    if caller.has(access_pb2.ROLE_APP_BACKEND) and caller.owns_application(device.application_id):
        return True
    kind = device.WhichOneof("owner")
    if caller.has(access_pb2.ROLE_CUSTOMER) and kind == "customer_id":
        return device.customer_id == caller.subject
    if caller.has(access_pb2.ROLE_AGENT) and kind == "agent_id":
        return device.agent_id == caller.subject
    return False


def _not_yours(what: str) -> PermissionDenied:
    return PermissionDenied(f"{what} is not yours", reason="OUT_OF_SCOPE")


@dataclass
class Policy:
    retention: float
    max_attempts: int
    backoff_base: float
    backoff_cap: float = 300.0
    streams_per_device: int = 2


class Notifications:
    """Devices, subscriptions, publishing and delivery status."""

    def __init__(
        self,
        store: Store,
        policy: Policy,
        secret: bytes,
        meter: metrics.Meter | None = None,
    ) -> None:
        self._store = store
        self._policy = policy
        self._writing = Kept()  # fan-outs, run to their end
        self.keys = Keys(secret)
        self._sealer = Sealer(secret, b"accessline notification push token v1")
        meter = meter or metrics.get_meter("accessline.notification")
        self._published = meter.create_counter(
            "accessline.notifications.published",
            unit="{notification}",
            description="Notifications published",
        )

    # -- devices and subscriptions ----------------------------------------------------

    def _stored(self, device: nt_pb2.Device) -> nt_store.StoredDevice:
        shown = nt_pb2.Device()
        shown.CopyFrom(device)
        shown.push_token = ""
        sealed = self._sealer.seal(device.push_token.encode(), device.device_id)
        return nt_store.StoredDevice(device=shown, sealed_push_token=sealed)

    def opened(self, stored: nt_store.StoredDevice) -> nt_pb2.Device:
        """A stored device with its push token unsealed (never logged, never stored so)."""
        device = nt_pb2.Device()
        device.CopyFrom(stored.device)
        if stored.sealed_push_token:
            device.push_token = self._sealer.unseal(
                stored.sealed_push_token, device.device_id
            ).decode()
        return device

    async def _load(self, device_id: str) -> tuple[nt_pb2.Device, int] | None:
        entry = await self._store.get(DEVICES + device_id, nt_store.StoredDevice)
        if entry is None:
            return None
        return self.opened(entry.value), entry.meta.mod_revision

    async def register_device(self, device: nt_pb2.Device) -> nt_pb2.Device:
        stored = nt_pb2.Device()
        stored.CopyFrom(device)
        stored.device_id = stored.device_id or "d" + secrets.token_urlsafe(12)
        stored.active = True
        previous = await self._load(stored.device_id)
        if previous is not None:
            before = previous[0]
            # A device id keeps its owner: registering it again refreshes its token; it is
            # never taken over by someone else (unregister it first).
            if not owns_device(identity.current(), before) or self.keys.device_owner(
                before
            ) != self.keys.device_owner(stored):
                raise PermissionDenied(
                    f"device {stored.device_id} is registered to someone else",
                    reason="DEVICE_TAKEN",
                )
        await self._store.txn(
            [],
            [
                Op.put(DEVICES + stored.device_id, self._stored(stored)),
                Op.put(self.keys.device_owner(stored) + stored.device_id, EMPTY),
            ],
        )
        shown = nt_pb2.Device()
        shown.CopyFrom(stored)
        return shown

    async def device(self, device_id: str) -> nt_pb2.Device:
        """A device the caller may act on."""
        found = await self._load(device_id)
        if found is None:
            raise NotFound(f"device {device_id} is not registered", reason="DEVICE_NOT_FOUND")
        if not owns_device(identity.current(), found[0]):
            raise _not_yours(f"device {device_id}")
        return found[0]

    async def unregister_device(self, device_id: str) -> None:
        device = await self.device(device_id)
        await self._store.txn(
            [],
            [
                Op.delete(DEVICES + device_id),
                Op.delete(self.keys.device_owner(device) + device_id),
            ],
        )

    async def deactivate(self, device_id: str) -> None:
        entry = await self._store.get(DEVICES + device_id, nt_store.StoredDevice)
        if entry is not None and entry.value.device.active:
            entry.value.device.active = False
            await self._store.txn(
                [Compare.modified_at(DEVICES + device_id, entry.meta.mod_revision)],
                [Op.put(DEVICES + device_id, entry.value)],
            )
            log.info(
                "device deactivated: its push token is no longer registered",
                extra={"fields": {"device_id": device_id}},
            )

    async def subscribe(self, topic: str, customer_id: str, device_id: str) -> str:
        if device_id:
            await self.device(device_id)
        sub = nt_store.StoredSubscription(
            subscription_id="sub" + secrets.token_urlsafe(12),
            topic=topic,
            customer_id=customer_id,
            device_id=device_id,
        )
        await self._store.txn(
            [],
            [
                Op.put(self.keys.topic(topic) + sub.subscription_id, sub),
                Op.put(SUBSCRIPTION_IDS + sub.subscription_id, sub),
            ],
        )
        return sub.subscription_id

    async def unsubscribe(self, subscription_id: str) -> None:
        entry = await self._store.get(
            SUBSCRIPTION_IDS + subscription_id, nt_store.StoredSubscription
        )
        if entry is None:
            raise NotFound(
                f"subscription {subscription_id} does not exist", reason="SUBSCRIPTION_NOT_FOUND"
            )
        sub = entry.value
        caller = identity.current()
        if sub.device_id:
            await self.device(sub.device_id)  # refuses a device that is not the caller's
        elif (
            caller.has(access_pb2.ROLE_CUSTOMER)
            and not caller.trusted
            and sub.customer_id != caller.subject
        ):
            raise _not_yours(f"subscription {subscription_id}")
        await self._store.txn(
            [],
            [
                Op.delete(self.keys.topic(sub.topic) + subscription_id),
                Op.delete(SUBSCRIPTION_IDS + subscription_id),
            ],
        )

    async def _owned(self, kind: str, owner: str) -> list[str]:
        rows, _ = await self._store.get_prefix(self.keys.owner(kind, owner), empty_pb2.Empty)
        return [row.key.rsplit("/", 1)[1] for row in rows]

    async def _targets(
        self, topic: str, customer_id: str, application_id: str = ""
    ) -> list[nt_pb2.Device]:
        """The active devices a publish reaches; an app backend reaches only the devices
        of its own applications; given `application_id`, only that application's."""
        ids: list[str] = []
        if customer_id:
            ids += await self._owned("customer_id", customer_id)
        if topic:
            subs, _ = await self._store.get_prefix(
                self.keys.topic(topic), nt_store.StoredSubscription
            )
            for sub in subs:
                if sub.value.device_id:
                    ids.append(sub.value.device_id)
                else:
                    ids += await self._owned("customer_id", sub.value.customer_id)
        caller = identity.current()
        devices = []
        for device_id in dict.fromkeys(ids):
            found = await self._load(device_id)
            if found is None or not found[0].active:
                continue
            if application_id:
                if found[0].application_id == application_id:
                    devices.append(found[0])
            elif caller.trusted or caller.owns_application(found[0].application_id):
                devices.append(found[0])
        return devices

    # -- publishing -------------------------------------------------------------------

    async def publish(
        self,
        request: nt_pb2.PublishRequest,
        ttl: float,
        *,
        link_url: str = "",
        application_id: str = "",
    ) -> nt_pb2.PublishResponse:
        """Stores the notification and its outbox items (one per target device) before
        anything is sent; a repeat with the same idempotency key is answered as a
        duplicate, or finishes the fan-out the first one left half done. With
        `application_id`, only that application's devices are reached. A first publish
        to at most BATCH devices is one read of its key and one transaction."""
        now = time.time()
        notification_id, record_key = "n" + secrets.token_hex(12), ""  # new: nothing to read
        record: nt_store.PublishRecord | None = None
        stored_entry: Entry[nt_store.StoredNotification] | None = None
        if request.idempotency_key:
            digest = hashlib.sha256(request.idempotency_key.encode()).hexdigest()
            record_key, notification_id = IDEMPOTENCY + digest, "n" + digest[:24]
            record, stored_entry = await self._published_before(record_key, notification_id)
            if record is not None and record.complete:
                return nt_pb2.PublishResponse(
                    notification_id=record.notification_id,
                    device_count=record.device_count,
                    duplicate=True,
                )
        if stored_entry is not None:
            # A publish with this key was interrupted: finish its fan-out, nothing more.
            stored = stored_entry.value
            lease = stored_entry.meta.lease
            devices = [
                d for d in [await self.maybe_device(i) for i in stored.device_ids] if d is not None
            ]
            await fan_out(self._store, notification_id, devices, lease, now)
        else:
            devices = await self._targets(request.topic, request.customer_id, application_id)
            # Never revoked one by one: a lease shared with the notifications of the same
            # lifetime published within a minute (kept at most that much longer).
            life = ttl + self._policy.retention
            lease = await self._store.shared_lease(life, window=min(60.0, max(1.0, life / 10)))
            stored = stored_notification(request, notification_id, now, ttl, link_url, devices)
            whole = len(devices) <= BATCH  # the fan-out in the same transaction
            ops = [Op.put(NOTIFICATIONS + notification_id, stored, lease)]
            if whole:
                ops += outbox_ops(notification_id, devices, lease, now)
            compares: list[Compare] = [Compare.absent(NOTIFICATIONS + notification_id)]
            if record_key and record is None:
                counted = nt_store.PublishRecord(
                    notification_id=notification_id, device_count=len(devices), complete=whole
                )
                ops.append(Op.put(record_key, counted, lease))
                compares.append(Compare.absent(record_key))
            # Stored, then fanned out to its end, even if the caller gives up meanwhile.
            rest = [] if whole else devices
            stored_now = stored_then_fanned_out(
                self._store, (compares, ops), notification_id, rest, lease, now
            )
            if not await self._writing.run(stored_now):
                # A concurrent publish with the same key got there first.
                return await self.publish(request, ttl)
            if whole:
                record_key = ""  # complete already
        if record_key:
            await self._store.put(
                record_key,
                nt_store.PublishRecord(
                    notification_id=notification_id, device_count=len(devices), complete=True
                ),
                lease,
            )
        self._published.add(1, {"accessline.event_type": nt_pb2.EventType.Name(request.event_type)})
        return nt_pb2.PublishResponse(notification_id=notification_id, device_count=len(devices))

    async def _published_before(
        self, record_key: str, notification_id: str
    ) -> tuple[nt_store.PublishRecord | None, Entry[nt_store.StoredNotification] | None]:
        """The idempotency record and the notification of an earlier publish with the
        same key, in one read."""
        found = await self._store.txn(
            [], [Op.get(record_key), Op.get(NOTIFICATIONS + notification_id)]
        )
        record = (
            decode(nt_store.PublishRecord, record_key, found.gets[0][0].value)
            if found.gets[0]
            else None
        )
        if not found.gets[1]:
            return record, None
        row = found.gets[1][0]
        stored = decode(nt_store.StoredNotification, row.key, row.value)
        return record, Entry(row.key, stored, row.meta)

    async def maybe_device(self, device_id: str) -> nt_pb2.Device | None:
        found = await self._load(device_id)
        return found[0] if found is not None else None

    async def deliveries(self, notification_id: str) -> list[nt_pb2.DeviceDelivery]:
        found = await self._store.get(NOTIFICATIONS + notification_id, nt_store.StoredNotification)
        if found is None:
            raise NotFound(
                f"notification {notification_id} is unknown or past its retention",
                reason="NOTIFICATION_NOT_FOUND",
            )
        caller = identity.current()
        if not caller.trusted and found.value.publisher != caller.subject:
            raise _not_yours(f"notification {notification_id}")
        expired = seconds(found.value.expires_at) <= time.time()
        rows, _ = await self._store.get_prefix(f"{OUTBOX}{notification_id}/", nt_store.Delivery)
        out = []
        for row in rows:
            d = row.value
            status = d.status
            if expired and status == nt_pb2.DELIVERY_STATUS_QUEUED:
                status = nt_pb2.DELIVERY_STATUS_EXPIRED
            out.append(
                nt_pb2.DeviceDelivery(
                    device_id=d.device_id,
                    status=status,
                    failure_reason=d.failure_reason,
                    attempts=d.attempts,
                    updated_at=d.updated_at,
                )
            )
        return out

    # -- in-app -----------------------------------------------------------------------

    async def stream(
        self, device_id: str, stopping: asyncio.Event
    ) -> AsyncIterator[nt_pb2.StreamNotificationsResponse]:
        device = await self.device(device_id)
        if device.platform != nt_pb2.PLATFORM_IN_APP:
            raise FailedPrecondition(
                f"device {device_id} is not an in-app device", reason="NOT_IN_APP"
            )
        slot = await self._stream_slot(device_id)
        try:
            async for message in self._stream(device_id, stopping):
                yield message
        finally:
            with contextlib.suppress(AccesslineError):
                await self._store.delete(slot)

    async def _stream_slot(self, device_id: str) -> str:
        """One of the device's stream slots, taken with create-if-absent under this
        replica's lease (so a dead replica's streams free theirs): the limit holds over
        all replicas, checked and counted in one step."""
        lease = await self._store.process_lease()
        for slot in range(self._policy.streams_per_device):
            key = f"{STREAMS}{device_id}/{slot}"
            if await self._store.create(key, EMPTY, lease) is not None:
                return key
        raise ResourceExhausted(
            f"device {device_id} already has {self._policy.streams_per_device} streams open",
            reason="TOO_MANY_DEVICE_STREAMS",
            retry_after=5.0,
        )

    async def _stream(
        self, device_id: str, stopping: asyncio.Event
    ) -> AsyncIterator[nt_pb2.StreamNotificationsResponse]:
        rows, revision = await self._store.get_prefix(f"{INBOX}{device_id}/", empty_pb2.Empty)
        for row in rows:
            message = await self._in_app(row.key.rsplit("/", 1)[1], device_id)
            if message is not None:
                yield nt_pb2.StreamNotificationsResponse(notification=message, replayed=True)
        async for event in until(
            self._store.watch_prefix(f"{INBOX}{device_id}/", revision + 1), stopping
        ):
            if event.kind != EventKind.PUT:
                continue
            message = await self._in_app(event.key.rsplit("/", 1)[1], device_id)
            if message is not None:
                yield nt_pb2.StreamNotificationsResponse(notification=message, replayed=False)

    async def _in_app(self, notification_id: str, device_id: str) -> nt_pb2.Notification | None:
        found = await self._store.get(NOTIFICATIONS + notification_id, nt_store.StoredNotification)
        if found is None or seconds(found.value.expires_at) <= time.time():
            return None
        key = f"{OUTBOX}{notification_id}/{device_id}"
        entry = await self._store.get(key, nt_store.Delivery)
        if entry is not None and entry.value.status == nt_pb2.DELIVERY_STATUS_QUEUED:
            entry.value.status = nt_pb2.DELIVERY_STATUS_SENT
            entry.value.attempts += 1
            entry.value.updated_at.CopyFrom(timestamp(time.time()))
            await self._store.txn(
                [Compare.modified_at(key, entry.meta.mod_revision)],
                [Op.put(key, entry.value, entry.meta.lease)],
            )
        return found.value.notification

    async def acknowledge(self, device_id: str, notification_ids: Iterable[str]) -> int:
        await self.device(device_id)  # the caller's own device only
        count = 0
        for notification_id in dict.fromkeys(notification_ids):
            result = await self._store.txn(
                [Compare.exists(f"{INBOX}{device_id}/{notification_id}")],
                [Op.delete(f"{INBOX}{device_id}/{notification_id}")],
            )
            if result.succeeded:
                count += 1
                key = f"{OUTBOX}{notification_id}/{device_id}"
                entry = await self._store.get(key, nt_store.Delivery)
                if entry is not None:
                    entry.value.acknowledged = True
                    await self._store.put(key, entry.value, entry.meta.lease)
        return count
