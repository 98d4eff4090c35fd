"""An application's webhook endpoint as the tests play it (a real HTTP server that
answers the statuses it is told to), and the calls that register a webhook and read its
delivery log."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config
from standardwebhooks.webhooks import Webhook

from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline_server.runtime.embedded_etcd import free_port
from tests.conftest import ServiceProcess, eventually

MATCHED = nt_pb2.WEBHOOK_EVENT_TYPE_HANDOFF_MATCHED


class Receiver:
    """An application's endpoint: answers the statuses it is told to, in order (200 once
    they are used up), and keeps every request."""

    def __init__(self, *answers: tuple[int, dict[str, str]]) -> None:
        self.answers = list(answers)
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self._arrived = asyncio.Condition()
        self.port = free_port()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/accessline"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status, headers = self.answers.pop(0) if self.answers else (200, {})
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
            }
        )
        await send({"type": "http.response.body", "body": b""})
        async with self._arrived:
            self.requests.append(({k.decode(): v.decode() for k, v in scope["headers"]}, body))
            self._arrived.notify_all()

    async def received(self, count: int, timeout: float = 30) -> list[tuple[dict[str, str], bytes]]:
        async with self._arrived:
            await asyncio.wait_for(
                self._arrived.wait_for(lambda: len(self.requests) >= count), timeout
            )
        return self.requests

    async def __aenter__(self) -> Receiver:
        config = Config()
        config.bind = [f"127.0.0.1:{self.port}"]
        config.accesslog = None
        self._task = asyncio.create_task(serve(self, config, shutdown_trigger=self._stop.wait))  # type: ignore[arg-type]

        async def listening() -> bool:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                return False
            writer.close()
            return True

        await eventually(listening, what="the receiver listening")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


async def webhook(
    stub: Any,
    app_id: str,
    url: str,
    *events: int,
    writers: Sequence[ServiceProcess] = (),
    wanted: Sequence[int] = (),
) -> tuple[str, str]:
    """Registers a webhook, then waits until each of the `writers` (the processes where
    events happen) follows that the application's webhooks want `wanted` (its events,
    unless said): from then on, its events are told."""
    reply = await stub.RegisterWebhook(
        nt_pb2.RegisterWebhookRequest(
            webhook=nt_pb2.Webhook(application_id=app_id, url=url, events=events or [MATCHED])
        )
    )
    kinds = wanted or events or [MATCHED]
    names = ",".join(sorted({nt_pb2.WebhookEventType.Name(e) for e in kinds}))  # type: ignore[arg-type]
    for process in writers:
        if process.name.endswith((".callmatching", ".routing")):
            await process.wait_for_log(f'"application_id": "{app_id}", "events": "{names}"')
    return reply.webhook.webhook_id, reply.secret


async def deliveries(stub: Any, webhook_id: str) -> list[Any]:
    reply = await stub.ListWebhookDeliveries(
        nt_pb2.ListWebhookDeliveriesRequest(webhook_id=webhook_id)
    )
    return list(reply.deliveries)


async def settled(stub: Any, webhook_id: str, count: int = 1) -> list[Any]:
    """The webhook's deliveries once `count` of them are no longer pending."""

    async def done() -> list[Any] | None:
        found = await deliveries(stub, webhook_id)
        pending = nt_pb2.WEBHOOK_DELIVERY_STATUS_PENDING
        finished = [d for d in found if d.status != pending]
        return found if len(finished) >= count else None

    return await eventually(done, timeout=30, what="deliveries settled")


def told_types(receiver: Receiver, secret: str, key: str) -> list[tuple[str, str]]:
    """(type, data[key]) of each verified delivery, in the order received."""
    return [
        (event["type"], event["data"].get(key, ""))
        for event in (Webhook(secret).verify(body, headers) for headers, body in receiver.requests)
    ]
