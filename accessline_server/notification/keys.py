"""Notification's key layout in etcd, private to this service.

nt/devices/{device_id}                          StoredDevice (push token sealed)
nt/owners/{customer|agent}:{id hash}/{device}   empty (index)
nt/subscriptions/{topic hash}/{subscription}    StoredSubscription
nt/subscription-ids/{subscription_id}           StoredSubscription
nt/idempotency/{sha256}                         PublishRecord       (notification lease)
nt/notifications/{notification_id}              StoredNotification  (notification lease)
nt/outbox/{notification_id}/{device_id}         Delivery            (notification lease)
nt/claims/{notification_id}/{device_id}         Claim               (worker lease)
nt/inbox/{device_id}/{notification_id}          empty               (notification lease)
nt/streams/{device_id}/{slot}                   empty               (the replica's lease)
nt/webhooks/{webhook_id}                        StoredWebhook
nt/app-webhooks/{app hash}/{slot}               WebhookSlot
nt/events/{event_id}                            StoredWebhookEvent  (other services: events.py)
nt/webhook-deliveries/{webhook_id}/{order}      StoredWebhookDelivery (retention lease)
nt/webhook-claims/{webhook_id}/{order}          Claim               (worker lease)
nt/links/{agent_id}/{interaction_id}            LinkTally           (longest interaction)
nt/surveys/{application_id}/{interaction_id}    SurveyInvitation    (other services: surveys.py)
"""

from __future__ import annotations

import hashlib
import hmac

from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline_server.runtime.sealing import derive_key

DEVICES = "nt/devices/"
OWNERS = "nt/owners/"
SUBSCRIPTIONS = "nt/subscriptions/"
SUBSCRIPTION_IDS = "nt/subscription-ids/"
IDEMPOTENCY = "nt/idempotency/"
NOTIFICATIONS = "nt/notifications/"
OUTBOX = "nt/outbox/"
CLAIMS = "nt/claims/"
INBOX = "nt/inbox/"
STREAMS = "nt/streams/"
WEBHOOKS = "nt/webhooks/"
APP_WEBHOOKS = "nt/app-webhooks/"
EVENTS = "nt/events/"
WEBHOOK_DELIVERIES = "nt/webhook-deliveries/"
WEBHOOK_CLAIMS = "nt/webhook-claims/"
LINKS = "nt/links/"


class Keys:
    """Key names that need an id a client chose (a customer id, a topic): a keyed hash of
    it, so ids match exactly (`victim/spy` is not under `victim`) and no customer id
    appears in a key name."""

    def __init__(self, secret: bytes) -> None:
        self._key = derive_key(secret, b"accessline notification key names v1")

    def _hash(self, kind: str, value: str) -> str:
        return hmac.new(self._key, f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()

    def owner(self, kind: str, owner_id: str) -> str:
        return f"{OWNERS}{kind}:{self._hash(kind, owner_id)}/"

    def device_owner(self, device: nt_pb2.Device) -> str:
        kind = device.WhichOneof("owner")
        return self.owner(kind, getattr(device, kind)) if kind else ""

    def application(self, application_id: str) -> str:
        """The prefix of an application's webhook slots."""
        return f"{APP_WEBHOOKS}{self._hash('application', application_id)}/"

    def topic(self, topic: str) -> str:
        return f"{SUBSCRIPTIONS}{self._hash('topic', topic)}/"
