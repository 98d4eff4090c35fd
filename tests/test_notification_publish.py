"""Publish in-process against a real etcd: a first publish writes the notification, its
outbox and its idempotency record in one transaction when its devices fit in one, in
batches when they do not; a repeat is answered as a duplicate; a repeat of a publish
interrupted half way writes only what is missing."""

from __future__ import annotations

import asyncio
import contextlib

from accessline.notification.storage.v1 import storage_pb2 as nt_store
from accessline.notification.v1 import notification_pb2 as N
from accessline_server.notification.domain import Notifications, Policy
from accessline_server.notification.keys import IDEMPOTENCY, INBOX, NOTIFICATIONS, OUTBOX
from accessline_server.notification.records import BATCH
from accessline_server.runtime.store import Store
from tests.support.waiting import eventually


async def devices(notifications: Notifications, customer: str, count: int) -> set[str]:
    ids = set()
    for i in range(count):
        device = await notifications.register_device(
            N.Device(
                customer_id=customer,
                application_id="bank",
                platform=N.PLATFORM_IN_APP,
                push_token=f"{customer}-{i}",
                locale="fr-FR",
            )
        )
        ids.add(device.device_id)
    return ids


def request(customer: str, key: str) -> N.PublishRequest:
    return N.PublishRequest(
        customer_id=customer,
        event_type=N.EVENT_TYPE_AGENT_AVAILABLE,
        title="An agent is free",
        body="Open the app to call now.",
        idempotency_key=key,
    )


async def outbox(store: Store, notification_id: str) -> set[str]:
    rows, _ = await store.get_prefix(f"{OUTBOX}{notification_id}/", nt_store.Delivery)
    return {row.key.rsplit("/", 1)[1] for row in rows}


async def inboxes(store: Store, notification_id: str, ids: set[str]) -> set[str]:
    found = set()
    for device_id in ids:
        if await store.count_prefix(f"{INBOX}{device_id}/{notification_id}"):
            found.add(device_id)
    return found


async def test_a_publish_reaches_every_device_once_in_one_transaction_or_in_batches(
    store: Store,
) -> None:
    notifications = Notifications(store, Policy(3600, 3, 0.2), b"in-process test secret")
    for customer, count in (("few", 3), ("many", BATCH + 7)):
        ids = await devices(notifications, customer, count)
        first = await notifications.publish(request(customer, f"k-{customer}"), ttl=600)
        assert (first.device_count, first.duplicate) == (count, False)
        assert await outbox(store, first.notification_id) == ids
        assert await inboxes(store, first.notification_id, ids) == ids
        again = await notifications.publish(request(customer, f"k-{customer}"), ttl=600)
        assert (again.notification_id, again.device_count, again.duplicate) == (
            first.notification_id,
            count,
            True,
        )
        assert await outbox(store, first.notification_id) == ids


async def test_the_repeat_of_an_interrupted_publish_writes_only_what_is_missing(
    store: Store,
) -> None:
    notifications = Notifications(store, Policy(3600, 3, 0.2), b"in-process test secret")
    ids = await devices(notifications, "c1", 4)
    first = await notifications.publish(request("c1", "k1"), ttl=600)
    # As if the publisher had died after the notification and two outbox items: the
    # record not complete, two items missing, one of the others already sent.
    [record_row], _ = await store.get_prefix(IDEMPOTENCY, nt_store.PublishRecord)
    record = record_row.value
    record.complete = False
    await store.put(record_row.key, record)
    missing = sorted(ids)[:2]
    for device_id in missing:
        await store.delete(f"{OUTBOX}{first.notification_id}/{device_id}")
    sent_key = f"{OUTBOX}{first.notification_id}/{sorted(ids)[3]}"
    sent = await store.get(sent_key, nt_store.Delivery)
    assert sent is not None
    sent.value.status = N.DELIVERY_STATUS_SENT
    await store.put(sent_key, sent.value)

    repeat = await notifications.publish(request("c1", "k1"), ttl=600)
    assert (repeat.notification_id, repeat.device_count, repeat.duplicate) == (
        first.notification_id,
        4,
        False,
    )
    assert await outbox(store, first.notification_id) == ids
    still_sent = await store.get(sent_key, nt_store.Delivery)
    assert still_sent is not None
    assert still_sent.value.status == N.DELIVERY_STATUS_SENT
    third = await notifications.publish(request("c1", "k1"), ttl=600)
    assert third.duplicate


async def test_a_publish_its_caller_gives_up_on_still_reaches_every_device(
    store: Store,
) -> None:
    """A publish to more devices than one transaction holds, cancelled by its caller at
    any point: once its notification is stored, its whole fan-out is written (it once
    stopped with the caller, the devices of the batches not yet written never told)."""
    notifications = Notifications(store, Policy(3600, 3, 0.2), b"in-process test secret")
    await devices(notifications, "crowd", BATCH * 3 + 7)
    given_up = 0
    for n in range(10):
        publishing = asyncio.ensure_future(notifications.publish(request("crowd", ""), ttl=600))
        # Given up on as soon as its notification is stored, as its batches are written.
        while not publishing.done() and await store.count_prefix(NOTIFICATIONS) <= n:
            pass
        given_up += publishing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publishing
    assert given_up  # else every publish ended before it was seen stored
    stored, _ = await store.get_prefix(NOTIFICATIONS, nt_store.StoredNotification)
    assert len(stored) == 10

    async def whole() -> bool:
        for row in stored:
            notification_id = row.key.removeprefix(NOTIFICATIONS)
            if await outbox(store, notification_id) != set(row.value.device_ids):
                return False
        return True

    await eventually(whole, what="every stored notification's whole fan-out")
