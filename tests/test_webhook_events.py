"""Webhooks of the whole journey, against the five services: a matched call queued,
offered, connected or gone; callbacks scheduled, attempted, completed or failed; a customer
told an agent is available; a handoff that expired. Each told in the transaction of what
happened, verified with the `standardwebhooks` library."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import pytest
from google.protobuf import duration_pb2
from standardwebhooks.webhooks import Webhook

from accessline.callmatching.storage.v1 import storage_pb2 as cm_store
from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline_server.callmatching.expiry import ExpiryWatcher
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
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
from tests.support.webhooks import Receiver, deliveries, settled, told_types, webhook

MATCHED = nt_pb2.WEBHOOK_EVENT_TYPE_HANDOFF_MATCHED
CANCELLED = nt_pb2.WEBHOOK_EVENT_TYPE_HANDOFF_CANCELLED
CONNECTED = nt_pb2.WEBHOOK_EVENT_TYPE_CALL_CONNECTED
ABANDONED = nt_pb2.WEBHOOK_EVENT_TYPE_CALL_ABANDONED

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
            routed.nt, app_id, receiver.url, MATCHED, CONNECTED, ABANDONED, writers=routed.processes
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


async def test_a_matched_call_is_told_queued_and_offered(routed: Stack) -> None:
    group = new_group()
    app_id, numbers = await setup_numbers(routed, group)
    subject = await pool_subject(routed, group)
    _, agent_app = await agent(routed, group)
    queued, offered = nt_pb2.WEBHOOK_EVENT_TYPE_CALL_QUEUED, nt_pb2.WEBHOOK_EVENT_TYPE_CALL_OFFERED
    async with Receiver() as receiver:
        webhook_id, secret = await webhook(
            routed.nt, app_id, receiver.url, queued, offered, CONNECTED, writers=routed.processes
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
        webhook_id, secret = await webhook(
            routed.nt, app_id, receiver.url, *kinds, writers=routed.processes
        )
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
            routed.nt,
            app_id,
            receiver.url,
            nt_pb2.WEBHOOK_EVENT_TYPE_AVAILABILITY_NOTIFIED,
            writers=routed.processes,
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
        webhook_id, secret = await webhook(
            routed.nt, app_id, receiver.url, expired, CANCELLED, writers=routed.processes
        )
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
