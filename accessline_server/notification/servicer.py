"""gRPC methods of NotificationService: validate the request, call the domain, map the
answer. Domain errors become statuses in the runtime's error interceptor."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline.notification.v1 import notification_pb2_grpc as nt_grpc
from accessline_server.notification import journal
from accessline_server.notification.domain import Notifications
from accessline_server.notification.links import Links
from accessline_server.notification.webhook_delivery import EVENT_NAMES
from accessline_server.notification.webhooks import (
    DEFAULT_OVERLAP_SECONDS,
    MAX_OVERLAP_SECONDS,
    Webhooks,
)
from accessline_server.runtime import identity
from accessline_server.runtime.server import ServicerContext
from accessline_server.runtime.validation import Violations

TOPIC = re.compile(r"^[A-Za-z0-9_.:/\-]{1,128}$")
# Payload data carries ids only: keys name an id, values look like one.
DATA_KEY = re.compile(r"^[a-z][a-z0-9_]{0,62}_id$|^event$|^status$")
DATA_VALUE = re.compile(r"^[A-Za-z0-9_.:\-]{1,256}$")
# A value of digits alone, four or more, could be an access code or a phone number: a
# push travels through Apple's or Google's servers and shows on a locked screen.
CODE_OR_NUMBER = re.compile(r"^[0-9][0-9 .\-]{3,}$")
DEFAULT_TTL = 3600.0
WEBHOOK_EVENTS = set(EVENT_NAMES)
MAX_TTL = 28 * 86400.0


def _owner(v: Violations, customer_id: str, agent_id: str, prefix: str) -> None:
    if bool(customer_id) == bool(agent_id):
        v.add(f"{prefix}owner", "exactly one of customer_id and agent_id")
    v.text(f"{prefix}customer_id", customer_id, 128)
    v.id(f"{prefix}agent_id", agent_id, required=False)


class NotificationServicer(nt_grpc.NotificationServiceServicer):
    """The NotificationService contract on top of the domain."""

    def __init__(
        self,
        notifications: Notifications,
        webhooks: Webhooks,
        stopping: asyncio.Event,
        links: Links,
    ) -> None:
        self._n = notifications
        self._webhooks = webhooks
        self._stopping = stopping
        self._links = links

    async def SendLink(
        self, request: nt_pb2.SendLinkRequest, context: ServicerContext
    ) -> nt_pb2.SendLinkResponse:
        v = Violations()
        v.id("interaction_id", request.interaction_id)
        for violation in self._links.url_violations(request.url, "url"):
            v.add(violation.field, violation.description)
        v.text("title", request.title, 256)
        v.raise_if_any()
        caller = identity.current()
        return await self._links.send(
            caller.subject, request.interaction_id, request.url, request.title
        )

    async def RegisterDevice(
        self, request: nt_pb2.RegisterDeviceRequest, context: ServicerContext
    ) -> nt_pb2.RegisterDeviceResponse:
        d = request.device
        v = Violations()
        v.id("device.device_id", d.device_id, required=False)
        _owner(v, d.customer_id, d.agent_id, "device.")
        v.id("device.application_id", d.application_id)
        if d.platform not in (nt_pb2.PLATFORM_APNS, nt_pb2.PLATFORM_FCM, nt_pb2.PLATFORM_IN_APP):
            v.add("device.platform", "must be APNS, FCM or IN_APP")
        push = d.platform in (nt_pb2.PLATFORM_APNS, nt_pb2.PLATFORM_FCM)
        v.text("device.push_token", d.push_token, 4096, required=push)
        if push and any(c in d.push_token for c in "/ ?#"):
            v.add("device.push_token", "must not contain '/', '?', '#' or spaces")
        v.text("device.locale", d.locale, 35)
        v.raise_if_any()
        return nt_pb2.RegisterDeviceResponse(device=await self._n.register_device(d))

    async def UnregisterDevice(
        self, request: nt_pb2.UnregisterDeviceRequest, context: ServicerContext
    ) -> nt_pb2.UnregisterDeviceResponse:
        v = Violations()
        v.id("device_id", request.device_id)
        v.raise_if_any()
        await self._n.unregister_device(request.device_id)
        return nt_pb2.UnregisterDeviceResponse()

    async def Subscribe(
        self, request: nt_pb2.SubscribeRequest, context: ServicerContext
    ) -> nt_pb2.SubscribeResponse:
        v = Violations()
        if not TOPIC.match(request.topic):
            v.add("topic", "must be 1 to 128 characters of [A-Za-z0-9_.:/-]")
        if bool(request.customer_id) == bool(request.device_id):
            v.add("subscriber", "exactly one of customer_id and device_id")
        v.text("customer_id", request.customer_id, 128)
        v.id("device_id", request.device_id, required=False)
        v.raise_if_any()
        sub = await self._n.subscribe(request.topic, request.customer_id, request.device_id)
        return nt_pb2.SubscribeResponse(subscription_id=sub)

    async def Unsubscribe(
        self, request: nt_pb2.UnsubscribeRequest, context: ServicerContext
    ) -> nt_pb2.UnsubscribeResponse:
        v = Violations()
        v.id("subscription_id", request.subscription_id)
        v.raise_if_any()
        await self._n.unsubscribe(request.subscription_id)
        return nt_pb2.UnsubscribeResponse()

    async def Publish(
        self, request: nt_pb2.PublishRequest, context: ServicerContext
    ) -> nt_pb2.PublishResponse:
        v = Violations()
        target = request.WhichOneof("target")
        if target is None:
            v.add("target", "a topic or a customer_id")
        elif target == "topic" and not TOPIC.match(request.topic):
            v.add("topic", "must be 1 to 128 characters of [A-Za-z0-9_.:/-]")
        v.text("customer_id", request.customer_id, 128)
        if request.event_type not in nt_pb2.EventType.values() or not request.event_type:
            v.add("event_type", "must be one of the EVENT_TYPE_ values")
        v.text("title", request.title, 256)
        v.text("body", request.body, 2048)
        if len(request.data) > 16:
            v.add("data", "must have at most 16 entries")
        for key, value in sorted(request.data.items())[:17]:
            if not DATA_KEY.match(key):
                v.add(
                    f"data[{key[:70]}]",
                    "keys name an id (for example session_id): payloads carry ids only",
                )
            elif not DATA_VALUE.match(value):
                v.add(f"data[{key}]", "values are ids of at most 256 characters of [A-Za-z0-9_.:-]")
            elif CODE_OR_NUMBER.match(value):
                v.add(
                    f"data[{key}]",
                    "looks like an access code or a phone number, which a push never carries",
                )
        v.text("idempotency_key", request.idempotency_key, 128)
        ttl = v.duration("ttl", request.ttl, 1, MAX_TTL) if request.HasField("ttl") else DEFAULT_TTL
        if request.priority not in nt_pb2.Priority.values():
            v.add("priority", "unknown priority")
        v.text("collapse_key", request.collapse_key, 64)
        v.id("application_id", request.application_id, required=False)
        if request.application_id and target != "customer_id":
            v.add("application_id", "names the application of a customer_id target only")
        v.raise_if_any()
        if request.application_id:
            identity.require_application(request.application_id, "the customer told")
        published = await self._n.publish(request, ttl, application_id=request.application_id)
        if not published.duplicate:
            journal.notification(request, published.notification_id)
        return published

    async def StreamNotifications(
        self, request: nt_pb2.StreamNotificationsRequest, context: ServicerContext
    ) -> AsyncIterator[nt_pb2.StreamNotificationsResponse]:
        v = Violations()
        v.id("device_id", request.device_id)
        v.raise_if_any()
        async for message in self._n.stream(request.device_id, self._stopping):
            yield message

    async def AcknowledgeNotifications(
        self, request: nt_pb2.AcknowledgeNotificationsRequest, context: ServicerContext
    ) -> nt_pb2.AcknowledgeNotificationsResponse:
        v = Violations()
        v.id("device_id", request.device_id)
        if len(request.notification_ids) > 1000:
            v.add("notification_ids", "must have at most 1,000 entries")
        for i, notification_id in enumerate(request.notification_ids[:1000]):
            v.id(f"notification_ids[{i}]", notification_id)
        v.raise_if_any()
        count = await self._n.acknowledge(request.device_id, request.notification_ids)
        return nt_pb2.AcknowledgeNotificationsResponse(acknowledged=count)

    async def GetDelivery(
        self, request: nt_pb2.GetDeliveryRequest, context: ServicerContext
    ) -> nt_pb2.GetDeliveryResponse:
        v = Violations()
        v.id("notification_id", request.notification_id)
        v.raise_if_any()
        return nt_pb2.GetDeliveryResponse(
            deliveries=await self._n.deliveries(request.notification_id)
        )

    # -- webhooks ---------------------------------------------------------------------

    async def RegisterWebhook(
        self, request: nt_pb2.RegisterWebhookRequest, context: ServicerContext
    ) -> nt_pb2.RegisterWebhookResponse:
        w = request.webhook
        v = Violations()
        v.id("webhook.webhook_id", w.webhook_id, required=False)
        v.id("webhook.application_id", w.application_id)
        v.items.extend(self._webhooks.reach.url_violations(w.url, "webhook.url"))
        if not w.events or len(w.events) > len(WEBHOOK_EVENTS):
            v.add("webhook.events", f"must name 1 to {len(WEBHOOK_EVENTS)} events")
        for i, event in enumerate(w.events):
            if event not in WEBHOOK_EVENTS:
                v.add(f"webhook.events[{i}]", "unknown event")
        v.raise_if_any()
        shown, secret = await self._webhooks.register(w)
        return nt_pb2.RegisterWebhookResponse(webhook=shown, secret=secret)

    async def GetWebhook(
        self, request: nt_pb2.GetWebhookRequest, context: ServicerContext
    ) -> nt_pb2.GetWebhookResponse:
        v = Violations()
        v.id("webhook_id", request.webhook_id)
        v.raise_if_any()
        stored, _ = await self._webhooks.stored(request.webhook_id)
        return nt_pb2.GetWebhookResponse(webhook=stored.webhook)

    async def RotateWebhookSecret(
        self, request: nt_pb2.RotateWebhookSecretRequest, context: ServicerContext
    ) -> nt_pb2.RotateWebhookSecretResponse:
        v = Violations()
        v.id("webhook_id", request.webhook_id)
        overlap = DEFAULT_OVERLAP_SECONDS
        if request.HasField("previous_valid_for"):
            overlap = v.duration(
                "previous_valid_for", request.previous_valid_for, 0, MAX_OVERLAP_SECONDS
            )
        v.raise_if_any()
        secret = await self._webhooks.rotate(request.webhook_id, overlap)
        return nt_pb2.RotateWebhookSecretResponse(secret=secret)

    async def DeleteWebhook(
        self, request: nt_pb2.DeleteWebhookRequest, context: ServicerContext
    ) -> nt_pb2.DeleteWebhookResponse:
        v = Violations()
        v.id("webhook_id", request.webhook_id)
        v.raise_if_any()
        await self._webhooks.delete(request.webhook_id)
        return nt_pb2.DeleteWebhookResponse()

    async def ListWebhookDeliveries(
        self, request: nt_pb2.ListWebhookDeliveriesRequest, context: ServicerContext
    ) -> nt_pb2.ListWebhookDeliveriesResponse:
        v = Violations()
        v.id("webhook_id", request.webhook_id)
        size = v.page("page_size", request.page_size, 500, 100)
        v.text("page_token", request.page_token, 128)
        v.raise_if_any()
        found, token = await self._webhooks.deliveries(request.webhook_id, size, request.page_token)
        return nt_pb2.ListWebhookDeliveriesResponse(deliveries=found, next_page_token=token)
