"""Notification's delivery workers in-process against a real etcd and a local push
provider (HTTP/2 over TLS), with the interleavings the process tests can only hope for
made on purpose: workers racing on the same batches, a claim left behind, a provider
client that fails."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from accessline.notification.storage.v1 import storage_pb2 as nt_store
from accessline.notification.v1 import notification_pb2 as N
from accessline_server.notification.delivery import Provider, Worker
from accessline_server.notification.domain import Notifications, Policy
from accessline_server.notification.keys import CLAIMS, OUTBOX
from accessline_server.notification.providers import Apns, Message, Outcome
from accessline_server.runtime.embedded_etcd import free_port
from accessline_server.runtime.store import Store
from tests.support.push_servers import PushServers, make_credentials
from tests.support.waiting import eventually


@dataclass
class Rig:
    store: Store
    servers: PushServers
    apns: Apns
    notifications: Notifications
    policy: Policy

    def worker(self, apns: Provider | None = None) -> Worker:
        return Worker(
            self.store, self.notifications, {N.PLATFORM_APNS: apns or self.apns}, self.policy
        )

    async def devices(self, tokens: list[str], topic: str = "news") -> list[str]:
        """Registers an APNs device per token, each subscribed to `topic`."""
        ids = []
        for n, token in enumerate(tokens):
            device = await self.notifications.register_device(
                N.Device(
                    customer_id=f"c{n}",
                    application_id="bank",
                    platform=N.PLATFORM_APNS,
                    push_token=token,
                )
            )
            await self.notifications.subscribe(topic, device.customer_id, device.device_id)
            ids.append(device.device_id)
        return ids

    async def publish(self, topic: str = "news") -> str:
        request = N.PublishRequest(
            topic=topic, event_type=N.EVENT_TYPE_GENERIC, title="News", body="Hello"
        )
        return (await self.notifications.publish(request, ttl=600)).notification_id

    async def deliveries(self, notification_id: str) -> list[nt_store.Delivery]:
        rows, _ = await self.store.get_prefix(f"{OUTBOX}{notification_id}/", nt_store.Delivery)
        return [row.value for row in rows]

    async def all_settled(self, notification_id: str, count: int) -> bool:
        found = await self.deliveries(notification_id)
        return len(found) == count and all(d.status != N.DELIVERY_STATUS_QUEUED for d in found)


@pytest.fixture
async def rig(store: Store, tmp_path: Path) -> AsyncIterator[Rig]:
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
    await servers.ready(port)
    try:
        yield Rig(store, servers, apns, notifications, policy)
    finally:
        await apns.close()
        servers.release.set()
        stop.set()
        await serving


async def test_a_worker_that_read_a_delivery_before_another_sent_it_does_not_send_it_again(
    rig: Rig,
) -> None:
    """Worker B reads a due delivery; worker A reads it too, claims it, sends it, records
    it sent and drops its claim; B then goes on from its earlier read. B must not send
    it a second time."""
    a, b = rig.worker(), rig.worker()
    try:
        for worker in (a, b):
            await worker.take_lease()
        (device_id,) = await rig.devices(["ok-once-1"])
        notification_id = await rig.publish()
        key = f"{OUTBOX}{notification_id}/{device_id}"
        read_by_b = await rig.store.get(key, nt_store.Delivery)
        assert read_by_b is not None
        await a.attempt_as_read([read_by_b])
        assert [r.status for r in rig.servers.for_token("ok-once-1")] == [200]
        await b.attempt_as_read([read_by_b])
        assert [r.status for r in rig.servers.for_token("ok-once-1")] == [200]
        delivered = await rig.store.get(key, nt_store.Delivery)
        assert delivered is not None
        assert delivered.value.status == N.DELIVERY_STATUS_SENT
        assert delivered.value.attempts == 1
    finally:
        for worker in (a, b):
            await worker.stop()


async def test_two_workers_racing_over_the_same_batches_send_each_delivery_once(
    rig: Rig,
) -> None:
    """Both workers load the same 70 due deliveries at once and attempt them in batches
    (32 at a time, four batches at once each): every device gets exactly one request and
    every delivery is recorded sent after one attempt."""
    tokens = [f"ok-race-{n:03d}" for n in range(70)]
    await rig.devices(tokens)
    notification_id = await rig.publish()
    workers = [rig.worker(), rig.worker()]
    try:
        await asyncio.gather(*(worker.start() for worker in workers))
        await rig.servers.wait_for_requests(len(tokens))
        await eventually(
            lambda: rig.all_settled(notification_id, len(tokens)), what="every delivery recorded"
        )
        assert {t: len(rig.servers.for_token(t)) for t in tokens} == dict.fromkeys(tokens, 1)
        found = await rig.deliveries(notification_id)
        assert {(d.status, d.attempts) for d in found} == {(N.DELIVERY_STATUS_SENT, 1)}
        claims, _ = await rig.store.get_prefix(CLAIMS, nt_store.Claim)
        assert claims == []
    finally:
        for worker in workers:
            await worker.stop()


async def test_a_claim_its_worker_failed_to_drop_does_not_hold_the_delivery_back(
    rig: Rig,
) -> None:
    """A worker whose attempt could not drop its claim (etcd unreachable at that moment)
    still holds it under its living lease: the worker must take the delivery up again
    rather than take its own claim for another worker's and wait for ever."""
    worker = rig.worker()
    try:
        await worker.take_lease()
        (device_id,) = await rig.devices(["ok-left-1"])
        notification_id = await rig.publish()
        item = f"{notification_id}/{device_id}"
        # The claim as that worker's attempt left it.
        claim = nt_store.Claim(worker_id=worker.worker_id)
        await rig.store.put(CLAIMS + item, claim, worker.lease_id)
        await worker.start()
        await eventually(lambda: rig.all_settled(notification_id, 1), what="the delivery sent")
        assert [r.status for r in rig.servers.for_token("ok-left-1")] == [200]
        assert [d.status for d in await rig.deliveries(notification_id)] == [N.DELIVERY_STATUS_SENT]
    finally:
        await worker.stop()


class FailsOnce:
    """A provider whose client raises on its first request for one token."""

    def __init__(self, inner: Apns, token: str) -> None:
        self.inner, self.token, self.failed = inner, token, False

    async def send(self, message: Message) -> Outcome:
        if message.push_token == self.token and not self.failed:
            self.failed = True
            raise RuntimeError("the client broke")
        return await self.inner.send(message)

    async def close(self) -> None:
        await self.inner.close()


async def test_a_provider_client_fault_is_retried_and_loses_nothing_of_its_batch(
    rig: Rig,
) -> None:
    """Three deliveries attempted in one batch; the provider's client raises on one: the
    other two are recorded sent once, the failed one is retried after the backoff and
    sent on its second attempt."""
    tokens = ["ok-batch-x", "ok-batch-fails", "ok-batch-y"]
    await rig.devices(tokens)
    notification_id = await rig.publish()
    provider = FailsOnce(rig.apns, "ok-batch-fails")
    worker = rig.worker(provider)
    try:
        await worker.start()
        await eventually(
            lambda: rig.all_settled(notification_id, 3), what="every delivery recorded"
        )
        assert provider.failed
        assert {t: len(rig.servers.for_token(t)) for t in tokens} == dict.fromkeys(tokens, 1)
        found = {d.device_id: d for d in await rig.deliveries(notification_id)}
        attempts = sorted((d.status, d.attempts) for d in found.values())
        assert attempts == [
            (N.DELIVERY_STATUS_SENT, 1),
            (N.DELIVERY_STATUS_SENT, 1),
            (N.DELIVERY_STATUS_SENT, 2),
        ]
    finally:
        await worker.stop()


async def test_one_worker_attempting_the_same_deliveries_twice_at_once_sends_each_once(
    rig: Rig,
) -> None:
    """Two batches of one worker holding the same due deliveries (the load and the watch
    both scheduled them): its own claim from the one batch is never taken by the other
    for a claim left behind."""
    tokens = [f"ok-twice-{n:03d}" for n in range(20)]
    await rig.devices(tokens)
    notification_id = await rig.publish()
    worker = rig.worker()
    try:
        await worker.take_lease()
        rows, _ = await rig.store.get_prefix(f"{OUTBOX}{notification_id}/", nt_store.Delivery)
        await asyncio.gather(worker.attempt_as_read(rows), worker.attempt_as_read(rows[::-1]))
        assert {t: len(rig.servers.for_token(t)) for t in tokens} == dict.fromkeys(tokens, 1)
        found = await rig.deliveries(notification_id)
        assert {(d.status, d.attempts) for d in found} == {(N.DELIVERY_STATUS_SENT, 1)}
    finally:
        await worker.stop()
