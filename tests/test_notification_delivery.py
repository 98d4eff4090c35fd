"""Notification's delivery workers in-process against a real etcd and a local push
provider (HTTP/2 over TLS), with the interleavings the process tests can only hope for
made on purpose."""

from __future__ import annotations

import asyncio
from pathlib import Path

from accessline.notification.storage.v1 import storage_pb2 as nt_store
from accessline.notification.v1 import notification_pb2 as N
from accessline_server.notification.delivery import Worker
from accessline_server.notification.domain import Notifications, Policy
from accessline_server.notification.keys import OUTBOX
from accessline_server.notification.providers import Apns
from accessline_server.runtime.embedded_etcd import free_port
from accessline_server.runtime.store import Store
from tests.support.push_servers import PushServers, make_credentials


async def test_a_worker_that_read_a_delivery_before_another_sent_it_does_not_send_it_again(
    store: Store, tmp_path: Path
) -> None:
    """Worker B reads a due delivery; worker A reads it too, claims it, sends it, records
    it sent and drops its claim; B then goes on from its earlier read. B must not send
    it a second time."""
    port = free_port()
    servers = PushServers(make_credentials(tmp_path, port))
    stop = asyncio.Event()
    serving = asyncio.create_task(servers.run(port, stop))
    creds = servers.credentials
    apns = Apns(
        f"https://127.0.0.1:{port}",
        str(creds.apns_key_file),
        "KEY123",
        "TEAM456",
        "com.example.bank",
        str(creds.ca_file),
    )
    policy = Policy(retention=3600, max_attempts=3, backoff_base=0.2)
    notifications = Notifications(store, policy, b"in-process test secret")
    a, b = (Worker(store, notifications, {N.PLATFORM_APNS: apns}, policy) for _ in range(2))
    try:
        for worker in (a, b):
            await worker.take_lease()
        device = await notifications.register_device(
            N.Device(
                customer_id="c1",
                application_id="bank",
                platform=N.PLATFORM_APNS,
                push_token="ok-once-1",
                locale="fr-FR",
            )
        )
        sent = await notifications.publish(
            N.PublishRequest(
                customer_id="c1",
                event_type=N.EVENT_TYPE_AGENT_AVAILABLE,
                title="An agent is free",
                body="Open the app to call now.",
            ),
            ttl=600,
        )
        key = f"{OUTBOX}{sent.notification_id}/{device.device_id}"
        read_by_b = await store.get(key, nt_store.Delivery)
        assert read_by_b is not None
        await a.attempt_as_read(key, read_by_b)
        assert [r.status for r in servers.for_token("ok-once-1")] == [200]
        await b.attempt_as_read(key, read_by_b)
        assert [r.status for r in servers.for_token("ok-once-1")] == [200]
        delivered = await store.get(key, nt_store.Delivery)
        assert delivered is not None
        assert delivered.value.status == N.DELIVERY_STATUS_SENT
        assert delivered.value.attempts == 1
    finally:
        for worker in (a, b):
            await worker.stop()
        await apns.close()
        servers.release.set()
        stop.set()
        await serving
