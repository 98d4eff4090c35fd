"""Signed webhooks for applications' backends: an event written in the transaction of
what happened (a match, a cancelled handoff) reaches the endpoints registered for it,
signed per Standard Webhooks (verified here with the `standardwebhooks` library),
through failures (500, 429 with Retry-After, an endpoint gone) with the same id on every
attempt, and the delivery log says how it went."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline.notification.v1 import notification_pb2_grpc as nt_grpc
from accessline_server.notification.webhook_delivery import WebhookSender
from accessline_server.notification.webhooks import Reach
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd, free_port
from tests.conftest import (
    ServiceProcess,
    connect,
    error_details,
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
from tests.support.webhooks import Receiver, settled, webhook

MATCHED = nt_pb2.WEBHOOK_EVENT_TYPE_HANDOFF_MATCHED
CANCELLED = nt_pb2.WEBHOOK_EVENT_TYPE_HANDOFF_CANCELLED
CONNECTED = nt_pb2.WEBHOOK_EVENT_TYPE_CALL_CONNECTED
ABANDONED = nt_pb2.WEBHOOK_EVENT_TYPE_CALL_ABANDONED
MAX_ATTEMPTS = 4


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


async def test_a_match_reaches_the_endpoint_signed_through_500_and_429(
    callmatching_system: System, notification: Any
) -> None:
    system = callmatching_system
    subject, _ = await make_pool(system, 1)
    app_id = await register(system, S.MATCH_SCHEMA_NUMBER)
    async with Receiver((500, {}), (429, {"retry-after": "1"})) as receiver:
        webhook_id, secret = await webhook(
            notification, app_id, receiver.url, MATCHED, writers=system.processes
        )
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
        both_id, _ = await webhook(
            notification, app_id, both.url, MATCHED, CANCELLED, writers=system.processes
        )
        only_id, _ = await webhook(
            notification,
            app_id,
            matches_only.url,
            MATCHED,
            writers=system.processes,
            wanted=(MATCHED, CANCELLED),
        )
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
        webhook_id, old = await webhook(
            notification, app_id, receiver.url, writers=system.processes
        )
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
        refusing_id, _ = await webhook(notification, app_id, refusing.url, writers=system.processes)
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


class Resolving(WebhookSender):
    """The sender, with a name server that answers what the test says once, then nothing:
    a name that points elsewhere by the time the request would resolve it again."""

    def __init__(self, reach: Reach, answer: str) -> None:
        super().__init__(reach, timeout=5)
        self.answers = [answer]

    async def resolve(self, host: str, port: int) -> list[str]:
        return [self.answers.pop()] if self.answers else []


async def test_a_delivery_goes_to_the_address_checked_never_resolved_again() -> None:
    async with Receiver() as receiver:
        # `.invalid` never resolves (RFC 2606): the request reaches the receiver only by
        # the address the check was given.
        url = f"http://hooks.invalid:{receiver.port}/hooks/accessline"
        sender = Resolving(Reach(allow_http=True, allow_private=True), "127.0.0.1")
        sent = await sender.send(url, b"{}", "evt_checked", [b"k" * 32], time.time())
        await sender.close()
        assert sent.delivered, sent
        [(headers, _)] = receiver.requests
        assert headers["host"] == f"hooks.invalid:{receiver.port}"
        # Where private networks are not allowed, a name that answers one is not sent to.
        closed = Resolving(Reach(allow_http=True), "10.0.0.7")
        refused = await closed.send(url, b"{}", "evt_private", [b"k" * 32], time.time())
        await closed.close()
        assert (refused.delivered, refused.reason) == (
            False,
            "host unresolved or in a private network",
        )
        assert len(receiver.requests) == 1
