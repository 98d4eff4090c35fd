"""Notification's published module for the services where what a webhook tells happens
(CallMatching's matched, cancelled and expired handoffs; Routing's matched calls queued, offered,
connected or gone, its callbacks and its notify-when-available):
the operation that writes the event in that service's own transaction, so an event
exists exactly when what it tells happened, and is never lost nor told of something
that did not happen. Notification fans each event out to the webhooks its application
registered for it (webhook_delivery.py).

An event holds ids and outcomes only: never the handoff's context, never a number."""

from __future__ import annotations

import secrets
from collections.abc import Mapping

from accessline.notification.storage.v1 import storage_pb2 as nt_store
from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline_server.notification.keys import EVENTS
from accessline_server.runtime.clock import timestamp
from accessline_server.runtime.store import Op, Store

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


async def event_op(
    store: Store,
    event_type: nt_pb2.WebhookEventType.ValueType,
    application_id: str,
    data: Mapping[str, str],
    now: float,
) -> Op:
    """The put of one event, for the caller's transaction."""
    lease = await store.shared_lease(EVENT_LEASE_SECONDS, window=3600.0)
    event_id = "evt_" + secrets.token_urlsafe(16)
    event = nt_store.StoredWebhookEvent(
        event_id=event_id,
        type=event_type,
        application_id=application_id,
        occurred_at=timestamp(now),
        data=dict(data),
    )
    return Op.put(EVENTS + event_id, event, lease)
