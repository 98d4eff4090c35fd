"""Runs the Notification service: `python -m accessline_server.notification` or
`accessline serve notification`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accessline.notification.v1 import notification_pb2, notification_pb2_grpc
from accessline_server.callmatching.journey import records
from accessline_server.notification.delivery import Provider, Worker
from accessline_server.notification.domain import Notifications, Policy
from accessline_server.notification.links import Links
from accessline_server.notification.providers import Apns, Fcm
from accessline_server.notification.servicer import NotificationServicer
from accessline_server.notification.settings import NotificationSettings
from accessline_server.notification.survey_worker import SurveyWorker
from accessline_server.notification.webhook_delivery import (
    WebhookPolicy,
    WebhookSender,
    WebhookWorker,
)
from accessline_server.notification.webhooks import Reach, Webhooks
from accessline_server.runtime.server import Registration, RuntimeContext, ServiceSpec, run

log = logging.getLogger("accessline.notification")


def present(path: str) -> bool:
    """A credential file is configured and there (read once, at start)."""
    return bool(path) and Path(path).is_file()


def webhook_parts(
    context: RuntimeContext, settings: NotificationSettings, secret: bytes, meter: Any
) -> tuple[Webhooks, WebhookSender, WebhookWorker]:
    """The webhook registry, the sender and the delivery worker, as the settings say."""
    reach = Reach(
        allow_http=settings.webhook_allow_http,
        allow_private=settings.webhook_allow_private_networks,
    )
    if settings.environment == "production" and (reach.allow_http or reach.allow_private):
        log.warning(
            "webhooks may point to plain http or private networks in production",
            extra={
                "fields": {"allow_http": reach.allow_http, "allow_private": reach.allow_private}
            },
        )
    webhooks = Webhooks(context.store, secret, reach)
    sender = WebhookSender(reach, settings.webhook_timeout_seconds, settings.webhook_ca_file)
    worker = WebhookWorker(
        context.store,
        webhooks,
        sender,
        WebhookPolicy(
            max_attempts=settings.webhook_max_attempts,
            backoff_first=settings.webhook_backoff_seconds,
            retention=settings.webhook_retention_seconds,
        ),
        lease_seconds=settings.delivery_worker_lease_seconds,
        meter=meter,
    )
    return webhooks, sender, worker


async def build(context: RuntimeContext) -> Sequence[Registration]:
    settings = context.settings
    assert isinstance(settings, NotificationSettings)
    meter = context.telemetry.meter("accessline.notification")
    policy = Policy(
        retention=settings.notification_retention_seconds,
        max_attempts=settings.delivery_max_attempts,
        backoff_base=settings.delivery_backoff_seconds,
        streams_per_device=settings.notification_streams_per_device,
    )
    providers: dict[int, Provider] = {}
    # A configured credential file that is missing (an optional Secret not created)
    # turns that provider off with a warning rather than stopping the service.
    for name, path in (
        ("APNs", settings.apns_key_file),
        ("FCM", settings.fcm_service_account_file),
    ):
        if path and not present(path):
            log.warning(
                "%s credentials not found; %s is off", name, name, extra={"fields": {"path": path}}
            )
    if present(settings.apns_key_file):
        providers[notification_pb2.PLATFORM_APNS] = Apns(
            settings.apns_url,
            settings.apns_key_file,
            settings.apns_key_id,
            settings.apns_team_id,
            settings.apns_topic,
            settings.push_ca_file,
        )
    if present(settings.fcm_service_account_file):
        providers[notification_pb2.PLATFORM_FCM] = Fcm(
            settings.fcm_url, settings.fcm_service_account_file, settings.push_ca_file
        )
    secret = settings.notification_secret.get_secret_value()
    notifications = Notifications(context.store, policy, secret.encode(), meter)
    worker = Worker(
        context.store,
        notifications,
        providers,
        policy,
        lease_seconds=settings.delivery_worker_lease_seconds,
        meter=meter,
    )
    await worker.start()
    webhooks, sender, webhook_worker = webhook_parts(context, settings, secret.encode(), meter)
    await webhook_worker.start()

    async def stop() -> None:
        await worker.stop()
        await webhook_worker.stop()
        await sender.close()
        for provider in providers.values():
            await provider.close()

    context.on_stop(stop)
    context.on_stop((await records.open_for_process(settings, meter)).stop)
    survey_worker = SurveyWorker(context.store, notifications)
    survey_worker.start()
    context.on_stop(survey_worker.stop)
    return [
        Registration(
            servicer=NotificationServicer(
                notifications,
                webhooks,
                context.stopping,
                Links(
                    context.store,
                    notifications,
                    tuple(o.strip() for o in settings.notification_link_origins.split(",") if o),
                    settings.notification_links_per_interaction,
                ),
            ),
            add_to_server=notification_pb2_grpc.add_NotificationServiceServicer_to_server,
            descriptor=notification_pb2.DESCRIPTOR.services_by_name["NotificationService"],
        )
    ]


SPEC = ServiceSpec(name="notification", build=build)


def main() -> None:
    run(SPEC, NotificationSettings)


if __name__ == "__main__":
    main()
