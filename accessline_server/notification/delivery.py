"""Delivery of the outbox: every replica runs a worker that claims due items under its
lease and sends them through the providers (FCM, APNs), with retries and
backoff; a token the provider says is gone deactivates its device."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Protocol

from opentelemetry import metrics

from accessline.notification.storage.v1 import storage_pb2 as nt_store
from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline_server.notification.domain import Notifications, Policy
from accessline_server.notification.keys import (
    CLAIMS,
    NOTIFICATIONS,
    OUTBOX,
)
from accessline_server.notification.providers import Message, Outcome
from accessline_server.notification.schedule import DueQueue
from accessline_server.runtime.backoff import delay
from accessline_server.runtime.clock import seconds, timestamp
from accessline_server.runtime.errors import (
    AccesslineError,
)
from accessline_server.runtime.store import (
    Compare,
    Entry,
    EventKind,
    KeptLease,
    Op,
    Store,
)

log = logging.getLogger("accessline.notification")


class Provider(Protocol):
    async def send(self, message: Message) -> Outcome: ...

    async def close(self) -> None: ...


class Worker:
    """Delivers outbox items through the providers. Every replica runs one; an item is
    claimed (create-if-absent under this worker's lease, while the item is as the worker
    read it) before it is sent, so two workers never send it at once nor one after the
    other, and a dead worker's claims vanish with its lease."""

    def __init__(
        self,
        store: Store,
        notifications: Notifications,
        providers: dict[int, Provider],
        policy: Policy,
        *,
        lease_seconds: int = 10,
        concurrency: int = 16,
        meter: metrics.Meter | None = None,
    ) -> None:
        self._store = store
        self._notifications = notifications
        self._providers = providers
        self._policy = policy
        self._lease_seconds = lease_seconds
        self.worker_id = "w" + secrets.token_hex(6)
        self._queue = DueQueue(self._deliver, concurrency)
        self._lease: KeptLease | None = None
        self._runner: asyncio.Task[None] | None = None
        meter = meter or metrics.get_meter("accessline.notification")
        self._attempts = meter.create_counter(
            "accessline.notifications.deliveries",
            unit="{attempt}",
            description="Delivery attempts by platform and result",
        )
        meter.create_observable_gauge(
            "accessline.notifications.outbox.lag",
            callbacks=[lambda _: [metrics.Observation(self.lag(time.time()))]],
            unit="s",
            description="How long the most overdue delivery of this worker has been due"
            " (0 when the worker keeps up)",
        )

    async def start(self) -> None:
        """Starts the worker; it takes its lease once etcd answers (a service started
        before etcd can be reached waits for it instead of exiting)."""
        self._runner = asyncio.create_task(self._run(), name="notification-worker")
        log.info("delivery worker started", extra={"fields": {"worker_id": self.worker_id}})

    async def take_lease(self) -> None:
        """The lease this worker's claims live under (kept alive until `stop`)."""
        lease_id = await self._store.grant_lease(self._lease_seconds)
        self._lease = await self._store.keep_alive(lease_id, self._lease_seconds)

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        await self._queue.stop()
        if self._lease is not None:
            self._store.stop_keep_alive(self._lease)
            with contextlib.suppress(AccesslineError):
                await self._store.revoke_lease(self._lease.id)

    def lag(self, now: float) -> float:
        """Seconds the most overdue delivery of this worker has been waiting."""
        return self._queue.lag(now)

    def _count(self, key: str, platform: int, attempt: int, outcome: Outcome) -> None:
        """An attempt in the metrics and the log (ids only, never the push token)."""
        result = "sent" if outcome.sent else ("retry" if outcome.retry else "failed")
        name = nt_pb2.Platform.Name(platform)  # type: ignore[arg-type]
        self._attempts.add(1, {"accessline.platform": name, "result": result})
        notification_id, device_id = key[len(OUTBOX) :].split("/", 1)
        fields: dict[str, object] = {
            "notification_id": notification_id,
            "device_id": device_id,
            "platform": name,
            "result": result,
            "attempt": attempt,
            "reason": outcome.reason,
        }
        log.info("push attempt", extra={"fields": fields})

    def _schedule(self, key: str, at: float) -> None:
        self._queue.schedule(key, at)

    async def _run(self) -> None:
        await self._queue.run("notification worker", self._load, self._follow)

    async def _load(self) -> int:
        if self._lease is None:
            await self.take_lease()
        rows, revision = await self._store.get_prefix(OUTBOX, nt_store.Delivery)
        for row in rows:
            if row.value.status == nt_pb2.DELIVERY_STATUS_QUEUED:
                self._schedule(row.key, seconds(row.value.next_attempt_at))
        return revision

    async def _follow(self, revision: int) -> None:
        async for event in self._store.watch_prefix("nt/", revision + 1):
            if event.key.startswith(OUTBOX) and event.kind == EventKind.PUT:
                delivery = event.decode(nt_store.Delivery)
                if delivery.status == nt_pb2.DELIVERY_STATUS_QUEUED:
                    self._schedule(event.key, seconds(delivery.next_attempt_at))
            elif event.key.startswith(CLAIMS) and event.kind == EventKind.DELETE:
                # A claim ended (maybe its worker died): look at the item again now.
                self._schedule(OUTBOX + event.key[len(CLAIMS) :], time.time())

    async def _deliver(self, key: str) -> None:
        try:
            await self._attempt(key)
        except AccesslineError as exc:
            log.warning(
                "delivery attempt failed on etcd; retrying",
                extra={"fields": {"error": exc.message}},
            )
            self._schedule(key, time.time() + 1.0)

    async def _attempt(self, key: str) -> None:
        entry = await self._store.get(key, nt_store.Delivery)
        if entry is None or entry.value.status != nt_pb2.DELIVERY_STATUS_QUEUED:
            return
        if seconds(entry.value.next_attempt_at) > time.time() + 0.001:
            self._schedule(key, seconds(entry.value.next_attempt_at))
            return
        await self.attempt_as_read(key, entry)

    async def attempt_as_read(self, key: str, entry: Entry[nt_store.Delivery]) -> None:
        """Claims the delivery as `entry` shows it, sends it and records the outcome."""
        assert self._lease is not None
        notification_id, device_id = key[len(OUTBOX) :].split("/", 1)
        claim = CLAIMS + key[len(OUTBOX) :]
        # Claimed only while the delivery is as this worker read it: another worker may
        # have claimed, sent, recorded and released it since (then it is no longer due).
        claimed = await self._store.txn(
            [Compare.absent(claim), Compare.modified_at(key, entry.meta.mod_revision)],
            [Op.put(claim, nt_store.Claim(worker_id=self.worker_id), self._lease.id)],
        )
        if not claimed.succeeded:
            return  # another worker has it or had it; its claim's end wakes us again
        try:
            delivery = entry.value
            found = await self._store.get(
                NOTIFICATIONS + notification_id, nt_store.StoredNotification
            )
            device = await self._notifications.maybe_device(device_id)
            now = time.time()
            outcome: Outcome
            if found is None or seconds(found.value.expires_at) <= now:
                delivery.status = nt_pb2.DELIVERY_STATUS_EXPIRED
            elif device is None or not device.active:
                delivery.status = nt_pb2.DELIVERY_STATUS_FAILED
                delivery.failure_reason = "device unregistered"
            elif device.platform == nt_pb2.PLATFORM_IN_APP:
                return  # the device's stream delivers it
            elif (provider := self._providers.get(device.platform)) is None:
                delivery.status = nt_pb2.DELIVERY_STATUS_FAILED
                delivery.failure_reason = "no provider configured for this platform"
            else:
                message = Message(
                    notification=found.value.notification,
                    push_token=device.push_token,
                    expires_at=seconds(found.value.expires_at),
                    priority=found.value.priority,
                    collapse_key=found.value.collapse_key,
                )
                outcome = await provider.send(message)
                # A provider's Retry-After counts from its answer, not from the request.
                now = time.time()
                delivery.attempts += 1
                self._count(key, device.platform, delivery.attempts, outcome)
                if outcome.sent:
                    delivery.status = nt_pb2.DELIVERY_STATUS_SENT
                    delivery.failure_reason = ""
                elif outcome.retry and delivery.attempts < self._policy.max_attempts:
                    # Half the base to the whole after the first failure, doubling.
                    policy = self._policy
                    backoff = delay(delivery.attempts, policy.backoff_base / 2, policy.backoff_cap)
                    wait = max(outcome.retry_after or 0.0, backoff)
                    delivery.next_attempt_at.CopyFrom(timestamp(now + wait))
                    delivery.failure_reason = outcome.reason
                else:
                    delivery.status = nt_pb2.DELIVERY_STATUS_FAILED
                    delivery.failure_reason = outcome.reason or "too many attempts"
                    if outcome.unregistered:
                        await self._notifications.deactivate(device_id)
            delivery.updated_at.CopyFrom(timestamp(time.time()))
            await self._store.txn(
                [Compare.modified_at(key, entry.meta.mod_revision)],
                [Op.put(key, delivery, entry.meta.lease)],
            )
        finally:
            await self._store.delete(claim)
