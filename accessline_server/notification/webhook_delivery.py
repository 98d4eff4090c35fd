"""Webhook delivery. Every replica runs a worker that

- fans each event (events.py; written by the service where it happened) out to the
  webhooks its application registered for it, in one transaction that deletes the event
  and writes one delivery per webhook, so an event is fanned out once;
- delivers what is due: a delivery is claimed (created only if absent, under the
  worker's lease, while the delivery is as read) before it is sent, so two workers never
  send it at once and a dead worker's claims vanish with its lease; the outcome is
  written back, with the next attempt's time after a failure.

A delivery is a POST of the same JSON body on every attempt, signed per Standard
Webhooks: `webhook-id` (the event id), `webhook-timestamp` (the attempt's time),
`webhook-signature` (`v1,` and the base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`, once
per secret signing now: two during a rotation's overlap). A 2xx answer delivers it;
408, 429, 5xx, a time-out or no connection retries it after a backoff (or the endpoint's
Retry-After, if longer); another answer, or the last attempt, fails it. The endpoint's
host is resolved at each attempt and every address checked against the deployment's
reach (webhooks.py) before anything is sent, to the address checked (not resolved again:
no DNS rebinding between the check and the connection)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
from opentelemetry import metrics

from accessline.notification.storage.v1 import storage_pb2 as nt_store
from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline_server.notification.keys import (
    EVENTS,
    WEBHOOK_CLAIMS,
    WEBHOOK_DELIVERIES,
    WEBHOOKS,
)
from accessline_server.notification.schedule import DueQueue, one_by_one
from accessline_server.notification.webhooks import Reach, Webhooks, delivery_order
from accessline_server.runtime.backoff import delay
from accessline_server.runtime.clock import seconds, timestamp
from accessline_server.runtime.errors import AccesslineError
from accessline_server.runtime.store import (
    Compare,
    Entry,
    EventKind,
    KeptLease,
    Op,
    Store,
)

log = logging.getLogger("accessline.notification.webhooks")

EVENT_NAMES = {
    nt_pb2.WEBHOOK_EVENT_TYPE_HANDOFF_MATCHED: "handoff.matched",
    nt_pb2.WEBHOOK_EVENT_TYPE_HANDOFF_CANCELLED: "handoff.cancelled",
    nt_pb2.WEBHOOK_EVENT_TYPE_CALL_CONNECTED: "call.connected",
    nt_pb2.WEBHOOK_EVENT_TYPE_CALL_ABANDONED: "call.abandoned",
    nt_pb2.WEBHOOK_EVENT_TYPE_CALL_QUEUED: "call.queued",
    nt_pb2.WEBHOOK_EVENT_TYPE_CALL_OFFERED: "call.offered",
    nt_pb2.WEBHOOK_EVENT_TYPE_CALLBACK_SCHEDULED: "callback.scheduled",
    nt_pb2.WEBHOOK_EVENT_TYPE_CALLBACK_ATTEMPTED: "callback.attempted",
    nt_pb2.WEBHOOK_EVENT_TYPE_CALLBACK_COMPLETED: "callback.completed",
    nt_pb2.WEBHOOK_EVENT_TYPE_CALLBACK_FAILED: "callback.failed",
    nt_pb2.WEBHOOK_EVENT_TYPE_AVAILABILITY_NOTIFIED: "availability.notified",
    nt_pb2.WEBHOOK_EVENT_TYPE_HANDOFF_EXPIRED: "handoff.expired",
}
PENDING = nt_pb2.WEBHOOK_DELIVERY_STATUS_PENDING
RETRIED_STATUSES = {408, 429}


@dataclass(frozen=True)
class WebhookPolicy:
    max_attempts: int = 12
    backoff_first: float = 5.0
    backoff_cap: float = 3600.0
    retention: float = 7 * 86400.0
    timeout: float = 10.0


@dataclass(frozen=True)
class Attempt:
    """What one POST came to."""

    http_status: int
    delivered: bool
    retry: bool
    reason: str = ""
    retry_after: float = 0.0


def signature(secret: bytes, event_id: str, sent_at: int, body: bytes) -> str:
    signed = f"{event_id}.{sent_at}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret, signed, hashlib.sha256).digest()).decode()


def event_body(event: nt_store.StoredWebhookEvent) -> bytes:
    """The JSON body of an event's deliveries (Standard Webhooks' shape: type,
    timestamp, data)."""
    occurred = seconds(event.occurred_at)
    return json.dumps(
        {
            "type": EVENT_NAMES.get(event.type, "unknown"),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(occurred))
            + f".{int(occurred * 1000) % 1000:03d}Z",
            "data": {
                "event_id": event.event_id,
                "application_id": event.application_id,
                **dict(sorted(event.data.items())),
            },
        },
        separators=(",", ":"),
    ).encode()


def _retry_after(answer: httpx.Response) -> float:
    try:
        return max(0.0, float(answer.headers.get("retry-after", "0")))
    except ValueError:
        return 0.0


class WebhookSender:
    """POSTs signed deliveries; never follows a redirect (it could lead anywhere)."""

    def __init__(self, reach: Reach, timeout: float, ca_file: str = "") -> None:
        self._reach = reach
        self._client = httpx.AsyncClient(
            timeout=timeout, verify=ca_file or True, follow_redirects=False
        )

    async def resolve(self, host: str, port: int) -> list[str]:
        """The addresses of the endpoint's host, as the system resolves them now."""
        found = await asyncio.get_running_loop().getaddrinfo(host, port)
        return [str(info[4][0]) for info in found]

    async def _vetted(self, url: str) -> str | None:
        """The address to send to: the host resolved once, every address it has allowed
        (the request then goes to that address, never resolved again: a name cannot
        point elsewhere between the check and the connection); None when not allowed."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            found = [ipaddress.ip_address(a) for a in await self.resolve(host, port)]
        except (OSError, ValueError):
            return None
        if not found or not all(self._reach.address_allowed(a) for a in found):
            return None
        return str(found[0])

    async def send(
        self, url: str, body: bytes, event_id: str, signing: list[bytes], now: float
    ) -> Attempt:
        address = await self._vetted(url)
        if address is None:
            return Attempt(0, False, True, "host unresolved or in a private network")
        parts = urlsplit(url)
        sent_at = int(now)
        headers = {
            "host": parts.netloc,
            "content-type": "application/json",
            "user-agent": "Accessline-Webhooks/1",
            "webhook-id": event_id,
            "webhook-timestamp": str(sent_at),
            "webhook-signature": " ".join(signature(s, event_id, sent_at, body) for s in signing),
        }
        at = f"[{address}]" if ":" in address else address
        target = parts._replace(netloc=f"{at}:{parts.port}" if parts.port else at).geturl()
        # TLS still checks the endpoint's certificate against its name (SNI).
        extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
        try:
            answer = await self._client.post(
                target, content=body, headers=headers, extensions=extensions
            )
        except httpx.HTTPError as exc:
            return Attempt(0, False, True, f"no answer: {type(exc).__name__}")
        status = answer.status_code
        if 200 <= status < 300:
            return Attempt(status, True, False)
        retry = status in RETRIED_STATUSES or status >= 500
        return Attempt(status, False, retry, f"answered {status}", _retry_after(answer))

    async def close(self) -> None:
        await self._client.aclose()


class WebhookWorker:
    """Fans events out and delivers webhooks (see the module's docstring)."""

    def __init__(
        self,
        store: Store,
        webhooks: Webhooks,
        sender: WebhookSender,
        policy: WebhookPolicy,
        *,
        lease_seconds: int = 10,
        concurrency: int = 16,
        meter: metrics.Meter | None = None,
    ) -> None:
        self._store = store
        self._webhooks = webhooks
        self._sender = sender
        self._policy = policy
        self._lease_seconds = lease_seconds
        self._lease: KeptLease | None = None
        self.worker_id = "w" + secrets.token_hex(6)
        self._queue = DueQueue(one_by_one(self._deliver), concurrency)
        self._runner: asyncio.Task[None] | None = None
        meter = meter or metrics.get_meter("accessline.notification")
        self._attempts = meter.create_counter(
            "accessline.webhooks.deliveries",
            unit="{attempt}",
            description="Webhook delivery attempts by event type and result",
        )

    async def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="webhook-worker")

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

    async def _run(self) -> None:
        await self._queue.run("webhook worker", self._load, self._follow)

    async def _load(self) -> int:
        """Fans out the events there are and schedules the pending deliveries, both as
        of one revision (the watch goes on from the next)."""
        if self._lease is None:
            lease_id = await self._store.grant_lease(self._lease_seconds)
            self._lease = await self._store.keep_alive(lease_id, self._lease_seconds)
        found = await self._store.txn(
            [], [Op.get_prefix(EVENTS), Op.get_prefix(WEBHOOK_DELIVERIES)]
        )
        events, deliveries = found.gets
        for raw in events:
            event = nt_store.StoredWebhookEvent.FromString(raw.value)
            await self._fan_out(Entry(raw.key, event, raw.meta))
        for raw in deliveries:
            delivery = nt_store.StoredWebhookDelivery.FromString(raw.value).delivery
            if delivery.status == PENDING:
                self._queue.schedule(raw.key, seconds(delivery.next_attempt_at))
        return found.revision

    async def _follow(self, revision: int) -> None:
        async for event in self._store.watch_prefix("nt/", revision + 1):
            if event.kind != EventKind.PUT and not event.key.startswith(WEBHOOK_CLAIMS):
                continue
            if event.key.startswith(EVENTS):
                stored = event.decode(nt_store.StoredWebhookEvent)
                meta = event.meta
                await self._fan_out(Entry(event.key, stored, meta))
            elif event.key.startswith(WEBHOOK_DELIVERIES):
                delivery = event.decode(nt_store.StoredWebhookDelivery).delivery
                if delivery.status == PENDING:
                    self._queue.schedule(event.key, seconds(delivery.next_attempt_at))
            elif event.key.startswith(WEBHOOK_CLAIMS) and event.kind == EventKind.DELETE:
                # A claim ended (maybe its worker died): look at the delivery again now.
                key = WEBHOOK_DELIVERIES + event.key[len(WEBHOOK_CLAIMS) :]
                self._queue.schedule(key, time.time())

    async def _fan_out(self, entry: Entry[nt_store.StoredWebhookEvent]) -> None:
        """One delivery per webhook of the event's application that wants it, and the
        event deleted, in one transaction (only one worker's holds)."""
        event = entry.value
        hooks = [
            h
            for h in await self._webhooks.for_application(event.application_id)
            if event.type in h.webhook.events
        ]
        now = time.time()
        lease = await self._store.shared_lease(self._policy.retention, window=60.0)
        body = event_body(event)
        order = delivery_order(seconds(event.occurred_at), event.event_id)
        ops = [Op.delete(entry.key)]
        for hook in hooks:
            delivery = nt_pb2.WebhookDelivery(
                event_id=event.event_id,
                event_type=event.type,
                status=PENDING,
                occurred_at=event.occurred_at,
                next_attempt_at=timestamp(now),
                updated_at=timestamp(now),
            )
            stored = nt_store.StoredWebhookDelivery(delivery=delivery, body=body)
            ops.append(
                Op.put(f"{WEBHOOK_DELIVERIES}{hook.webhook.webhook_id}/{order}", stored, lease)
            )
        await self._store.txn([Compare.modified_at(entry.key, entry.meta.mod_revision)], ops)

    async def _deliver(self, key: str) -> None:
        try:
            await self._attempt(key)
        except AccesslineError as exc:
            log.warning(
                "webhook attempt failed on etcd; retrying", extra={"fields": {"error": exc.message}}
            )
            self._queue.schedule(key, time.time() + 1.0)

    async def _attempt(self, key: str) -> None:
        entry = await self._store.get(key, nt_store.StoredWebhookDelivery)
        if entry is None or entry.value.delivery.status != PENDING:
            return
        due = seconds(entry.value.delivery.next_attempt_at)
        if due > time.time() + 0.001:
            self._queue.schedule(key, due)
            return
        assert self._lease is not None
        claim = WEBHOOK_CLAIMS + key[len(WEBHOOK_DELIVERIES) :]
        claimed = await self._store.txn(
            [Compare.absent(claim), Compare.modified_at(key, entry.meta.mod_revision)],
            [Op.put(claim, nt_store.Claim(worker_id=self.worker_id), self._lease.id)],
        )
        if not claimed.succeeded:
            return  # another worker has it or had it; its claim's end wakes us again
        try:
            await self._send(key, entry)
        finally:
            await self._store.delete(claim)

    async def _send(self, key: str, entry: Entry[nt_store.StoredWebhookDelivery]) -> None:
        webhook_id = key[len(WEBHOOK_DELIVERIES) :].split("/", 1)[0]
        hook = await self._store.get(WEBHOOKS + webhook_id, nt_store.StoredWebhook)
        if hook is None:
            return  # deleted with its deliveries
        delivery = entry.value.delivery
        now = time.time()
        signing = self._webhooks.signing_secrets(hook.value, now)
        attempt = await self._sender.send(
            hook.value.webhook.url, entry.value.body, delivery.event_id, signing, now
        )
        now = time.time()
        delivery.attempts += 1
        delivery.last_http_status = attempt.http_status
        policy = self._policy
        if attempt.delivered:
            delivery.status = nt_pb2.WEBHOOK_DELIVERY_STATUS_DELIVERED
            delivery.failure_reason = ""
            delivery.ClearField("next_attempt_at")
        elif attempt.retry and delivery.attempts < policy.max_attempts:
            wait = max(
                attempt.retry_after,
                delay(delivery.attempts, policy.backoff_first, policy.backoff_cap),
            )
            delivery.next_attempt_at.CopyFrom(timestamp(now + wait))
            delivery.failure_reason = attempt.reason
        else:
            delivery.status = nt_pb2.WEBHOOK_DELIVERY_STATUS_FAILED
            delivery.failure_reason = attempt.reason or "too many attempts"
            delivery.ClearField("next_attempt_at")
        delivery.updated_at.CopyFrom(timestamp(now))
        result = (
            "delivered"
            if attempt.delivered
            else ("retry" if delivery.status == PENDING else "failed")
        )
        name = EVENT_NAMES.get(delivery.event_type, "unknown")
        self._attempts.add(1, {"accessline.webhook.event": name, "result": result})
        log.info(
            "webhook attempt",
            extra={
                "fields": {
                    "webhook_id": webhook_id,
                    "event_id": delivery.event_id,
                    "attempt": delivery.attempts,
                    "http_status": attempt.http_status,
                    "result": result,
                    "reason": attempt.reason,
                }
            },
        )
        await self._store.txn(
            [Compare.modified_at(key, entry.meta.mod_revision)],
            [Op.put(key, entry.value, entry.meta.lease)],
        )
