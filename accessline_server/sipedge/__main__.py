"""Runs the SIP adapter: `python -m accessline_server.sipedge` (settings in ACCESSLINE_*)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from pathlib import Path
from typing import Any

import grpc
from opentelemetry import metrics
from pydantic import ValidationError

from accessline.routing.v1 import routing_pb2_grpc as rt_grpc
from accessline_server.runtime.backoff import Backoff
from accessline_server.runtime.logs import setup_logging
from accessline_server.runtime.peers import peer_target
from accessline_server.runtime.server import accessline_version
from accessline_server.runtime.telemetry import client_interceptors, setup_telemetry
from accessline_server.sipedge.adapter import Adapter, reject
from accessline_server.sipedge.evapi import FramingError, encode, read_message
from accessline_server.sipedge.health import serve_health
from accessline_server.sipedge.settings import SipEdgeSettings

log = logging.getLogger("accessline.sipedge")
# Whether the event socket is connected (the gauge `accessline.sipedge.connected`).
CONNECTED = [0]
# The Retry-After of the calls a stopping adapter refuses.
RESTART_RETRY_SECONDS = 5.0


def routing_channel(settings: SipEdgeSettings) -> grpc.aio.Channel:
    """Routing's replicas (balanced round-robin) over mutual TLS with the switch's bearer
    token; in plain text only when no TLS files are set (a development run on loopback)."""
    token = settings.token()
    target = peer_target(settings.routing_address)
    options = [("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]}))]
    traced = client_interceptors()
    if not settings.tls_ca_file:
        return grpc.aio.insecure_channel(target, options=options, interceptors=traced)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(settings.tls_ca_file).read_bytes(),
        private_key=Path(settings.tls_key_file).read_bytes() if settings.tls_key_file else None,
        certificate_chain=Path(settings.tls_cert_file).read_bytes()
        if settings.tls_cert_file
        else None,
    )
    if token:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(token)
        )
    return grpc.aio.secure_channel(
        target,
        credentials,
        options=[*options, ("grpc.ssl_target_name_override", "routing")],
        interceptors=traced,
    )


async def serve_connection(settings: SipEdgeSettings, routing: Any) -> None:
    """One connection to Kamailio's event socket, until it ends."""
    host, port = settings.sipedge_evapi_address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    lock = asyncio.Lock()

    async def send(message: dict[str, Any]) -> None:
        async with lock:
            writer.write(encode(message))
            await writer.drain()

    adapter = Adapter(settings, routing, send)
    CONNECTED[0] = 1
    where = {"address": f"{host}:{port}"}
    log.info("connected to Kamailio's event socket", extra={"fields": where})
    try:
        while (message := await read_message(reader)) is not None:
            adapter.receive(message)
    finally:
        CONNECTED[0] = 0
        held = [c for c in adapter.calls.values() if c.task is not None and not c.task.done()]
        for call in held:
            assert call.task is not None
            call.task.cancel()
        # Calls still held are refused rather than left waiting for an answer that will
        # not come (when the connection itself broke, there is nobody to tell).
        with contextlib.suppress(OSError, ConnectionError):
            for call in held:
                refusal = reject(503, "Service Unavailable", RESTART_RETRY_SECONDS)
                writer.write(encode({"index": call.index, "label": call.label, **refusal}))
            await writer.drain()
        writer.close()


async def main() -> None:
    try:
        settings = SipEdgeSettings()
    except ValidationError as exc:
        raise SystemExit(f"bad settings: {exc}") from None
    setup_logging("sipedge", settings.log_level)
    telemetry = setup_telemetry(
        "sipedge",
        accessline_version(),
        metrics_host=settings.sipedge_metrics_host,
        metrics_port=settings.sipedge_metrics_port,
        sample_ratio=settings.trace_sample_ratio,
    )
    metrics.get_meter("accessline.sipedge").create_observable_gauge(
        "accessline.sipedge.connected",
        [lambda _: [metrics.Observation(CONNECTED[0])]],
        description="1 while the adapter is connected to Kamailio's event socket",
    )
    health = None
    if settings.sipedge_health_port:
        health = await serve_health(
            settings.sipedge_health_host, settings.sipedge_health_port, lambda: CONNECTED[0] == 1
        )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    backoff = Backoff(0.1, 5.0)
    async with routing_channel(settings) as channel:
        routing = rt_grpc.RoutingServiceStub(channel)
        while not stopping.is_set():
            connection = asyncio.create_task(serve_connection(settings, routing))
            stop = asyncio.create_task(stopping.wait())
            await asyncio.wait({connection, stop}, return_when=asyncio.FIRST_COMPLETED)
            if stopping.is_set():
                connection.cancel()
                # Its held calls are refused on the way out.
                await asyncio.gather(connection, return_exceptions=True)
                break
            stop.cancel()
            try:
                connection.result()
                backoff.reset()
            except (OSError, FramingError) as exc:
                log.warning(
                    "Kamailio's event socket is unreachable; retrying",
                    extra={"fields": {"error": str(exc)}},
                )
            await asyncio.sleep(backoff.next())
    if health is not None:
        health.close()
    telemetry.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
