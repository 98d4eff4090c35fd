"""Runs the NumberDistribution service: `python -m accessline_server.numberdistribution` or
`accessline serve numberdistribution`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from accessline.numberdistribution.v1 import number_distribution_pb2, number_distribution_pb2_grpc
from accessline_server.numberdistribution.codes import CodeBook
from accessline_server.numberdistribution.pools import Pools
from accessline_server.numberdistribution.reserving import Reservations
from accessline_server.numberdistribution.servicer import NumberDistributionServicer
from accessline_server.numberdistribution.settings import (
    DEVELOPMENT_SECRET,
    NumberDistributionSettings,
)
from accessline_server.numberdistribution.view import NumberView
from accessline_server.runtime.server import Registration, RuntimeContext, ServiceSpec, run

log = logging.getLogger("accessline.numberdistribution")


async def build(context: RuntimeContext) -> Sequence[Registration]:
    settings = context.settings
    assert isinstance(settings, NumberDistributionSettings)
    secret = settings.numbers_secret.get_secret_value()
    if secret == DEVELOPMENT_SECRET:
        log.warning(
            "ACCESSLINE_NUMBERS_SECRET is the development default; set a secret of your own"
        )
    view = NumberView(context.store)
    await view.start()
    context.on_stop(view.stop)
    meter = context.telemetry.meter("accessline.numberdistribution")
    pools = Pools(context.store, view, meter=meter)
    codes = CodeBook(secret.encode())
    # CallMatching checks callers' digits with the same key: it compares this check.
    published = asyncio.create_task(codes.publish_key_check(context.store), name="code-key")
    # Published before serving when etcd answers; later, in the background, when not.
    await asyncio.wait({published}, timeout=2.0)

    async def stop_publishing() -> None:
        published.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await published

    context.on_stop(stop_publishing)
    reservations = Reservations(
        context.store,
        view,
        codes,
        attempts=settings.numbers_reserve_attempts,
        code_memory=settings.numbers_code_memory_seconds,
        meter=meter,
    )
    return [
        Registration(
            servicer=NumberDistributionServicer(pools, reservations),
            add_to_server=number_distribution_pb2_grpc.add_NumberDistributionServiceServicer_to_server,
            descriptor=number_distribution_pb2.DESCRIPTOR.services_by_name[
                "NumberDistributionService"
            ],
        )
    ]


SPEC = ServiceSpec(name="numberdistribution", build=build)


def main() -> None:
    run(SPEC, NumberDistributionSettings)


if __name__ == "__main__":
    main()
