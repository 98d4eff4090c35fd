"""Signed webhooks for applications' backends: an event written in the transaction of
what happened (a match, a cancelled handoff) reaches the endpoints registered for it,
signed per Standard Webhooks (verified here with the `standardwebhooks` library),
through failures (500, 429 with Retry-After, an endpoint gone) with the same id on every
attempt, and the delivery log says how it went."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from hypercorn.asyncio import serve
from hypercorn.config import Config
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from accessline.callmatching.storage.v1 import storage_pb2 as cm_store
from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline.notification.v1 import notification_pb2_grpc as nt_grpc
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline_server.callmatching.expiry import ExpiryWatcher
from accessline_server.notification.webhooks import Reach
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd, free_port
from tests.conftest import (
    ServiceProcess,
    connect,
    error_details,
    eventually,
    identity,
    spawn_service,
    violated_fields,
    wait_serving,
)
from tests.support.callmatching import (
    MARKER,
    PREFIX,
    S,
    System,
    call,
    handoff,
    make_pool,
    register,
)
from tests.support.stack import (
    ACCEPT,
    C,
    Call,
    Stack,
    agent,
    answer,
    new_group,
    pool_subject,
    set_available,
    setup_numbers,
    start_stack,
    stop_stack,
    window,
)
from tests.support.stack import handoff as stack_handoff

MATCHED = nt_pb2.WEBHOOK_EVENT_TYPE_HANDOFF_MATCHED
CANCELLED = nt_pb2.WEBHOOK_EVENT_TYPE_HANDOFF_CANCELLED
CONNECTED = nt_pb2.WEBHOOK_EVENT_TYPE_CALL_CONNECTED
ABANDONED = nt_pb2.WEBHOOK_EVENT_TYPE_CALL_ABANDONED
MAX_ATTEMPTS = 4


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
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task


@pytest.fixture(scope="module")
async def notification_process(
    etcd: EmbeddedEtcd, callmatching_system: System
) -> AsyncIterator[ServiceProcess]:
    """Two Notification replicas on the CallMatching system's prefix (their workers race
    for every event and delivery), their endpoints allowed on this machine, retrying
    fast; the first one's process."""
    replicas: list[ServiceProcess] = [
        spawn_service(
            "accessline_server.notification",
            etcd.endpoint,
            PREFIX,
            ACCESSLINE_WEBHOOK_ALLOW_HTTP="true",
            ACCESSLINE_WEBHOOK_ALLOW_PRIVATE_NETWORKS="true",
            ACCESSLINE_WEBHOOK_BACKOFF_SECONDS="0.2",
            ACCESSLINE_WEBHOOK_MAX_ATTEMPTS=str(MAX_ATTEMPTS),
            ACCESSLINE_WEBHOOK_TIMEOUT_SECONDS="2",
        )
        for _ in range(2)
    ]
    for replica in replicas:
        await wait_serving(replica)
    yield replicas[0]
    for replica in replicas:
        replica.stop()


@pytest.fixture(scope="module")
async def notification(notification_process: ServiceProcess) -> AsyncIterator[Any]:
    """Its stub, as an operator (the superuser)."""
    async with connect(notification_process.address) as channel:
        yield nt_grpc.NotificationServiceStub(channel)


async def webhook(stub: Any, app_id: str, url: str, *events: int) -> tuple[str, str]:
    reply = await stub.RegisterWebhook(
        nt_pb2.RegisterWebhookRequest(
            webhook=nt_pb2.Webhook(application_id=app_id, url=url, events=events or [MATCHED])
        )
    )
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


async def test_a_match_reaches_the_endpoint_signed_through_500_and_429(
    callmatching_system: System, notification: Any
) -> None:
    system = callmatching_system
    subject, _ = await make_pool(system, 1)
    app_id = await register(system, S.MATCH_SCHEMA_NUMBER)
    async with Receiver((500, {}), (429, {"retry-after": "1"})) as receiver:
        webhook_id, secret = await webhook(notification, app_id, receiver.url, MATCHED)
        assert secret.startswith("whsec_")
        started = await handoff(system, app_id, subject)
        matched = await call(system.cm, started.access_number, call_id="call-hooked")
        assert matched.outcome == cm_pb2.MATCH_OUTCOME_MATCHED
        await receiver.received(3)
        [delivery] = await settled(notification, webhook_id)
        requests = list(receiver.requests)
    # Two replicas' workers, one attempt at a time: exactly the three answers' requests.
    assert len(requests) == 3
    ids = {headers["webhook-id"] for headers, _ in requests}
    assert len(ids) == 1  # the same event on every attempt
    headers, body = requests[-1]
    payload = Webhook(secret).verify(body, headers)
    assert payload["type"] == "handoff.matched"
    assert payload["data"] == {
        "event_id": ids.pop(),
        "application_id": app_id,
        "session_id": started.session_id,
        "customer_id": "customer-1",
        "call_id": "call-hooked",
    }
    # Ids and outcomes only: nothing of the context, not the number.
    assert MARKER.encode() not in body
    assert started.access_number.encode() not in body
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 43 + "=").verify(body, headers)
    assert delivery.status == nt_pb2.WEBHOOK_DELIVERY_STATUS_DELIVERED
    assert (delivery.attempts, delivery.last_http_status) == (3, 200)
    assert delivery.event_type == MATCHED


async def test_a_webhook_gets_the_events_it_asked_for_only(
    callmatching_system: System, notification: Any
) -> None:
    system = callmatching_system
    subject, _ = await make_pool(system, 2)
    app_id = await register(system, S.MATCH_SCHEMA_NUMBER)
    async with Receiver() as both, Receiver() as matches_only:
        both_id, _ = await webhook(notification, app_id, both.url, MATCHED, CANCELLED)
        only_id, _ = await webhook(notification, app_id, matches_only.url, MATCHED)
        cancelled = await handoff(system, app_id, subject)
        await system.cm.CancelHandoff(cm_pb2.CancelHandoffRequest(session_id=cancelled.session_id))
        started = await handoff(system, app_id, subject)
        await call(system.cm, started.access_number)
        await settled(notification, both_id, 2)
        await settled(notification, only_id, 1)
        # Each event once to each webhook that wants it, whichever replica fanned it out.
        kinds = sorted(json.loads(body)["type"] for _, body in both.requests)
        assert kinds == ["handoff.cancelled", "handoff.matched"]
        assert [json.loads(b)["type"] for _, b in matches_only.requests] == ["handoff.matched"]


async def test_during_a_rotation_both_secrets_sign(
    callmatching_system: System, notification: Any
) -> None:
    system = callmatching_system
    subject, _ = await make_pool(system, 1)
    app_id = await register(system, S.MATCH_SCHEMA_NUMBER)
    async with Receiver() as receiver:
        webhook_id, old = await webhook(notification, app_id, receiver.url)
        rotated = await notification.RotateWebhookSecret(
            nt_pb2.RotateWebhookSecretRequest(webhook_id=webhook_id)
        )
        started = await handoff(system, app_id, subject)
        await call(system.cm, started.access_number)
        [(headers, body)] = await receiver.received(1)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, rotated.secret):
        assert Webhook(secret).verify(body, headers)["type"] == "handoff.matched"


async def test_an_endpoint_gone_or_refusing_ends_failed_in_the_log(
    callmatching_system: System, notification: Any
) -> None:
    system = callmatching_system
    subject, _ = await make_pool(system, 2)
    app_id = await register(system, S.MATCH_SCHEMA_NUMBER)
    gone_id, _ = await webhook(notification, app_id, f"http://127.0.0.1:{free_port()}/gone")
    async with Receiver((400, {})) as refusing:
        refusing_id, _ = await webhook(notification, app_id, refusing.url)
        started = await handoff(system, app_id, subject)
        await call(system.cm, started.access_number)
        [refused] = await settled(notification, refusing_id)
        [gone] = await settled(notification, gone_id)
    assert (refused.status, refused.attempts, refused.last_http_status) == (
        nt_pb2.WEBHOOK_DELIVERY_STATUS_FAILED,
        1,
        400,
    )
    assert (gone.status, gone.attempts, gone.last_http_status) == (
        nt_pb2.WEBHOOK_DELIVERY_STATUS_FAILED,
        MAX_ATTEMPTS,
        0,
    )
    assert gone.failure_reason.startswith("no answer")


async def test_an_application_holds_ten_webhooks_however_many_race(
    callmatching_system: System, notification: Any
) -> None:
    app_id = await register(callmatching_system, S.MATCH_SCHEMA_NUMBER)
    results = await asyncio.gather(
        *(webhook(notification, app_id, f"https://hooks.example/{i}") for i in range(14)),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(results) - len(refused) == 10
    assert {r.code() for r in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert error_details(refused[0])["ErrorInfo"].reason == "TOO_MANY_WEBHOOKS"


async def test_a_backend_registers_and_reads_its_own_applications_webhooks_only(
    callmatching_system: System, notification: Any, notification_process: ServiceProcess
) -> None:
    mine = await register(callmatching_system, S.MATCH_SCHEMA_NUMBER)
    other = await register(callmatching_system, S.MATCH_SCHEMA_NUMBER)
    other_id, _ = await webhook(notification, other, "https://hooks.example/other")
    token = identity().token("bank-backend", "app_backend", applications=[mine])
    async with connect(notification_process.address, token) as channel:
        backend = nt_grpc.NotificationServiceStub(channel)
        await webhook(backend, mine, "https://hooks.example/mine")
        with pytest.raises(grpc.aio.AioRpcError) as elsewhere:
            await webhook(backend, other, "https://hooks.example/sneaky")
        assert elsewhere.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as reading:
            await backend.GetWebhook(nt_pb2.GetWebhookRequest(webhook_id=other_id))
        assert reading.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_endpoints_are_https_and_outside_private_networks_unless_allowed() -> None:
    strict = Reach()
    for url, wrong in [
        ("https://hooks.example/a", False),
        ("http://hooks.example/a", True),
        ("https://user:pw@hooks.example/a", True),
        ("https://127.0.0.1/a", True),
        ("https://10.1.2.3/a", True),
        ("https://169.254.169.254/latest", True),
        ("https://[::1]/a", True),
        ("ftp://hooks.example/a", True),
        ("https://hooks.example:99999/a", True),
    ]:
        assert bool(strict.url_violations(url, "url")) == wrong, url
    lenient = Reach(allow_http=True, allow_private=True)
    assert lenient.url_violations("http://127.0.0.1:8080/a", "url") == []


async def test_a_bad_registration_names_every_bad_field(notification: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await notification.RegisterWebhook(
            nt_pb2.RegisterWebhookRequest(
                webhook=nt_pb2.Webhook(application_id="", url="nope", events=[0])
            )
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(refused.value) == {
        "webhook.application_id",
        "webhook.url",
        "webhook.events[0]",
    }


ALLOWED_HERE = {
    "ACCESSLINE_WEBHOOK_ALLOW_HTTP": "true",
    "ACCESSLINE_WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true",
    "ACCESSLINE_WEBHOOK_BACKOFF_SECONDS": "0.2",
}


@pytest.fixture(scope="module")
async def routed(
    etcd: EmbeddedEtcd, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    """The five services, Notification's endpoints allowed on this machine."""
    stack = await start_stack(
        etcd,
        f"/hooks-{uuid.uuid4().hex[:8]}",
        tmp_path_factory.mktemp("hooks"),
        notification_env=ALLOWED_HERE,
    )
    yield stack
    await stop_stack(stack)


async def test_a_matched_call_is_told_connected_or_gone(routed: Stack) -> None:
    group = new_group()
    app_id, _ = await setup_numbers(routed, group, 2)
    subject = await pool_subject(routed, group)
    _, agent_app = await agent(routed, group)
    async with Receiver() as receiver:
        webhook_id, secret = await webhook(
            routed.nt, app_id, receiver.url, MATCHED, CONNECTED, ABANDONED
        )
        reached = await stack_handoff(routed, app_id, "customer-7", C.ContextData(subject=subject))
        call = Call(routed.routers[0], reached.access_number)
        await answer(agent_app, ACCEPT)
        await call.until("connect")
        # The agent is on that call: the next one waits, and its caller hangs up.
        gone = await stack_handoff(routed, app_id, "customer-8", C.ContextData(subject=subject))
        waiting = Call(routed.routers[1], gone.access_number)
        await waiting.until("queued")
        waiting.hang_up()
        await settled(routed.nt, webhook_id, 4)
        requests = list(receiver.requests)
    told = sorted(
        (event["type"], event["data"]["customer_id"])
        for event in (Webhook(secret).verify(body, headers) for headers, body in requests)
    )
    assert told == [
        ("call.abandoned", "customer-8"),
        ("call.connected", "customer-7"),
        ("handoff.matched", "customer-7"),
        ("handoff.matched", "customer-8"),
    ]
    connected = next(json.loads(b) for _, b in requests if b"call.connected" in b)
    assert set(connected["data"]) == {
        "event_id",
        "application_id",
        "session_id",
        "customer_id",
        "call_id",
        "interaction_id",
    }
    agent_app.call.cancel()


def told_types(receiver: Receiver, secret: str, key: str) -> list[tuple[str, str]]:
    """(type, data[key]) of each verified delivery, in the order received."""
    return [
        (event["type"], event["data"].get(key, ""))
        for event in (Webhook(secret).verify(body, headers) for headers, body in receiver.requests)
    ]


async def test_a_matched_call_is_told_queued_and_offered(routed: Stack) -> None:
    group = new_group()
    app_id, numbers = await setup_numbers(routed, group)
    subject = await pool_subject(routed, group)
    _, agent_app = await agent(routed, group)
    queued, offered = nt_pb2.WEBHOOK_EVENT_TYPE_CALL_QUEUED, nt_pb2.WEBHOOK_EVENT_TYPE_CALL_OFFERED
    async with Receiver() as receiver:
        webhook_id, secret = await webhook(
            routed.nt, app_id, receiver.url, queued, offered, CONNECTED
        )
        await stack_handoff(routed, app_id, "customer-q", C.ContextData(subject=subject))
        call = Call(routed.routers[0], numbers[0])
        await answer(agent_app, ACCEPT)
        await call.until("connect")
        await settled(routed.nt, webhook_id, 3)
        assert sorted(told_types(receiver, secret, "customer_id")) == [
            ("call.connected", "customer-q"),
            ("call.offered", "customer-q"),
            ("call.queued", "customer-q"),
        ]
    call.hang_up()
    agent_app.call.cancel()


async def test_a_callback_is_told_scheduled_attempted_and_completed_or_failed(
    routed: Stack,
) -> None:
    group = new_group()
    _, agent_app = await agent(routed, group)
    app_id = f"app-{uuid.uuid4().hex[:6]}"
    kinds = [
        nt_pb2.WEBHOOK_EVENT_TYPE_CALLBACK_SCHEDULED,
        nt_pb2.WEBHOOK_EVENT_TYPE_CALLBACK_ATTEMPTED,
        nt_pb2.WEBHOOK_EVENT_TYPE_CALLBACK_COMPLETED,
        nt_pb2.WEBHOOK_EVENT_TYPE_CALLBACK_FAILED,
    ]
    dials = routed.routers[1].StreamCallbackDials(
        rt_pb2.StreamCallbackDialsRequest(switch_id="sw-hooks")
    )

    def asked(customer: str) -> rt_pb2.RequestCallbackRequest:
        return rt_pb2.RequestCallbackRequest(
            application_id=app_id,
            customer_id=customer,
            phone_number="+33612345678",
            latest=window(3600),
            resource_group=group,
        )

    async with Receiver() as receiver:
        webhook_id, secret = await webhook(routed.nt, app_id, receiver.url, *kinds)
        reached = (await routed.routers[0].RequestCallback(asked("customer-r"))).callback
        await answer(agent_app, ACCEPT)
        while (await asyncio.wait_for(dials.read(), 20)).callback_id != reached.callback_id:
            pass
        await routed.routers[0].ReportCallbackAttempt(
            rt_pb2.ReportCallbackAttemptRequest(
                callback_id=reached.callback_id,
                outcome=rt_pb2.CALLBACK_ATTEMPT_OUTCOME_CONNECTED,
            )
        )
        dropped = (await routed.routers[1].RequestCallback(asked("customer-s"))).callback
        await routed.routers[1].CancelCallback(
            rt_pb2.CancelCallbackRequest(callback_id=dropped.callback_id)
        )
        await settled(routed.nt, webhook_id, 5)
        by_callback = sorted(told_types(receiver, secret, "callback_id"))
        assert by_callback == sorted(
            [
                ("callback.scheduled", reached.callback_id),
                ("callback.attempted", reached.callback_id),
                ("callback.completed", reached.callback_id),
                ("callback.scheduled", dropped.callback_id),
                ("callback.failed", dropped.callback_id),
            ]
        )
        details = {t: d for t, d in told_types(receiver, secret, "outcome") if d}
        assert details == {"callback.attempted": "connected"}
        reasons = {t: d for t, d in told_types(receiver, secret, "reason") if d}
        assert reasons == {"callback.failed": "cancelled"}
    dials.cancel()
    agent_app.call.cancel()


async def test_a_customer_told_an_agent_is_available_is_told_to_the_backend(
    routed: Stack,
) -> None:
    group = new_group()
    app_id, _ = await setup_numbers(routed, group)
    subject = await pool_subject(routed, group)
    _, held_app = await agent(routed, group, available=False)
    async with Receiver() as receiver:
        webhook_id, secret = await webhook(
            routed.nt, app_id, receiver.url, nt_pb2.WEBHOOK_EVENT_TYPE_AVAILABILITY_NOTIFIED
        )
        asked = await routed.routers[0].RequestNotifyWhenAvailable(
            rt_pb2.RequestNotifyWhenAvailableRequest(
                customer_id="customer-n",
                resource_group=group,
                handoff=cm_pb2.StartHandoffRequest(
                    application_id=app_id, context=C.ContextData(subject=subject)
                ),
            )
        )
        await set_available(held_app, True)
        await settled(routed.nt, webhook_id, 1)
        assert told_types(receiver, secret, "request_id") == [
            ("availability.notified", asked.request_id)
        ]
    held_app.call.cancel()


async def test_a_handoff_no_call_matched_is_told_expired_once(routed: Stack) -> None:
    group = new_group()
    app_id, _ = await setup_numbers(routed, group, 2)
    subject = await pool_subject(routed, group)
    expired = nt_pb2.WEBHOOK_EVENT_TYPE_HANDOFF_EXPIRED
    async with Receiver() as receiver:
        webhook_id, secret = await webhook(routed.nt, app_id, receiver.url, expired, CANCELLED)
        short = duration_pb2.Duration(seconds=2)
        lapsed = await stack_handoff(
            routed, app_id, "customer-x", C.ContextData(subject=subject), ttl=short
        )
        dropped = await stack_handoff(
            routed, app_id, "customer-y", C.ContextData(subject=subject), ttl=short
        )
        await routed.cm.CancelHandoff(cm_pb2.CancelHandoffRequest(session_id=dropped.session_id))
        await settled(routed.nt, webhook_id, 2)
        assert sorted(told_types(receiver, secret, "session_id")) == [
            ("handoff.cancelled", dropped.session_id),
            ("handoff.expired", lapsed.session_id),
        ]
        # Its application can read that it expired.
        state = await routed.cm.GetSession(cm_pb2.GetSessionRequest(session_id=lapsed.session_id))
        assert state.state == cm_pb2.SESSION_STATE_EXPIRED
        # Another replica that saw it vanish too tells nothing more: the outcome is kept.
        again = ExpiryWatcher(routed.store, 60.0)
        seen = cm_store.StoredSession(session_id=lapsed.session_id, application_id=app_id)
        assert not await again.expired(seen)
        assert len(await deliveries(routed.nt, webhook_id)) == 2
