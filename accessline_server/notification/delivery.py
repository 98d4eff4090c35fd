"""Delivery of the outbox: every replica runs a worker that claims due items under its
lease and sends them through the providers (FCM, APNs), with retries and
backoff; a token the provider says is gone deactivates its device."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from opentelemetry import metrics

from accessline.notification.storage.v1 import storage_pb2 as nt_store
from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline_server.notification.domain import Notifications, Policy
from accessline_server.notification.keys import CLAIMS, DEVICES, NOTIFICATIONS, OUTBOX
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
    decode,
)

log = logging.getLogger("accessline.notification")


class Provider(Protocol):
    async def send(self, message: Message) -> Outcome: ...

    async def close(self) -> None: ...


@dataclass
class _Found:
    """What a batch's deliveries need: their notifications and devices, by id."""

    notifications: dict[str, nt_store.StoredNotification] = field(default_factory=dict)
    devices: dict[str, nt_pb2.Device] = field(default_factory=dict)


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
        concurrency: int = 4,
        batch: int = 32,
        meter: metrics.Meter | None = None,
    ) -> None:
        self._store = store
        self._notifications = notifications
        self._providers = providers
        self._policy = policy
        self._lease_seconds = lease_seconds
        self.worker_id = "w" + secrets.token_hex(6)
        self._queue = DueQueue(self._deliver, concurrency, batch)
        # Deliveries this worker is attempting now, claimed or being claimed.
        self._holding: set[str] = set()
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

    @property
    def lease_id(self) -> int:
        """The lease this worker's claims live under (0 before it took one)."""
        return self._lease.id if self._lease is not None else 0

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
        # Items whose delivery was written at the watch's current revision: a claim
        # dropped in the transaction that recorded its attempt needs no second look (the
        # delivery's own change scheduled it if it is still due).
        at_revision, recorded = 0, set[str]()
        async for event in self._store.watch_prefix("nt/", revision + 1):
            if event.revision != at_revision:
                at_revision, recorded = event.revision, set()
            if event.key.startswith(OUTBOX) and event.kind == EventKind.PUT:
                recorded.add(event.key[len(OUTBOX) :])
                delivery = event.decode(nt_store.Delivery)
                if delivery.status == nt_pb2.DELIVERY_STATUS_QUEUED:
                    self._schedule(event.key, seconds(delivery.next_attempt_at))
            elif event.key.startswith(CLAIMS) and event.kind == EventKind.DELETE:
                item = event.key[len(CLAIMS) :]
                if item not in recorded:
                    # A claim ended without a record (its worker died, or let it go):
                    # look at the item again now.
                    self._schedule(OUTBOX + item, time.time())

    async def _deliver(self, keys: list[str]) -> None:
        try:
            await self._attempt(keys)
        except AccesslineError as exc:
            log.warning(
                "delivery attempt failed on etcd; retrying",
                extra={"fields": {"error": exc.message, "items": len(keys)}},
            )
            for key in keys:
                self._schedule(key, time.time() + 1.0)

    async def _attempt(self, keys: list[str]) -> None:
        """The due items among `keys`, read in one etcd transaction, attempted together."""
        now = time.time()
        due: list[Entry[nt_store.Delivery]] = []
        for key, row in zip(keys, await self._store.get_keys(keys), strict=True):
            if row is None:
                continue
            entry = Entry(key, decode(nt_store.Delivery, key, row.value), row.meta)
            if entry.value.status != nt_pb2.DELIVERY_STATUS_QUEUED:
                continue
            if seconds(entry.value.next_attempt_at) > now + 0.001:
                self._schedule(key, seconds(entry.value.next_attempt_at))
                continue
            due.append(entry)
        await self.attempt_as_read(due)

    async def attempt_as_read(self, entries: Sequence[Entry[nt_store.Delivery]]) -> None:
        """Claims each delivery as its entry shows it, sends those claimed and records
        their outcomes. The claims and the records are a transaction each (group commit
        sends them together); the notifications and devices are read in one."""
        # Held before they are claimed: an item this worker is attempting already (in
        # another batch) is left to that batch, and a claim of this worker's lease on an
        # item it holds is never taken for one left behind.
        entries = list({e.key: e for e in entries if e.key not in self._holding}.values())
        self._holding.update(entry.key for entry in entries)
        mine: list[Entry[nt_store.Delivery]] = []
        released: set[str] = set()
        try:
            claimed = await asyncio.gather(*(self._claim(entry) for entry in entries))
            mine = [entry for entry, ok in zip(entries, claimed, strict=True) if ok]
            if not mine:
                return
            found = await self._read_for(mine)
            written = await asyncio.gather(*(self._send(entry, found) for entry in mine))
            recorded = await asyncio.gather(
                *(
                    self._record(entry, delivery, released)
                    for entry, delivery in zip(mine, written, strict=True)
                ),
                return_exceptions=True,
            )
            failed = [r for r in recorded if isinstance(r, BaseException)]
            if failed:
                raise failed[0]
        finally:
            self._holding.difference_update(entry.key for entry in entries)
            left = [_claim_of(e.key) for e in mine if e.key not in released]
            if left:
                await self._store.txn([], [Op.delete(claim) for claim in left])

    async def _claim(self, entry: Entry[nt_store.Delivery]) -> bool:
        """Claims the delivery while it is as `entry` shows it: another worker may have
        claimed, sent, recorded and released it since (then it is no longer due)."""
        assert self._lease is not None
        claim = _claim_of(entry.key)
        claimed = await self._store.txn(
            [Compare.absent(claim), Compare.modified_at(entry.key, entry.meta.mod_revision)],
            [Op.put(claim, nt_store.Claim(worker_id=self.worker_id), self._lease.id)],
            [Op.get(claim)],
        )
        if claimed.succeeded:
            return True
        held = claimed.first()
        if held is not None and held.meta.lease == self._lease.id:
            # This worker's own claim, while no attempt of its holds the item: left by an
            # attempt whose release failed (etcd unreachable then). Dropped; its end
            # schedules the item again.
            await self._store.txn(
                [Compare.modified_at(claim, held.meta.mod_revision)], [Op.delete(claim)]
            )
        return False  # another worker has it or had it; its claim's end wakes us again

    async def _read_for(self, entries: Sequence[Entry[nt_store.Delivery]]) -> _Found:
        """The notifications and devices of `entries`, read in one transaction and each
        decoded once (a notification is shared by its batch's deliveries)."""
        keys: set[str] = set()
        for entry in entries:
            notification_id, device_id = entry.key[len(OUTBOX) :].split("/", 1)
            keys.update((NOTIFICATIONS + notification_id, DEVICES + device_id))
        ordered = sorted(keys)
        found = _Found()
        for key, row in zip(ordered, await self._store.get_keys(ordered), strict=True):
            if row is None:
                continue
            if key.startswith(NOTIFICATIONS):
                note = decode(nt_store.StoredNotification, key, row.value)
                found.notifications[key[len(NOTIFICATIONS) :]] = note
            else:
                stored = decode(nt_store.StoredDevice, key, row.value)
                found.devices[key[len(DEVICES) :]] = self._notifications.opened(stored)
        return found

    async def _send(
        self, entry: Entry[nt_store.Delivery], found: _Found
    ) -> nt_store.Delivery | None:
        """Sends one claimed delivery; the delivery to record (None: nothing to record,
        the device's in-app stream delivers it)."""
        key = entry.key
        notification_id, device_id = key[len(OUTBOX) :].split("/", 1)
        delivery = nt_store.Delivery()
        delivery.CopyFrom(entry.value)
        note = found.notifications.get(notification_id)
        device = found.devices.get(device_id)
        if note is None or seconds(note.expires_at) <= time.time():
            delivery.status = nt_pb2.DELIVERY_STATUS_EXPIRED
        elif device is None or not device.active:
            delivery.status = nt_pb2.DELIVERY_STATUS_FAILED
            delivery.failure_reason = "device unregistered"
        elif device.platform == nt_pb2.PLATFORM_IN_APP:
            return None
        elif (provider := self._providers.get(device.platform)) is None:
            delivery.status = nt_pb2.DELIVERY_STATUS_FAILED
            delivery.failure_reason = "no provider configured for this platform"
        else:
            message = Message(
                notification=note.notification,
                push_token=device.push_token,
                expires_at=seconds(note.expires_at),
                priority=note.priority,
                collapse_key=note.collapse_key,
            )
            outcome = await _sent(provider, message)
            await self._outcome(key, delivery, device.platform, outcome)
        delivery.updated_at.CopyFrom(timestamp(time.time()))
        return delivery

    async def _outcome(
        self, key: str, delivery: nt_store.Delivery, platform: int, outcome: Outcome
    ) -> None:
        """What a provider's answer makes of the delivery."""
        # A provider's Retry-After counts from its answer, not from the request.
        now = time.time()
        delivery.attempts += 1
        self._count(key, platform, delivery.attempts, outcome)
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
                await self._notifications.deactivate(delivery.device_id)

    async def _record(
        self,
        entry: Entry[nt_store.Delivery],
        delivery: nt_store.Delivery | None,
        released: set[str],
    ) -> None:
        """Writes the attempt's outcome while the delivery is as claimed, and drops the
        claim in the same transaction."""
        claim = _claim_of(entry.key)
        if delivery is None:
            await self._store.txn([], [Op.delete(claim)])
        else:
            await self._store.txn(
                [Compare.modified_at(entry.key, entry.meta.mod_revision)],
                [Op.put(entry.key, delivery, entry.meta.lease), Op.delete(claim)],
                [Op.delete(claim)],
            )
        released.add(entry.key)


def _claim_of(key: str) -> str:
    return CLAIMS + key[len(OUTBOX) :]


async def _sent(provider: Provider, message: Message) -> Outcome:
    """The provider's answer; a fault of the provider's client is an answer to retry
    later (with the backoff), not an attempt lost."""
    try:
        return await provider.send(message)
    except Exception as exc:  # counted and retried like a provider's 5xx
        log.exception("push provider client failed")
        return Outcome(sent=False, retry=True, reason=f"client error: {type(exc).__name__}")
