"""Runs the CallMatching service: `python -m accessline_server.callmatching` or
`accessline serve callmatching`."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from accessline.callmatching.v1 import call_matching_pb2, call_matching_pb2_grpc
from accessline.journey.v1 import journey_pb2, journey_pb2_grpc
from accessline.numberdistribution.v1 import number_distribution_pb2, number_distribution_pb2_grpc
from accessline_server.callmatching.crypto import SessionCrypto
from accessline_server.callmatching.domain import CallMatching, Limits
from accessline_server.callmatching.expiry import ExpiryWatcher
from accessline_server.callmatching.failures import FailureLimits
from accessline_server.callmatching.history import MatchHistory
from accessline_server.callmatching.journey.reads import Journey
from accessline_server.callmatching.journey.records import writer_for
from accessline_server.callmatching.journey.servicer import JourneyServicer
from accessline_server.callmatching.servicer import CallMatchingServicer
from accessline_server.callmatching.settings import DEVELOPMENT_SECRET, CallMatchingSettings
from accessline_server.notification import events
from accessline_server.numberdistribution.dialled import CodeHasher, DialledReader
from accessline_server.runtime.server import Registration, RuntimeContext, ServiceSpec, run

log = logging.getLogger("accessline.callmatching")

HISTORY_HEALTH = "accessline.callmatching.v1.MatchHistory"


async def build(context: RuntimeContext) -> Sequence[Registration]:
    settings = context.settings
    assert isinstance(settings, CallMatchingSettings)
    secret = settings.callmatching_secret.get_secret_value()
    if secret == DEVELOPMENT_SECRET:
        log.warning(
            "ACCESSLINE_CALLMATCHING_SECRET is the development default; set a secret of your own"
        )
    meter = context.telemetry.meter("accessline.callmatching")

    async def history_health(ok: bool) -> None:
        await context.report_health(HISTORY_HEALTH, ok)

    journey = Journey(writer_for(settings, meter), settings.history_retention_days)
    await journey.start(settings.history_purge_interval_seconds)
    context.on_stop(journey.stop)
    history = MatchHistory(
        settings.history_dsn,
        create_schema=settings.history_migrate,
        on_health=history_health,
        meter=meter,
    )
    await history.start()
    context.on_stop(history.stop)
    numbers = number_distribution_pb2_grpc.NumberDistributionServiceStub(
        context.channel(
            settings.numberdistribution_address,
            number_distribution_pb2.DESCRIPTOR.services_by_name["NumberDistributionService"],
        )
    )
    domain = CallMatching(
        context.store,
        numbers,
        DialledReader(CodeHasher(settings.numbers_secret.get_secret_value().encode())),
        SessionCrypto(secret.encode()),
        history,
        Limits(
            session_retention=settings.session_retention_seconds,
            failures=FailureLimits(
                caller=settings.ani_failure_limit,
                withheld=settings.withheld_failure_limit,
                number=settings.number_failure_limit,
                window=settings.ani_failure_window_seconds,
            ),
            default_region=settings.default_region,
            late_call_window=settings.late_call_window_seconds,
        ),
        meter=meter,
        journey=journey,
    )
    expiry = ExpiryWatcher(context.store, settings.session_retention_seconds, journey)
    expiry.start()
    context.on_stop(expiry.stop)
    # Webhook events only for the applications whose webhooks want them.
    context.on_stop(events.follow(context.store).stop)
    return [
        Registration(
            servicer=CallMatchingServicer(domain),
            add_to_server=call_matching_pb2_grpc.add_CallMatchingServiceServicer_to_server,
            descriptor=call_matching_pb2.DESCRIPTOR.services_by_name["CallMatchingService"],
        ),
        Registration(
            servicer=JourneyServicer(journey),
            add_to_server=journey_pb2_grpc.add_JourneyServiceServicer_to_server,
            descriptor=journey_pb2.DESCRIPTOR.services_by_name["JourneyService"],
        ),
    ]


SPEC = ServiceSpec(name="callmatching", build=build)


def main() -> None:
    run(SPEC, CallMatchingSettings)


if __name__ == "__main__":
    main()
