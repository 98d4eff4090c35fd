"""Runs the Presence service: `python -m accessline_server.presence` or
`accessline serve presence`."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from accessline.presence.v1 import presence_pb2, presence_pb2_grpc
from accessline_server.presence.directory import Directory
from accessline_server.presence.hub import Hub
from accessline_server.presence.roster import DEVELOPMENT_SECRET, Sealing
from accessline_server.presence.servicer import PresenceServicer
from accessline_server.presence.session import Limits
from accessline_server.presence.sessions import Sessions
from accessline_server.presence.settings import PresenceSettings, reason_codes
from accessline_server.runtime.pages import Site
from accessline_server.runtime.server import Registration, RuntimeContext, ServiceSpec, run

log = logging.getLogger("accessline.presence")
CONSOLE = Path(__file__).resolve().parent / "console"


async def build(context: RuntimeContext) -> Sequence[Registration]:
    settings = context.settings
    assert isinstance(settings, PresenceSettings)
    secret = settings.presence_secret.get_secret_value()
    if secret == DEVELOPMENT_SECRET:
        log.warning(
            "ACCESSLINE_PRESENCE_SECRET is the development default; set a secret of your own"
        )
    sealing = Sealing(secret.encode())
    # The agent console (console/, built by npm) on the web port, when one is open.
    settings_for_page = {"notificationUrl": settings.presence_console_notification_url}
    context.web_pages["/console/"] = Site(
        CONSOLE,
        {"config.json": json.dumps(settings_for_page).encode()},
        tuple(filter(None, [settings.presence_console_notification_url])),
    )
    if settings.web_port and not CONSOLE.is_dir():
        log.warning("the agent console is not built (make console): /console/ answers 404")
    hub = Hub(context.store, context.telemetry.meter("accessline.presence"))
    await hub.start()
    context.on_stop(hub.stop)
    directory = Directory(
        context.store,
        sealing,
        max_watchers=settings.presence_max_watchers,
        resume_revisions=settings.presence_resume_revisions,
        feed=hub.feed,
    )
    sessions = Sessions(
        context.store,
        hub,
        directory,
        Limits(
            lease_seconds=settings.presence_lease_seconds,
            heartbeat_timeout=settings.presence_heartbeat_timeout_seconds,
            sealing=sealing,
            max_interaction=settings.presence_max_interaction_hours * 3600,
            login_timeout=settings.presence_login_timeout_seconds,
            not_ready_reasons=reason_codes(settings.presence_not_ready_reasons),
        ),
        context.telemetry.meter("accessline.presence"),
    )
    return [
        Registration(
            servicer=PresenceServicer(directory, sessions, context.stopping),
            add_to_server=presence_pb2_grpc.add_PresenceServiceServicer_to_server,
            descriptor=presence_pb2.DESCRIPTOR.services_by_name["PresenceService"],
        )
    ]


SPEC = ServiceSpec(name="presence", build=build)


def main() -> None:
    run(SPEC, PresenceSettings)


if __name__ == "__main__":
    main()
