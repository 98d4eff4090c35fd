"""Notification's published module for the services where what a webhook tells happens
(CallMatching's matched, cancelled and expired handoffs; Routing's matched calls queued, offered,
connected or gone, its callbacks and its notify-when-available):
the operation that writes the event in that service's own transaction, so an event
exists exactly when what it tells happened, and is never lost nor told of something
that did not happen. Notification fans each event out to the webhooks its application
registered for it (webhook_delivery.py).

An event holds ids and outcomes only: never the handoff's context, never a number."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Mapping

from accessline.notification.storage.v1 import storage_pb2 as nt_store
from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline_server.notification.keys import EVENTS, WEBHOOKS
from accessline_server.runtime.clock import timestamp
from accessline_server.runtime.errors import AccesslineError
from accessline_server.runtime.store import EventKind, Op, Store, WatchCompacted

log = logging.getLogger("accessline.notification")
# An event not fanned out within a week (Notification down that long) is dropped.
EVENT_LEASE_SECONDS = 7 * 86400.0

HANDOFF_MATCHED = nt_pb2.WEBHOOK_EVENT_TYPE_HANDOFF_MATCHED
HANDOFF_CANCELLED = nt_pb2.WEBHOOK_EVENT_TYPE_HANDOFF_CANCELLED
CALL_CONNECTED = nt_pb2.WEBHOOK_EVENT_TYPE_CALL_CONNECTED
CALL_ABANDONED = nt_pb2.WEBHOOK_EVENT_TYPE_CALL_ABANDONED
CALL_QUEUED = nt_pb2.WEBHOOK_EVENT_TYPE_CALL_QUEUED
CALL_OFFERED = nt_pb2.WEBHOOK_EVENT_TYPE_CALL_OFFERED
CALLBACK_SCHEDULED = nt_pb2.WEBHOOK_EVENT_TYPE_CALLBACK_SCHEDULED
CALLBACK_ATTEMPTED = nt_pb2.WEBHOOK_EVENT_TYPE_CALLBACK_ATTEMPTED
CALLBACK_COMPLETED = nt_pb2.WEBHOOK_EVENT_TYPE_CALLBACK_COMPLETED
CALLBACK_FAILED = nt_pb2.WEBHOOK_EVENT_TYPE_CALLBACK_FAILED
AVAILABILITY_NOTIFIED = nt_pb2.WEBHOOK_EVENT_TYPE_AVAILABILITY_NOTIFIED
HANDOFF_EXPIRED = nt_pb2.WEBHOOK_EVENT_TYPE_HANDOFF_EXPIRED


class Subscriptions:
    """Which events each application's webhooks want, followed from Notification's
    webhook records by a watch (one per process): an event no webhook wants is not
    written at all, so it costs nothing. A webhook registered concurrently with an event
    may miss it: a webhook is told the events that happen once its registration is seen
    (well under a second)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._by_webhook: dict[str, tuple[str, frozenset[int]]] = {}
        self._wanted: set[tuple[str, int]] = set()
        self.ready = False
        self._task: asyncio.Task[None] | None = None

    def wants(self, application_id: str, event_type: int) -> bool:
        return not self.ready or (application_id, event_type) in self._wanted

    def _set(self, webhook_id: str, stored: nt_store.StoredWebhook | None) -> None:
        before = self._by_webhook.get(webhook_id)
        if stored is None:
            self._by_webhook.pop(webhook_id, None)
        else:
            hook = stored.webhook
            self._by_webhook[webhook_id] = (hook.application_id, frozenset(hook.events))
        self._wanted = {(app, t) for app, types in self._by_webhook.values() for t in types}
        for app in {a for a, _ in filter(None, (before, self._by_webhook.get(webhook_id)))}:
            wanted = sorted(
                nt_pb2.WebhookEventType.Name(t)  # type: ignore[arg-type]
                for a, t in self._wanted
                if a == app
            )
            log.info(
                "webhook events wanted",
                extra={"fields": {"application_id": app, "events": ",".join(wanted)}},
            )

    async def _run(self) -> None:
        while True:
            try:
                found, revision = await self._store.get_prefix(WEBHOOKS, nt_store.StoredWebhook)
                self._by_webhook.clear()
                for entry in found:
                    self._set(entry.key[len(WEBHOOKS) :], entry.value)
                if not found:
                    self._wanted = set()
                self.ready = True
                async for event in self._store.watch_prefix(WEBHOOKS, revision + 1):
                    webhook_id = event.key[len(WEBHOOKS) :]
                    if event.kind == EventKind.DELETE:
                        self._set(webhook_id, None)
                    else:
                        self._set(webhook_id, event.decode(nt_store.StoredWebhook))
            except (AccesslineError, WatchCompacted) as exc:
                self.ready = False  # every event is written until the view is back
                log.warning("webhook subscriptions not followed: %s", exc)
                await asyncio.sleep(1.0)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="webhook-subscriptions")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


_followed: Subscriptions | None = None


def follow(store: Store) -> Subscriptions:
    """Starts following which events applications' webhooks want, for this process's
    `event_ops` (stop it on the way out)."""
    global _followed
    _followed = Subscriptions(store)
    _followed.start()
    return _followed


async def event_ops(
    store: Store,
    event_type: nt_pb2.WebhookEventType.ValueType,
    application_id: str,
    data: Mapping[str, str],
    now: float,
) -> list[Op]:
    """The put of one event, for the caller's transaction; none when no webhook of the
    application wants it (as this process follows them; every event while it does not)."""
    if _followed is not None and not _followed.wants(application_id, event_type):
        return []
    lease = await store.shared_lease(EVENT_LEASE_SECONDS, window=3600.0)
    event_id = "evt_" + secrets.token_urlsafe(16)
    event = nt_store.StoredWebhookEvent(
        event_id=event_id,
        type=event_type,
        application_id=application_id,
        occurred_at=timestamp(now),
        data=dict(data),
    )
    return [Op.put(EVENTS + event_id, event, lease)]
