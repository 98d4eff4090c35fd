"""Runs the Routing service: `python -m accessline_server.routing` or `accessline serve routing`."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import socket
from collections.abc import Sequence

from accessline.callmatching.v1 import call_matching_pb2, call_matching_pb2_grpc
from accessline.notification.v1 import notification_pb2, notification_pb2_grpc
from accessline.presence.v1 import presence_pb2, presence_pb2_grpc
from accessline.routing.storage.v1.storage_pb2 import AgentHold
from accessline.routing.v1 import routing_pb2, routing_pb2_grpc
from accessline_server.callmatching.journey import records
from accessline_server.notification import events
from accessline_server.presence.roster import Sealing
from accessline_server.routing import keys as rt_keys
from accessline_server.routing.callbacks import Callbacks
from accessline_server.routing.dispatch import Dispatcher
from accessline_server.routing.domain import Router
from accessline_server.routing.notify import NotifyRequests
from accessline_server.routing.offerfeed import OfferFeed
from accessline_server.routing.queue import Rules, parse_value_rules
from accessline_server.routing.servicer import RoutingServicer
from accessline_server.routing.settings import RoutingSettings
from accessline_server.runtime.audit import AuditEvent
from accessline_server.runtime.prefixview import PrefixView
from accessline_server.runtime.sealing import Sealer
from accessline_server.runtime.server import Registration, RuntimeContext, ServiceSpec, run

SEAL_PURPOSE = b"accessline routing seal v1"


def rules_from(settings: RoutingSettings) -> Rules:
    return Rules(
        offer_timeout=settings.routing_offer_timeout_seconds,
        default_group=settings.routing_default_group,
        skill_weight=settings.routing_skill_weight,
        language_weight=settings.routing_language_weight,
        proximity_weight=settings.routing_proximity_weight,
        owner_wait=settings.routing_owner_wait_seconds,
        no_answer_limit=settings.routing_no_answer_limit,
        value_rules=parse_value_rules(settings.routing_value_rules),
        default_value=settings.routing_default_value,
        default_sla=settings.routing_default_sla_seconds,
        priority_per_second=settings.routing_priority_per_second,
        max_queue=settings.routing_max_queue_seconds,
        average_handle=settings.routing_average_handle_seconds,
        queue_update=settings.routing_queue_update_seconds,
        dispatch_interval=settings.routing_dispatch_interval_seconds,
        leader_lease=settings.routing_leader_lease_seconds,
        hold=settings.routing_hold_seconds,
        notify_max=settings.routing_notify_max_hours * 3600,
        callback_max_attempts=settings.routing_callback_max_attempts,
        callback_retry=settings.routing_callback_retry_seconds,
        callback_dial_timeout=settings.routing_callback_dial_timeout_seconds,
        callback_retention=settings.routing_callback_retention_hours * 3600,
        resume_window=settings.routing_resume_seconds,
        redirect_window=settings.routing_redirect_seconds,
        max_queue_length=settings.routing_max_queue_length,
    )


def audit_rules(context: RuntimeContext, settings: RoutingSettings, rules: Rules) -> None:
    """The value rules come from a setting, so they change with a deploy: each replica's
    start records the rules in force (their digest) in the audit trail."""
    digest = hashlib.sha256(settings.routing_value_rules.encode()).hexdigest()
    context.audit.record(
        AuditEvent(
            action="value_rules.load",
            method="",
            target=f"sha256:{digest[:16]} ({len(rules.value_rules)} rules)",
            outcome="OK",
            service="routing",
        )
    )


async def build(context: RuntimeContext) -> Sequence[Registration]:
    settings = context.settings
    assert isinstance(settings, RoutingSettings)
    matching = call_matching_pb2_grpc.CallMatchingServiceStub(
        context.channel(
            settings.callmatching_address,
            call_matching_pb2.DESCRIPTOR.services_by_name["CallMatchingService"],
        )
    )
    presence = presence_pb2_grpc.PresenceServiceStub(
        context.channel(
            settings.presence_address,
            presence_pb2.DESCRIPTOR.services_by_name["PresenceService"],
        )
    )
    notification = notification_pb2_grpc.NotificationServiceStub(
        context.channel(
            settings.notification_address,
            notification_pb2.DESCRIPTOR.services_by_name["NotificationService"],
        )
    )
    rules = rules_from(settings)
    audit_rules(context, settings, rules)
    meter = context.telemetry.meter("accessline.routing")
    replica = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"
    # Everything that makes work for the dispatch leader rings this doorbell; the
    # dispatcher of this replica (leading or not) waits on it.
    doorbell = asyncio.Event()
    wake = doorbell.set
    sealer = Sealer(settings.routing_secret.get_secret_value().encode(), SEAL_PURPOSE)
    callbacks = Callbacks(context.store, notification, rules, sealer, wake)
    # The answers to offers, from one watch for the calls and the leader's settles.
    offers = OfferFeed(context.store)
    offers.start()
    context.on_stop(offers.stop)
    dispatcher = Dispatcher(
        context.store,
        matching,
        notification,
        rules,
        sealer,
        Sealing(settings.presence_secret.get_secret_value().encode()),
        replica,
        on_accepted_callback=callbacks.accepted,
        sweep=callbacks.sweep,
        meter=meter,
        doorbell=doorbell,
        offers=offers,
    )
    holds = PrefixView(context.store, rt_keys.HOLDS, AgentHold)
    holds.start()
    context.on_stop(holds.stop)
    router = Router(
        context.store,
        matching,
        presence,
        rules,
        sealer,
        context.stopping,
        wake,
        meter=meter,
        holds=holds,
        offers=offers,
    )
    dispatcher.start()
    context.on_stop(dispatcher.stop)
    context.on_stop(events.follow(context.store).stop)  # events only for webhooks that want them
    context.on_stop((await records.open_for_process(settings, meter)).stop)
    return [
        Registration(
            servicer=RoutingServicer(
                router,
                callbacks,
                NotifyRequests(context.store, rules, sealer, wake),
                context.stopping,
            ),
            add_to_server=routing_pb2_grpc.add_RoutingServiceServicer_to_server,
            descriptor=routing_pb2.DESCRIPTOR.services_by_name["RoutingService"],
        )
    ]


SPEC = ServiceSpec(name="routing", build=build)


def main() -> None:
    run(SPEC, RoutingSettings)


if __name__ == "__main__":
    main()
