"""Routing end to end: NumberDistribution, CallMatching, Presence, Notification and two
Routing replicas as real processes on one etcd, agent apps on Presence streams, the
customer's app on Notification's in-app stream, the switch on RouteInboundCall and
StreamCallbackDials. Every group is a fresh one, so tests share the processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import struct
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, empty_pb2

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline.notification.v1 import notification_pb2_grpc as nt_grpc
from accessline.presence.storage.v1 import storage_pb2 as pr_store
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.routing.storage.v1 import storage_pb2 as rt_store
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline.routing.v1 import routing_pb2_grpc as rt_grpc
from services.presence import offers as pr_offers
from services.routing import keys as rt_keys
from services.runtime.embedded_etcd import EmbeddedEtcd, free_port
from services.runtime.store import Op
from tests.conftest import (
    connect,
    error_details,
    eventually,
    identity,
    spawn_service,
    violated_fields,
    wait_serving,
)
from tests.support.stack import (
    ACCEPT,
    DECLINE,
    ROUTING_ENV,
    ROUTING_SEALER,
    C,
    Call,
    Stack,
    agent,
    answer,
    handoff,
    new_group,
    pool_subject,
    set_available,
    setup_numbers,
    start_stack,
    stop_stack,
    window,
)
from tests.test_presence import App


@pytest.fixture(scope="module")
async def stack(
    etcd: EmbeddedEtcd, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    built = await start_stack(
        etcd, f"/test-{uuid.uuid4().hex[:12]}", tmp_path_factory.mktemp("routing")
    )
    yield built
    await stop_stack(built)


@contextlib.asynccontextmanager
async def one_more_router(etcd: EmbeddedEtcd, prefix: str, **env: str) -> AsyncIterator[Any]:
    """A Routing process of its own settings, stopped on exit; yields its stub."""
    process = spawn_service("services.routing", etcd.endpoint, prefix, **env)
    try:
        await wait_serving(process)
        async with connect(process.address) as channel:
            yield rt_grpc.RoutingServiceStub(channel)
    finally:
        await process.stop_async()


async def stored_anywhere(stack: Stack, *needles: bytes) -> bool:
    """Whether any of `needles` appears in clear in a value of Routing's keys."""
    found = await stack.store.txn([], [Op.get_prefix(rt_keys.ROOT)])
    return any(n in value for _, value, _ in found.gets[0] for n in needles)


# -- the call path ------------------------------------------------------------------


async def test_a_matched_call_skips_the_ivr_and_reaches_the_best_agent_with_its_context(
    stack: Stack,
) -> None:
    group = new_group()
    app_id, _ = await setup_numbers(stack, group)
    subject = await pool_subject(stack, group)
    _, junior_app = await agent(stack, group, 3, ("fr-FR",), skill=subject)
    expert, expert_app = await agent(stack, group, 9, ("fr-FR",), skill=subject)
    context = C.ContextData(
        subject=subject,
        language="fr-FR",
        service_request_id="SR-7",
        attributes={"display_name": "Ms Martin"},
    )
    started = await handoff(stack, app_id, "c1", context)
    call = Call(stack.routers[0], started.access_number)
    decided = await call.next()
    assert decided.match_decided.treatment == rt_pb2.TREATMENT_SKIP_IVR
    assert decided.match_decided.resource_group == group
    assert (await call.until("offered")).offered.agent_id == expert
    preview = await answer(expert_app, ACCEPT)
    assert (preview.summary.customer_display_name, preview.summary.service_request_id) == (
        "Ms Martin",
        "SR-7",
    )
    connect = (await call.until("connect")).connect
    assert (connect.agent_id, connect.address, connect.session_id) == (
        expert,
        f"ext-{expert}",
        started.session_id,
    )
    assert connect.context == context
    assert await call.call.read() is grpc.aio.EOF
    for app in (junior_app, expert_app):
        app.call.cancel()


async def test_the_subjects_skill_and_the_customers_language_choose_the_agent(
    stack: Stack,
) -> None:
    group = new_group()
    app_id, _ = await setup_numbers(stack, group)
    subject = await pool_subject(stack, group)

    _, a = await agent(stack, group, 9, ("en-GB",), skill=subject)
    best, b = await agent(stack, group, 9, ("de-DE",), skill=subject)
    _, c = await agent(stack, group, 2, ("de-DE",), skill=subject)
    started = await handoff(
        stack, app_id, "c-skill", C.ContextData(subject=subject, language="de-AT")
    )
    call = Call(stack.routers[1], started.access_number)
    assert (await call.until("offered")).offered.agent_id == best
    call.hang_up()
    for app in (a, b, c):
        app.call.cancel()


async def test_an_unmatched_call_goes_through_the_ivr_then_to_the_numbers_group(
    stack: Stack,
) -> None:
    group = new_group()
    _, numbers = await setup_numbers(stack, group)
    member, app = await agent(stack, group)
    call = Call(stack.routers[1], numbers[0])
    decided = await call.next()
    assert decided.match_decided.outcome == cm_pb2.MATCH_OUTCOME_NO_RESERVATION
    assert decided.match_decided.treatment == rt_pb2.TREATMENT_IVR_AUTHENTICATE
    assert (await call.until("offered")).offered.agent_id == member
    preview = await app.next_kind("offer")
    assert preview.summary.subject == ""  # nothing known of an unmatched caller
    call.hang_up()
    app.call.cancel()


async def test_a_matched_call_of_an_app_that_keeps_the_ivr_gets_the_standard_treatment(
    stack: Stack,
) -> None:
    group = new_group()
    app_id, _ = await setup_numbers(stack, group, skip_ivr=False)
    subject = await pool_subject(stack, group)
    member, app = await agent(stack, group)
    started = await handoff(stack, app_id, "c-ivr", C.ContextData(subject=subject))
    call = Call(stack.routers[0], started.access_number)
    decided = (await call.next()).match_decided
    assert decided.outcome == cm_pb2.MATCH_OUTCOME_MATCHED
    assert decided.treatment == rt_pb2.TREATMENT_IVR_STANDARD
    assert (await call.until("offered")).offered.agent_id == member
    call.hang_up()
    app.call.cancel()


async def test_a_call_to_a_group_with_nobody_logged_in_fails_with_no_agents(stack: Stack) -> None:
    group = new_group()
    _, numbers = await setup_numbers(stack, group)
    call = Call(stack.routers[0], numbers[0])
    failed = await call.until("failed")
    assert failed.failed.reason == rt_pb2.FAILURE_REASON_NO_AGENTS


async def test_a_decline_and_a_timeout_move_on_to_the_next_agent(stack: Stack) -> None:
    group = new_group()
    _, numbers = await setup_numbers(stack, group)
    first, first_app = await agent(stack, group, 9)
    second, second_app = await agent(stack, group, 6)
    third, third_app = await agent(stack, group, 3)
    call = Call(stack.routers[0], numbers[0])
    assert (await call.until("offered")).offered.agent_id == first
    await answer(first_app, DECLINE)
    assert (await call.until("offered")).offered.agent_id == second
    await second_app.next_kind("offer")  # and let it time out (2 s here)
    cancelled = await second_app.next_kind("offer_cancelled")
    assert cancelled.reason == pr_pb2.OFFER_CANCEL_REASON_TIMED_OUT
    assert (await call.until("offered")).offered.agent_id == third
    await answer(third_app, ACCEPT)
    assert (await call.until("connect")).connect.agent_id == third
    for app in (first_app, second_app, third_app):
        app.call.cancel()


async def test_an_agent_who_lets_offers_time_out_in_a_row_is_set_not_ready(
    stack: Stack,
) -> None:
    group = new_group()
    _, numbers = await setup_numbers(stack, group)
    sleepy, app = await agent(stack, group)
    call = Call(stack.routers[0], numbers[0])
    assert (await call.until("offered")).offered.agent_id == sleepy
    first = await app.next_kind("offer")
    assert (await app.next_kind("offer_cancelled")).reason == pr_pb2.OFFER_CANCEL_REASON_TIMED_OUT
    # Offered again once the retry time has come (the only agent); the second miss in a
    # row reaches the limit of 2.
    second = await app.next_kind("offer")
    assert second.offer_id != first.offer_id
    cancelled = await app.next_kind("offer_cancelled")
    assert cancelled.reason == pr_pb2.OFFER_CANCEL_REASON_NO_ANSWER_LIMIT
    confirmed = await app.next_kind("presence_confirmed")
    assert confirmed.presence.channels[0].presence == C.CHANNEL_PRESENCE_UNAVAILABLE
    shown = await stack.pr.GetPresence(pr_pb2.GetPresenceRequest(agent_ids=[sleepy]))
    assert shown.agents[0].channels[0].presence == C.CHANNEL_PRESENCE_UNAVAILABLE
    # The call waits in the queue instead of ringing the absent agent.
    assert (await call.until("queued")).queued.position == 1
    call.hang_up()
    app.call.cancel()


async def test_a_hang_up_withdraws_the_offer_and_releases_the_agent(stack: Stack) -> None:
    group = new_group()
    _, numbers = await setup_numbers(stack, group)
    member, app = await agent(stack, group)
    call = Call(stack.routers[0], numbers[0])
    offered = await call.until("offered")
    preview = await app.next_kind("offer")
    call.hang_up()
    cancelled = await app.next_kind("offer_cancelled")
    assert cancelled.offer_id == preview.offer_id
    assert cancelled.reason == pr_pb2.OFFER_CANCEL_REASON_WITHDRAWN

    async def released() -> bool:
        claims, _ = await stack.store.get_prefix(rt_keys.claims_of(member), rt_store.AgentClaim)
        queued, _ = await stack.store.get_prefix(rt_keys.queue(group), rt_store.QueuedInteraction)
        return not claims and not queued

    await eventually(released, what="claim and queue entry gone after hang-up")
    offer = await stack.store.get(
        pr_offers.offer_key(member, preview.offer_id), pr_store.StoredOffer
    )
    assert offer is None or offer.value.state == pr_store.OFFER_STATE_CANCELLED
    assert offered.interaction_id == preview.interaction_id
    app.call.cancel()


async def test_a_busy_agent_takes_the_next_queued_call_as_soon_as_the_last_one_ends(
    stack: Stack,
) -> None:
    group = new_group()
    _, numbers = await setup_numbers(stack, group)
    member, app = await agent(stack, group)
    first = Call(stack.routers[0], numbers[0])
    await first.until("offered")
    preview = await answer(app, ACCEPT)
    assert (await first.until("connect")).connect.agent_id == member
    busy = await app.next_kind("presence_confirmed")
    assert busy.presence.channels[0].presence == C.CHANNEL_PRESENCE_BUSY

    second = Call(stack.routers[1], numbers[0])
    queued = await second.until("queued", "offered")
    assert queued.queued.position == 1
    assert queued.queued.estimated_wait.seconds > 0  # nobody is free

    async def estimated() -> bool:
        # Availability is cached for the queue update interval (0.2 s here).
        found = await stack.routers[0].EstimateWait(
            rt_pb2.EstimateWaitRequest(resource_group=group)
        )
        return (found.queue_length, found.available_agents) == (
            1,
            0,
        ) and found.estimated_wait.seconds > 0

    await eventually(estimated, what="one call waiting, no agent free")

    await app.send(end_interaction=pr_pb2.EndInteraction(interaction_id=preview.interaction_id))
    assert (await second.until("offered")).offered.agent_id == member
    second.hang_up()
    app.call.cancel()


# -- agent selection and priority ----------------------------------------------------


async def test_the_service_request_owner_is_preferred_and_waited_for(stack: Stack) -> None:
    group = new_group()
    app_id, _ = await setup_numbers(stack, group, count=2)
    subject = await pool_subject(stack, group)
    expert, expert_app = await agent(stack, group, 9, skill=subject)
    owner, owner_app = await agent(stack, group, 1, skill=subject)

    started = await handoff(
        stack, app_id, "c-owner", C.ContextData(subject=subject, service_request_owner=owner)
    )
    call = Call(stack.routers[0], started.access_number)
    assert (await call.until("offered")).offered.agent_id == owner
    await answer(owner_app, ACCEPT)
    await call.until("connect")

    # The owner is now busy: the next call for them waits (1.5 s here) before widening.
    again = await handoff(
        stack, app_id, "c-owner-2", C.ContextData(subject=subject, service_request_owner=owner)
    )
    waited = Call(stack.routers[1], again.access_number)
    assert (await waited.until("queued", "offered")).WhichOneof("event") == "queued"
    assert (await waited.until("offered")).offered.agent_id == expert
    waited.hang_up()
    for app in (expert_app, owner_app):
        app.call.cancel()


async def test_priority_overtakes_age_once_the_sla_is_missed(stack: Stack) -> None:
    group = new_group()
    app_id, numbers = await setup_numbers(stack, group, count=2)
    subject = await pool_subject(stack, group)
    member, app = await agent(stack, group, available=False)

    gold = await handoff(
        stack, app_id, "c-gold", C.ContextData(subject=subject, customer_segment="gold")
    )
    plain_number = next(n for n in numbers if n != gold.access_number)
    # The ordinary call comes first; the gold one is worth more (50 against 10).
    plain = Call(stack.routers[0], plain_number)
    assert (await plain.until("queued")).queued.position == 1
    golden = Call(stack.routers[1], gold.access_number)
    assert (await golden.until("queued")).queued.position == 1
    assert (await plain.until("queued")).queued.position == 2
    # Past its 1 s SLA the ordinary call's priority rises 40 a second and overtakes.
    assert (await plain.until("queued")).queued.position == 1
    await set_available(app, True)
    assert (await plain.until("offered")).offered.agent_id == member
    assert "offered" not in golden.kinds()
    for call in (plain, golden):
        call.hang_up()
    app.call.cancel()


async def test_two_replicas_never_offer_one_agent_more_than_its_capacity(stack: Stack) -> None:
    """Twelve calls on both replicas, three agents who read each preview a moment, accept
    it and end the call at once. From each agent's own stream: an offer never arrives
    while the agent still has one open or a call in progress, and every call is connected
    exactly once."""
    group = new_group()
    _, numbers = await setup_numbers(stack, group)
    agents = [await agent(stack, group) for _ in range(3)]
    violations: list[str] = []
    handled: dict[str, list[str]] = {a: [] for a, _ in agents}

    async def work(agent_id: str, app: App) -> None:
        busy_with: str | None = None
        while True:
            reply = await app.next(60)
            kind = reply.WhichOneof("message")
            if kind == "offer":
                if busy_with is not None:
                    violations.append(
                        f"{agent_id} offered {reply.offer.interaction_id} during {busy_with}"
                    )
                busy_with = reply.offer.interaction_id
                # The agent reads the preview before accepting (think time, not a wait
                # for anything): offers made meanwhile would show as overlaps.
                await asyncio.sleep(0.15)
                await app.send(
                    offer_response=pr_pb2.OfferResponse(
                        offer_id=reply.offer.offer_id, decision=ACCEPT
                    )
                )
            elif kind == "offer_response_recorded" and busy_with is not None:
                handled[agent_id].append(busy_with)
                await app.send(end_interaction=pr_pb2.EndInteraction(interaction_id=busy_with))
                busy_with = None

    workers = [asyncio.ensure_future(work(a, app)) for a, app in agents]
    calls = [Call(stack.routers[i % 2], numbers[0]) for i in range(12)]
    connects = await asyncio.gather(*(c.until("connect", timeout=60) for c in calls))
    for worker in workers:
        worker.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    assert violations == []
    ids = sorted(c.interaction_id for c in connects)
    assert len(set(ids)) == 12
    assert sorted(i for done in handled.values() for i in done) == ids
    for _, app in agents:
        app.call.cancel()


# -- notify when available ----------------------------------------------------------


async def in_app(stack: Stack, customer: str) -> Any:
    device = f"d-{uuid.uuid4().hex[:6]}"
    await stack.nt.RegisterDevice(
        nt_pb2.RegisterDeviceRequest(
            device=nt_pb2.Device(
                device_id=device,
                customer_id=customer,
                application_id="customer-app",
                platform=nt_pb2.PLATFORM_IN_APP,
            )
        )
    )
    own = nt_grpc.NotificationServiceStub(
        connect(stack.processes[2].address, identity().token(customer, "customer"))
    )
    return own.StreamNotifications(nt_pb2.StreamNotificationsRequest(device_id=device))


async def test_notify_when_available_holds_the_agent_for_the_customers_call(stack: Stack) -> None:
    group = new_group()
    app_id, _ = await setup_numbers(stack, group, count=2)
    subject = await pool_subject(stack, group)
    held, held_app = await agent(stack, group, 1, available=False)
    customer = f"c-{uuid.uuid4().hex[:6]}"
    pushes = await in_app(stack, customer)
    context = C.ContextData(
        subject=subject, attributes={"display_name": "Mr Bernard", "policy": "P-99-SECRET"}
    )
    asked = await stack.routers[0].RequestNotifyWhenAvailable(
        rt_pb2.RequestNotifyWhenAvailableRequest(
            customer_id=customer,
            resource_group=group,
            handoff=cm_pb2.StartHandoffRequest(application_id=app_id, context=context),
        )
    )
    assert not await stored_anywhere(stack, b"P-99-SECRET")
    await set_available(held_app, True)
    pushed = (await asyncio.wait_for(pushes.read(), 20)).notification
    assert pushed.event_type == nt_pb2.EVENT_TYPE_AGENT_AVAILABLE
    assert pushed.data["request_id"] == asked.request_id
    assert set(pushed.data) == {"request_id", "session_id"}  # ids only, no number or code
    # Another, better agent logs in meanwhile; the call still goes to the held one.
    _, other_app = await agent(stack, group, 9)
    # The app fetches the number over its data channel with the request id.
    started = await handoff(stack, app_id, customer, context, idempotency_key=asked.request_id)
    assert started.session_id == pushed.data["session_id"]
    assert started.access_number not in (pushed.title + pushed.body)
    call = Call(stack.routers[1], started.access_number)
    assert (await call.until("offered")).offered.agent_id == held
    await answer(held_app, ACCEPT)
    assert (await call.until("connect")).connect.context == context
    with contextlib.suppress(asyncio.CancelledError):
        pushes.cancel()
    for app in (held_app, other_app):
        app.call.cancel()


async def test_a_hold_the_customer_does_not_use_releases_the_agent(stack: Stack) -> None:
    group = new_group()
    app_id, numbers = await setup_numbers(stack, group, count=2)
    subject = await pool_subject(stack, group)
    member, app = await agent(stack, group, available=False)
    customer = f"c-{uuid.uuid4().hex[:6]}"
    await stack.routers[0].RequestNotifyWhenAvailable(
        rt_pb2.RequestNotifyWhenAvailableRequest(
            customer_id=customer,
            resource_group=group,
            handoff=cm_pb2.StartHandoffRequest(
                application_id=app_id, context=C.ContextData(subject=subject)
            ),
        )
    )
    await set_available(app, True)

    async def held() -> bool:
        return (
            await stack.store.get(rt_keys.hold(ROUTING_SEALER, customer), rt_store.AgentHold)
            is not None
        )

    await eventually(held, what="agent held for the customer")
    # While held, another caller waits...
    caller = Call(stack.routers[0], numbers[0])
    assert (await caller.until("queued", "offered")).WhichOneof("event") == "queued"
    # ...and gets the agent once the 3 s hold runs out unused.
    assert (await caller.until("offered")).offered.agent_id == member
    assert await stack.store.get(rt_keys.hold(ROUTING_SEALER, customer), rt_store.AgentHold) is None
    caller.hang_up()
    app.call.cancel()


async def test_a_snoozed_request_waits_and_a_cancelled_one_is_gone(stack: Stack) -> None:
    group = new_group()
    app_id, _ = await setup_numbers(stack, group)
    asked = await stack.routers[1].RequestNotifyWhenAvailable(
        rt_pb2.RequestNotifyWhenAvailableRequest(
            customer_id="c-snooze",
            resource_group=group,
            handoff=cm_pb2.StartHandoffRequest(application_id=app_id),
        )
    )
    snoozed = await stack.routers[0].SnoozeNotifyWhenAvailable(
        rt_pb2.SnoozeNotifyWhenAvailableRequest(
            request_id=asked.request_id, snooze=duration_pb2.Duration(seconds=600)
        )
    )
    assert snoozed.active_again_at.seconds >= int(time.time()) + 590
    _, app = await agent(stack, group)
    # Snoozed: the free agent is not held for this customer (checked after a pass that
    # saw the agent: a call placed now is offered at once).
    _, numbers = await setup_numbers(stack, group)
    call = Call(stack.routers[0], numbers[0])
    await call.until("offered")
    assert (
        await stack.store.get(rt_keys.hold(ROUTING_SEALER, "c-snooze"), rt_store.AgentHold) is None
    )
    call.hang_up()
    await stack.routers[0].CancelNotifyWhenAvailable(
        rt_pb2.CancelNotifyWhenAvailableRequest(request_id=asked.request_id)
    )
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await stack.routers[1].CancelNotifyWhenAvailable(
            rt_pb2.CancelNotifyWhenAvailableRequest(request_id=asked.request_id)
        )
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    app.call.cancel()


# -- callbacks ------------------------------------------------------------------------


async def dial_for(stream: Any, callback_id: str) -> rt_pb2.StreamCallbackDialsResponse:
    """The next dial of this callback on a switch stream (dials of other tests' callbacks
    may come first on this shared stack)."""
    while True:
        dial = await asyncio.wait_for(stream.read(), 20)
        assert dial is not grpc.aio.EOF
        if dial.callback_id == callback_id:
            return dial


async def test_a_callback_is_dialled_retried_and_completed(stack: Stack) -> None:
    group = new_group()
    member, app = await agent(stack, group)
    customer = f"c-{uuid.uuid4().hex[:6]}"
    pushes = await in_app(stack, customer)
    dials = stack.routers[1].StreamCallbackDials(rt_pb2.StreamCallbackDialsRequest(switch_id="sw1"))
    context = C.ContextData(
        subject="mortgage", attributes={"display_name": "Ms Petit", "iban": "FR7630001007941"}
    )
    requested = await stack.routers[0].RequestCallback(
        rt_pb2.RequestCallbackRequest(
            application_id="bank",
            customer_id=customer,
            phone_number="+33 6 12 34 56 78",
            latest=window(3600),
            resource_group=group,
            idempotency_key="cb-key-1",
            context=context,
        )
    )
    callback_id = requested.callback.callback_id
    assert requested.callback.state == rt_pb2.CALLBACK_STATE_QUEUED
    # The same request again returns the same callback; another one is refused.
    again = await stack.routers[1].RequestCallback(
        rt_pb2.RequestCallbackRequest(
            application_id="bank",
            customer_id=customer,
            phone_number="+33612345678",
            latest=window(3600),
            resource_group=group,
            idempotency_key="cb-key-1",
        )
    )
    assert again.callback.callback_id == callback_id
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.routers[1].RequestCallback(
            rt_pb2.RequestCallbackRequest(
                application_id="bank",
                customer_id=customer,
                phone_number="+33612345678",
                latest=window(3600),
                resource_group=group,
            )
        )
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_details(refused.value)["ErrorInfo"].reason == "CALLBACK_EXISTS"

    # The number and the context are sealed in etcd, in the callback and in its dial.
    assert not await stored_anywhere(stack, b"+33612345678", b"FR7630001007941")
    preview = await answer(app, ACCEPT)
    assert preview.interaction_id == callback_id
    dial = await dial_for(dials, callback_id)
    assert not await stored_anywhere(stack, b"+33612345678", b"FR7630001007941")
    assert (dial.callback_id, dial.phone_number, dial.agent_id, dial.agent_address) == (
        callback_id,
        "+33612345678",
        member,
        f"ext-{member}",
    )
    assert dial.context == context
    got = await stack.routers[0].GetCallback(rt_pb2.GetCallbackRequest(callback_id=callback_id))
    assert (got.callback.state, got.callback.attempts) == (rt_pb2.CALLBACK_STATE_DIALLING, 1)

    # No answer: queued again and the customer is told the agent tried.
    await app.send(end_interaction=pr_pb2.EndInteraction(interaction_id=callback_id))
    report = await stack.routers[1].ReportCallbackAttempt(
        rt_pb2.ReportCallbackAttemptRequest(
            callback_id=callback_id, outcome=rt_pb2.CALLBACK_ATTEMPT_OUTCOME_NO_ANSWER
        )
    )
    assert report.callback.state == rt_pb2.CALLBACK_STATE_QUEUED
    told = (await asyncio.wait_for(pushes.read(), 20)).notification
    assert told.event_type == nt_pb2.EVENT_TYPE_CALLBACK_ATTEMPT_FAILED
    assert dict(told.data) == {"callback_id": callback_id}
    assert "+336" not in told.body

    await answer(app, ACCEPT)
    await dial_for(dials, callback_id)
    done = await stack.routers[0].ReportCallbackAttempt(
        rt_pb2.ReportCallbackAttemptRequest(
            callback_id=callback_id, outcome=rt_pb2.CALLBACK_ATTEMPT_OUTCOME_CONNECTED
        )
    )
    assert (done.callback.state, done.callback.attempts) == (rt_pb2.CALLBACK_STATE_COMPLETED, 2)
    # Finished: the customer may ask again, and a late report is refused.
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await stack.routers[0].ReportCallbackAttempt(
            rt_pb2.ReportCallbackAttemptRequest(
                callback_id=callback_id, outcome=rt_pb2.CALLBACK_ATTEMPT_OUTCOME_CONNECTED
            )
        )
    assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    fresh = await stack.routers[0].RequestCallback(
        rt_pb2.RequestCallbackRequest(
            application_id="bank",
            customer_id=customer,
            phone_number="+33612345678",
            latest=window(60),
            resource_group=group,
        )
    )
    await stack.routers[0].CancelCallback(
        rt_pb2.CancelCallbackRequest(callback_id=fresh.callback.callback_id)
    )
    cancelled = await stack.routers[1].GetCallback(
        rt_pb2.GetCallbackRequest(callback_id=fresh.callback.callback_id)
    )
    assert cancelled.callback.state == rt_pb2.CALLBACK_STATE_CANCELLED
    dials.cancel()
    pushes.cancel()
    app.call.cancel()


async def test_a_dial_taken_by_a_switch_that_drops_goes_to_another(stack: Stack) -> None:
    group = new_group()
    _, app = await agent(stack, group)
    first = stack.routers[0].StreamCallbackDials(rt_pb2.StreamCallbackDialsRequest(switch_id="a"))
    requested = await stack.routers[0].RequestCallback(
        rt_pb2.RequestCallbackRequest(
            application_id="bank",
            customer_id="c-drop",
            phone_number="+33612345679",
            latest=window(600),
            resource_group=group,
        )
    )
    await answer(app, ACCEPT)
    await dial_for(first, requested.callback.callback_id)
    first.cancel()
    second = stack.routers[1].StreamCallbackDials(rt_pb2.StreamCallbackDialsRequest(switch_id="b"))
    await dial_for(second, requested.callback.callback_id)
    done = await stack.routers[1].ReportCallbackAttempt(
        rt_pb2.ReportCallbackAttemptRequest(
            callback_id=requested.callback.callback_id,
            outcome=rt_pb2.CALLBACK_ATTEMPT_OUTCOME_CONNECTED,
        )
    )
    assert done.callback.state == rt_pb2.CALLBACK_STATE_COMPLETED
    second.cancel()
    app.call.cancel()


async def test_a_dial_no_switch_reports_counts_as_a_failed_attempt(stack: Stack) -> None:
    group = new_group()
    _, app = await agent(stack, group)
    customer = f"c-{uuid.uuid4().hex[:6]}"
    pushes = await in_app(stack, customer)
    silent = stack.routers[1].StreamCallbackDials(
        rt_pb2.StreamCallbackDialsRequest(switch_id="silent")
    )
    requested = await stack.routers[0].RequestCallback(
        rt_pb2.RequestCallbackRequest(
            application_id="bank",
            customer_id=customer,
            phone_number="+33612345680",
            latest=window(600),
            resource_group=group,
        )
    )
    callback_id = requested.callback.callback_id
    await answer(app, ACCEPT)
    # The switch takes the dial and never reports it (4 s dial timeout here).
    await dial_for(silent, callback_id)

    async def retried() -> bool:
        got = await stack.routers[0].GetCallback(rt_pb2.GetCallbackRequest(callback_id=callback_id))
        return (got.callback.state, got.callback.attempts) == (rt_pb2.CALLBACK_STATE_QUEUED, 1)

    await eventually(retried, what="the unreported dial counted as a failed attempt")
    told = (await asyncio.wait_for(pushes.read(), 20)).notification
    assert told.event_type == nt_pb2.EVENT_TYPE_CALLBACK_ATTEMPT_FAILED
    await stack.routers[0].CancelCallback(rt_pb2.CancelCallbackRequest(callback_id=callback_id))
    silent.cancel()
    pushes.cancel()
    app.call.cancel()


# -- errors ---------------------------------------------------------------------------


async def test_bad_requests_name_their_fields_and_unknown_ids_are_not_found(stack: Stack) -> None:
    router = stack.routers[0]
    cases: list[tuple[Any, Any, set[str]]] = [
        (
            router.EstimateWait,
            rt_pb2.EstimateWaitRequest(channel=99),
            {"resource_group", "channel"},
        ),
        (
            router.RequestCallback,
            rt_pb2.RequestCallbackRequest(
                application_id="bank",
                customer_id="c", phone_number="not a number", resource_group="g",
                earliest=window(30), latest=window(10),
            ),
            {"phone_number", "latest"},
        ),
        (
            router.RequestCallback,
            rt_pb2.RequestCallbackRequest(
                application_id="bank",
                customer_id="c", phone_number="+33612345678", resource_group="g",
                latest=window(9 * 24 * 3600),
                context=C.ContextData(attributes={f"k{i}": "v" for i in range(40)}),
            ),
            {"latest", "context.attributes"},
        ),
        (
            router.RequestNotifyWhenAvailable,
            rt_pb2.RequestNotifyWhenAvailableRequest(
                resource_group="g",
                handoff=cm_pb2.StartHandoffRequest(
                    application_id="bank", customer_id="other", idempotency_key="x"
                ),
            ),
            {"customer_id", "handoff.customer_id", "handoff.idempotency_key"},
        ),
        (
            router.SnoozeNotifyWhenAvailable,
            rt_pb2.SnoozeNotifyWhenAvailableRequest(
                request_id="r", snooze=duration_pb2.Duration(seconds=5)
            ),
            {"snooze"},
        ),
        (
            router.ReportCallbackAttempt,
            rt_pb2.ReportCallbackAttemptRequest(callback_id="cb"),
            {"outcome"},
        ),
    ]  # fmt: skip
    for method, request, fields in cases:
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await method(request)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert violated_fields(bad.value) == fields
    for method, request in [
        (router.GetCallback, rt_pb2.GetCallbackRequest(callback_id="cb-none")),
        (router.CancelCallback, rt_pb2.CancelCallbackRequest(callback_id="cb-none")),
        (
            router.SnoozeNotifyWhenAvailable,
            rt_pb2.SnoozeNotifyWhenAvailableRequest(
                request_id="nw-none", snooze=duration_pb2.Duration(seconds=600)
            ),
        ),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await method(request)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


# -- leader failover --------------------------------------------------------------------


async def test_killing_the_dispatch_leader_loses_no_queued_call_or_offer(
    etcd: EmbeddedEtcd, tmp_path: Path
) -> None:
    own = await start_stack(etcd, f"/test-{uuid.uuid4().hex[:12]}", tmp_path)
    try:
        leader = await eventually(
            lambda: own.store.get(rt_keys.LEADER, rt_store.Leader), what="a dispatch leader"
        )
        pid = int(leader.value.replica_id.split("/")[1])
        index = next(i for i, p in enumerate(own.router_processes) if p.process.pid == pid)
        survivor = own.routers[1 - index]
        group = new_group()
        _, numbers = await setup_numbers(own, group)
        member, app = await agent(own, group)
        # The first call is out as an offer when the leader dies; two more wait behind it.
        first = Call(survivor, numbers[0])
        await first.until("offered")
        preview = await app.next_kind("offer")
        waiting = [Call(survivor, numbers[0]) for _ in range(2)]
        for call in waiting:
            await call.until("queued")
        os.kill(pid, signal.SIGKILL)
        await app.send(
            offer_response=pr_pb2.OfferResponse(offer_id=preview.offer_id, decision=ACCEPT)
        )
        # The new leader finds the accepted offer and connects the call.
        assert (await first.until("connect", timeout=30)).connect.agent_id == member

        async def new_leader() -> bool:
            found = await own.store.get(rt_keys.LEADER, rt_store.Leader)
            return found is not None and found.meta.create_revision != leader.meta.create_revision

        await eventually(new_leader, what="another replica leads")
        for call in waiting:
            await app.send(
                end_interaction=pr_pb2.EndInteraction(interaction_id=preview.interaction_id)
            )
            offered = await call.until("offered", timeout=30)
            preview = await answer(app, ACCEPT)
            assert preview.interaction_id == offered.interaction_id
            assert (await call.until("connect")).connect.agent_id == member
        app.call.cancel()
    finally:
        await stop_stack(own)


async def test_a_stopping_replica_hands_its_waiting_calls_over_and_they_keep_their_place(
    etcd: EmbeddedEtcd, tmp_path: Path
) -> None:
    own = await start_stack(etcd, f"/test-{uuid.uuid4().hex[:12]}", tmp_path)
    try:
        group = new_group()
        app_id, numbers = await setup_numbers(own, group, 2)
        subject = await pool_subject(own, group)
        # Logged in but not ready: the calls wait in the queue.
        member, app = await agent(own, group, available=False, skill=subject)
        context = C.ContextData(
            subject=subject, attributes={"display_name": "Ms Martin", "policy": "POL-77125"}
        )
        started = await handoff(own, app_id, "c1", context)
        first = Call(own.routers[0], started.access_number)
        decided = (await first.next()).match_decided
        assert (await first.until("queued")).queued.position == 1
        second = Call(own.routers[1], numbers[1])
        assert (await second.until("queued")).queued.position == 2

        own.router_processes[0].signal(signal.SIGTERM)
        handed = (await first.until("failed")).failed
        assert handed.reason == rt_pb2.FAILURE_REASON_SERVER_STOPPING
        assert handed.retry_after.ToNanoseconds() > 0
        assert handed.resume_before.ToNanoseconds() > time.time_ns()
        assert await first.call.code() == grpc.StatusCode.OK
        # The context waits sealed, never in clear.
        assert not await stored_anywhere(own, b"POL-77125")

        # The switch calls the other replica with the token: no new match (the session
        # was consumed), the same interaction, still first in line.
        resumed = Call(own.routers[1], "", call_id=first.call_id, resume_token=handed.resume_token)
        again = (await resumed.next()).match_decided
        assert (again.session_id, again.outcome) == (decided.session_id, decided.outcome)
        assert resumed.events[0].interaction_id == first.events[0].interaction_id
        assert (await resumed.until("queued")).queued.position == 1
        with pytest.raises(grpc.aio.AioRpcError) as twice:
            await Call(
                own.routers[1], "", call_id=first.call_id, resume_token=handed.resume_token
            ).next()
        assert twice.value.code() == grpc.StatusCode.NOT_FOUND

        await set_available(app, True)
        assert (await resumed.until("offered")).offered.agent_id == member
        await answer(app, ACCEPT)
        connect = (await resumed.until("connect")).connect
        assert (connect.agent_id, connect.session_id) == (member, started.session_id)
        assert connect.context == context
        second.hang_up()
        app.call.cancel()
    finally:
        await stop_stack(own)


async def test_a_groups_queue_holds_at_most_its_maximum_over_all_replicas(
    etcd: EmbeddedEtcd, tmp_path: Path
) -> None:
    own = await start_stack(
        etcd,
        f"/test-{uuid.uuid4().hex[:12]}",
        tmp_path,
        ACCESSLINE_ROUTING_MAX_QUEUE_LENGTH="3",
    )
    try:
        group = new_group()
        _, numbers = await setup_numbers(own, group)
        _, app = await agent(own, group, available=False)
        calls = [Call(own.routers[i % 2], numbers[0]) for i in range(10)]
        first = await asyncio.gather(*(c.until("queued", "failed") for c in calls))
        queued = [c for c, e in zip(calls, first, strict=True) if e.HasField("queued")]
        full = [e.failed for e in first if e.HasField("failed")]
        assert len(queued) == 3
        assert len(full) == 7
        assert {f.reason for f in full} == {rt_pb2.FAILURE_REASON_QUEUE_FULL}
        assert all(f.retry_after.ToNanoseconds() > 0 for f in full)
        places, _ = await own.store.get_prefix(rt_keys.places(group), empty_pb2.Empty)
        assert len(places) == 3
        # One hangs up: its place is free for the next call.
        queued[0].hang_up()

        async def place_freed() -> bool:
            left, _ = await own.store.get_prefix(rt_keys.places(group), empty_pb2.Empty)
            return len(left) == 2

        await eventually(place_freed, what="the place of the call that hung up freed")
        late = Call(own.routers[0], numbers[0])
        assert (await late.until("queued", "failed")).HasField("queued")
        for call in [*queued[1:], late]:
            call.hang_up()
        app.call.cancel()
    finally:
        await stop_stack(own)


async def test_a_claim_never_outlives_its_offer(stack: Stack) -> None:
    """Should the leader die together with the call (nobody left to settle the offer),
    the agent is claimed no longer than the offer could be answered."""
    group = new_group()
    _, numbers = await setup_numbers(stack, group)
    member, app = await agent(stack, group)
    call = Call(stack.routers[0], numbers[0])
    await call.until("offered")
    claims, _ = await stack.store.get_prefix(rt_keys.claims_of(member), rt_store.AgentClaim)
    offers, _ = await stack.store.get_prefix(pr_offers.offers_key(member), pr_store.StoredOffer)
    assert len(claims) == len(offers) == 1
    timeout = float(ROUTING_ENV["ACCESSLINE_ROUTING_OFFER_TIMEOUT_SECONDS"])
    # etcd may round a small TTL up (to its minimum) and add the shared lease's window.
    assert await stack.store.lease_ttl(claims[0].meta.lease) <= (
        timeout + pr_offers.OFFER_MARGIN_SECONDS + 2
    )
    assert claims[0].meta.lease == offers[0].meta.lease
    call.hang_up()
    app.call.cancel()


async def test_an_accept_of_a_call_whose_router_died_is_undone_and_the_agent_told(
    etcd: EmbeddedEtcd, tmp_path: Path
) -> None:
    own = await start_stack(etcd, f"/test-{uuid.uuid4().hex[:12]}", tmp_path)
    try:
        group = new_group()
        _, numbers = await setup_numbers(own, group)
        member, app = await agent(own, group)
        holder = own.router_processes[0]
        call = Call(own.routers[0], numbers[0])
        await call.until("offered")
        preview = await app.next_kind("offer")
        # The replica holding the switch's stream dies; its calls live on until its lease
        # ends, and the agent accepts in that window.
        os.kill(holder.process.pid, signal.SIGKILL)
        await app.send(
            offer_response=pr_pb2.OfferResponse(offer_id=preview.offer_id, decision=ACCEPT)
        )
        event = await app.next()
        while event.WhichOneof("message") == "presence_confirmed":
            event = await app.next()
        kind = event.WhichOneof("message")
        assert kind in ("offer_response_recorded", "offer_response_refused"), event
        if kind == "offer_response_recorded":
            # Accepted in time: once the dead replica's lease ends the agent is told the
            # caller is gone, and is free again.
            gone = await app.next_kind("offer_cancelled", timeout=30)
            assert gone.reason == pr_pb2.OFFER_CANCEL_REASON_CALLER_GONE
            assert gone.offer_id == preview.offer_id
        shown = await own.pr.GetPresence(pr_pb2.GetPresenceRequest(agent_ids=[member]))

        async def free() -> bool:
            now = await own.pr.GetPresence(pr_pb2.GetPresenceRequest(agent_ids=[member]))
            return bool(now.agents[0].channels[0].presence == C.CHANNEL_PRESENCE_AVAILABLE)

        await eventually(free, timeout=30, what=f"agent free again ({shown})")
        ongoing, _ = await own.store.get_prefix(
            pr_offers.interactions_key(member), pr_store.StoredInteraction
        )
        assert ongoing == []
        app.call.cancel()
    finally:
        await stop_stack(own)


async def test_a_caller_who_hangs_up_after_the_accept_frees_the_agent(stack: Stack) -> None:
    group = new_group()
    _, numbers = await setup_numbers(stack, group)
    member, app = await agent(stack, group)
    call = Call(stack.routers[1], numbers[0])
    await call.until("offered")
    preview = await answer(app, ACCEPT)
    await app.next_kind("offer_response_recorded")
    # The switch's stream ends before it read the connect.
    call.hang_up()

    async def settled() -> bool:
        queued, _ = await stack.store.get_prefix(rt_keys.queue(group), rt_store.QueuedInteraction)
        return not queued

    await eventually(settled, what="the call out of the queue")
    ongoing, _ = await stack.store.get_prefix(
        pr_offers.interactions_key(member), pr_store.StoredInteraction
    )
    # Either the connect went out first (the agent is on the call until it ends it) or
    # the call was taken out before: then the agent is free and told.
    if ongoing:
        assert [o.value.interaction_id for o in ongoing] == [preview.interaction_id]
        assert ongoing[0].meta.lease != 0
    else:
        gone = await app.next_kind("offer_cancelled")
        assert gone.reason == pr_pb2.OFFER_CANCEL_REASON_CALLER_GONE
    app.call.cancel()


async def test_a_deposed_leader_changes_nothing(stack: Stack) -> None:
    """The leader's key is replaced behind its back (as when its lease ran out and another
    replica won): its next offer is refused by the fence and nothing is offered until a
    replica really leads again."""
    current = await eventually(
        lambda: stack.store.get(rt_keys.LEADER, rt_store.Leader), what="a dispatch leader"
    )
    pid = int(current.value.replica_id.split("/")[1])
    deposed = next(p for p in stack.router_processes if p.process.pid == pid)
    usurper = rt_store.Leader(replica_id="elsewhere/0/usurper")
    # etcd has no atomic replace of a key's identity: delete it and create ours at once;
    # should the other replica win the gap, it is deposed in turn on the next round.
    for _ in range(10):
        await stack.store.delete(rt_keys.LEADER)
        if await stack.store.create(rt_keys.LEADER, usurper) is not None:
            break
    else:
        pytest.fail("could not take the leader key")
    try:
        group = new_group()
        _, numbers = await setup_numbers(stack, group)
        member, app = await agent(stack, group)
        call = Call(stack.routers[0], numbers[0])
        await call.until("queued")
        await deposed.wait_for_log("held by another replica")
        entries, _ = await stack.store.get_prefix(rt_keys.queue(group), rt_store.QueuedInteraction)
        assert [e.value.state for e in entries] == [rt_store.INTERACTION_STATE_QUEUED]
        offers, _ = await stack.store.get_prefix(pr_offers.offers_key(member), pr_store.StoredOffer)
        claims, _ = await stack.store.get_prefix(rt_keys.claims_of(member), rt_store.AgentClaim)
        assert (offers, claims) == ([], [])
    finally:
        await stack.store.delete(rt_keys.LEADER)
    # A replica leads again and the call goes out.
    assert (await call.until("offered", timeout=30)).offered.agent_id == member
    call.hang_up()
    app.call.cancel()


async def test_a_dependency_failing_after_the_match_ends_the_stream_with_a_failed_event(
    stack: Stack, etcd: EmbeddedEtcd
) -> None:
    """Presence unreachable: the switch still gets the match decision, then `failed`
    with reason UNAVAILABLE on the stream rather than a broken stream."""
    group = new_group()
    _, numbers = await setup_numbers(stack, group)
    async with one_more_router(
        etcd,
        f"/test-{uuid.uuid4().hex[:12]}",
        ACCESSLINE_CALLMATCHING_ADDRESS=stack.processes[3].address,
        ACCESSLINE_PRESENCE_ADDRESS=f"127.0.0.1:{free_port()}",
        ACCESSLINE_ETCD_TIMEOUT_SECONDS="1",
    ) as lonely:
        call = Call(lonely, numbers[0])
        failed = await call.until("failed")
        assert call.kinds()[0] == "match_decided"
        assert failed.failed.reason == rt_pb2.FAILURE_REASON_UNAVAILABLE
        assert await call.call.code() == grpc.StatusCode.OK


async def test_a_call_waiting_past_the_maximum_queue_time_fails_and_leaves_the_queue(
    stack: Stack, etcd: EmbeddedEtcd
) -> None:
    group = new_group()
    _, numbers = await setup_numbers(stack, group)
    _, app = await agent(stack, group, available=False)
    async with one_more_router(
        etcd,
        stack.prefix,
        ACCESSLINE_CALLMATCHING_ADDRESS=stack.processes[3].address,
        ACCESSLINE_PRESENCE_ADDRESS=stack.processes[1].address,
        ACCESSLINE_NOTIFICATION_ADDRESS=stack.processes[2].address,
        ACCESSLINE_ROUTING_MAX_QUEUE_SECONDS="2",
        ACCESSLINE_ROUTING_QUEUE_UPDATE_SECONDS="0.2",
    ) as impatient:
        call = Call(impatient, numbers[0])
        assert (await call.until("queued")).queued.position == 1
        failed = await call.until("failed")
        assert failed.failed.reason == rt_pb2.FAILURE_REASON_QUEUE_TIMEOUT

        async def left() -> bool:
            entries, _ = await stack.store.get_prefix(
                rt_keys.queue(group), rt_store.QueuedInteraction
            )
            return not entries

        await eventually(left, what="the call out of the queue")
    app.call.cancel()


# -- personal data at rest -----------------------------------------------------------


async def raw_etcd(stack: Stack) -> list[tuple[str, bytes]]:
    """Every key and value the five services keep under the stack's prefix, raw."""
    found = await stack.store.txn([], [Op.get_prefix("")])
    return [(key, value) for key, value, _ in found.gets[0]]


def in_clear(entries: list[tuple[str, bytes]], needles: dict[str, bytes]) -> list[str]:
    return [
        f"{what} in {key}"
        for key, value in entries
        for what, needle in needles.items()
        if needle in value or needle in key.encode()
    ]


async def test_no_personal_datum_is_kept_in_clear_anywhere_in_etcd(stack: Stack) -> None:
    """A customer's whole journey (a handoff with a name, a location and private
    attributes, the call queued, offered and connected to an agent with a mobile
    number, a callback to a phone number, a notify request, a device with a push token),
    every raw etcd value and key read at each step: none holds a personal datum."""
    group = new_group()
    app_id, _ = await setup_numbers(stack, group, count=2)
    subject = await pool_subject(stack, group)
    customer = f"c-leak-{uuid.uuid4().hex[:6]}"
    mobile = "+33799887766"
    agent_id = f"agent-{uuid.uuid4().hex[:6]}"
    await stack.pr.RegisterAgent(
        pr_pb2.RegisterAgentRequest(
            agent=pr_pb2.Agent(
                agent_id=agent_id,
                skills=[pr_pb2.Skill(name=subject, level=5)],
                resource_groups=[group],
                channels=[
                    pr_pb2.ChannelConfig(
                        channel=C.CHANNEL_MOBILE_VOICE, address=mobile, available_on_login=True
                    )
                ],
            )
        )
    )
    agent_app = App(stack.processes[1].address)
    await agent_app.login(agent_id)
    await stack.nt.RegisterDevice(
        nt_pb2.RegisterDeviceRequest(
            device=nt_pb2.Device(
                device_id=f"d-{uuid.uuid4().hex[:6]}",
                customer_id=customer,
                application_id=app_id,
                platform=nt_pb2.PLATFORM_FCM,
                push_token="push-token-7f3a9c51e2",
            )
        )
    )
    context = C.ContextData(
        subject=subject,
        attributes={"display_name": "Ms Leakproof", "iban": "FR76LEAKPROOF0042"},
        location=C.GeoPoint(latitude=48.856613, longitude=2.352222),
    )
    needles = {
        "name": b"Ms Leakproof",
        "attribute": b"FR76LEAKPROOF0042",
        "latitude": struct.pack("<d", 48.856613),
        "longitude": struct.pack("<d", 2.352222),
        "agent's mobile": b"799887766",
        "push token": b"push-token-7f3a9c51e2",
        "callback number": b"655443322",
    }
    started = await handoff(stack, app_id, customer, context)
    leaks = in_clear(await raw_etcd(stack), needles)
    call = Call(stack.routers[0], started.access_number)
    await call.until("offered")
    leaks += in_clear(await raw_etcd(stack), needles)
    await answer(agent_app, ACCEPT)
    connect_to = (await call.until("connect")).connect
    assert (connect_to.address, connect_to.context) == (mobile, context)
    leaks += in_clear(await raw_etcd(stack), needles)
    await stack.routers[1].RequestCallback(
        rt_pb2.RequestCallbackRequest(
            application_id=app_id,
            customer_id=customer,
            phone_number="+33 6 55 44 33 22",
            latest=window(3600),
            resource_group=new_group(),
            context=context,
        )
    )
    await stack.routers[0].RequestNotifyWhenAvailable(
        rt_pb2.RequestNotifyWhenAvailableRequest(
            customer_id=customer,
            resource_group=new_group(),
            handoff=cm_pb2.StartHandoffRequest(application_id=app_id, context=context),
        )
    )
    entries = await raw_etcd(stack)
    leaks += in_clear(entries, needles)
    assert leaks == []
    # Customer ids are the apps' own (pseudonymous) ids: kept in values where a record
    # needs its owner, never in a key name, where they would match by prefix.
    assert [key for key, _ in entries if customer in key] == []
    agent_app.call.cancel()
