"""Notification fan-out: one topic with many FCM and APNs devices, a few publishes, and
the time from Publish to each provider request at local HTTP/2 provider servers; next to
the same number of HTTP/2 requests sent straight to those servers (httpx, same
concurrency) in the same run.

    python -m bench.notification_bench [--devices 10000] [--publishes 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import httpx

from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline.notification.v1 import notification_pb2_grpc as nt_grpc
from accessline_server.runtime.embedded_etcd import free_port
from bench.common import Result, embedded_etcd, print_table, service_process
from tests.support.push_servers import PushServers, make_credentials


async def raw_requests(port: int, ca_file: Path, count: int, concurrency: int) -> Result:
    latencies: list[float] = []
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(http2=True, verify=str(ca_file)) as client:

        async def one(i: int) -> None:
            body = json.dumps(
                {"message": {"token": f"ok-raw-{i}", "notification": {"title": "t", "body": "b"}}}
            )
            async with gate:
                started = time.perf_counter()
                await client.post(
                    f"https://127.0.0.1:{port}/v1/projects/accessline-test/messages:send",
                    content=body,
                )
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(count)))
        elapsed = time.perf_counter() - started
    return Result(
        f"raw HTTP/2 request to the provider ({concurrency} at once)", count, elapsed, latencies
    )


async def main(devices: int, publishes: int) -> None:
    with tempfile.TemporaryDirectory(prefix="accessline-bench-push-") as folder:
        await fan_out(Path(folder), devices, publishes)


async def fan_out(folder: Path, devices: int, publishes: int) -> None:
    port = free_port()
    servers = PushServers(make_credentials(folder, port))
    stop = asyncio.Event()
    server_task = asyncio.create_task(servers.run(port, stop))
    creds = servers.credentials
    settings = {
        "ACCESSLINE_APNS_URL": f"https://127.0.0.1:{port}",
        "ACCESSLINE_APNS_KEY_FILE": str(creds.apns_key_file),
        "ACCESSLINE_APNS_KEY_ID": "KEY123",
        "ACCESSLINE_APNS_TEAM_ID": "TEAM456",
        "ACCESSLINE_APNS_TOPIC": "com.example.bank",
        "ACCESSLINE_FCM_URL": f"https://127.0.0.1:{port}",
        "ACCESSLINE_FCM_SERVICE_ACCOUNT_FILE": str(creds.fcm_account_file),
        "ACCESSLINE_PUSH_CA_FILE": str(creds.ca_file),
    }
    await servers.ready(port)
    baseline = await raw_requests(port, creds.ca_file, devices, 16)
    servers.requests.clear()
    servers.seen_tokens.clear()
    async with embedded_etcd() as etcd:  # noqa: SIM117 - the service needs the etcd first
        async with (
            service_process(
                "accessline_server.notification", etcd, "/bench", **settings
            ) as address,
            grpc.aio.insecure_channel(address) as channel,
        ):
            stub: Any = nt_grpc.NotificationServiceStub(channel)
            gate = asyncio.Semaphore(64)

            async def register(i: int) -> None:
                platform = nt_pb2.PLATFORM_FCM if i % 2 else nt_pb2.PLATFORM_APNS
                device = nt_pb2.Device(
                    customer_id=f"c{i}",
                    application_id="bank",
                    platform=platform,
                    push_token=f"ok-{i}",
                )
                async with gate:
                    reply = await stub.RegisterDevice(nt_pb2.RegisterDeviceRequest(device=device))
                    await stub.Subscribe(
                        nt_pb2.SubscribeRequest(topic="news", device_id=reply.device.device_id)
                    )

            await asyncio.gather(*(register(i) for i in range(devices)))
            latencies: list[float] = []
            started = time.perf_counter()
            for n in range(publishes):
                servers.requests.clear()
                sent_at = time.time()
                reply = await stub.Publish(
                    nt_pb2.PublishRequest(
                        topic="news",
                        event_type=nt_pb2.EVENT_TYPE_GENERIC,
                        title=f"News {n}",
                        body="Hello",
                    ),
                    timeout=600,
                )
                assert reply.device_count == devices
                await servers.wait_for_requests(devices)
                latencies += [r.at - sent_at for r in servers.requests if r.path != "/token"]
            elapsed = time.perf_counter() - started
    ours = Result(
        f"Publish to {devices:,} devices: publish to provider request",
        devices * publishes,
        elapsed,
        latencies,
    )
    stop.set()
    await server_task
    print_table("notification fan-out (ops/s = deliveries per second)", [baseline, ours], baseline)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--publishes", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(main(args.devices, args.publishes))
