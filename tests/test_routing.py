"""Routing end to end, the call path: the switch on RouteInboundCall, the match, agent
selection and priority, offers answered or not, bad requests (no personal datum in
clear in etcd is test_routing_privacy.py's).
The stack (tests/conftest.py's `stack`, the five services as processes, two Routing
replicas) is shared by the routing test modules; every group is a fresh one."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.presence.storage.v1 import storage_pb2 as pr_store
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.routing.storage.v1 import storage_pb2 as rt_store
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline_server.presence import offers as pr_offers
from accessline_server.routing import keys as rt_keys
from tests.conftest import (
    eventually,
    violated_fields,
)
from tests.support.presence import App
from tests.support.stack import (
    ACCEPT,
    DECLINE,
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
    window,
)

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
        customer_segment="gold",
        location=C.GeoPoint(latitude=48.85, longitude=2.35),
        auth_token_ref="tok-ref-1",
        attributes={"display_name": "Ms Martin", "policy": "P-12"},
    )
    started = await handoff(stack, app_id, "c1", context)
    call = Call(stack.routers[0], started.access_number)
    decided = await call.next()
    assert decided.match_decided.treatment == rt_pb2.TREATMENT_SKIP_IVR
    assert decided.match_decided.resource_group == group
    assert (await call.until("offered")).offered.agent_id == expert
    preview = await answer(expert_app, ACCEPT)
    shown = preview.summary
    assert (shown.customer_display_name, shown.service_request_id, shown.customer_segment) == (
        "Ms Martin",
        "SR-7",
        "gold",
    )
    assert (shown.location.latitude, shown.location.longitude) == (48.85, 2.35)
    assert shown.match_outcome == cm_pb2.MATCH_OUTCOME_MATCHED
    assert shown.waiting_since.seconds > 0
    # The agent who accepts gets the whole context the app sent, not only the preview.
    recorded = await expert_app.next_kind("offer_response_recorded")
    assert recorded.context == context
    connect = (await call.until("connect")).connect
    assert (connect.agent_id, connect.address, connect.session_id) == (
        expert,
        f"ext-{expert}",
        started.session_id,
    )
    assert connect.context == context
    assert await call.call.read() is grpc.aio.EOF
    # An app that reconnects during the call is shown it again, its whole context too.
    again = App(stack.processes[1].address)
    [ongoing] = (await again.login(expert)).interactions
    assert (ongoing.interaction_id, ongoing.channel, ongoing.context) == (
        preview.interaction_id,
        C.CHANNEL_DESK_VOICE,
        context,
    )
    for app in (junior_app, expert_app, again):
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


async def test_a_connected_call_whose_phone_failed_goes_back_to_the_queue_once(
    stack: Stack,
) -> None:
    """The switch could not reach the accepting agent's phone: RouteInboundCall with the
    connect's redirect token (another replica, the same call id) ends that agent's
    interaction and offers the call, with its match, to the next agent. The token is
    good once, and for this call only."""
    group = new_group()
    _, numbers = await setup_numbers(stack, group)
    first, first_app = await agent(stack, group, 9)
    second, second_app = await agent(stack, group, 3)
    call = Call(stack.routers[0], numbers[0])
    assert (await call.until("offered")).offered.agent_id == first
    offer = await answer(first_app, ACCEPT)
    connect = (await call.until("connect")).connect
    assert connect.agent_id == first
    assert connect.redirect_before.ToSeconds() > time.time()

    async def redirected(call_id: str) -> Call:
        return Call(stack.routers[1], "", call_id=call_id, resume_token=connect.redirect_token)

    with pytest.raises(grpc.aio.AioRpcError) as stranger:
        await (await redirected("another-call")).next()
    assert stranger.value.code() == grpc.StatusCode.NOT_FOUND
    again = await redirected(call.call_id)
    assert (await again.next()).match_decided.resource_group == group
    cancelled = await first_app.next_kind("offer_cancelled")
    assert (cancelled.offer_id, cancelled.reason) == (
        offer.offer_id,
        pr_pb2.OFFER_CANCEL_REASON_CALLER_GONE,
    )
    assert (await again.until("offered")).offered.agent_id == second
    await answer(second_app, ACCEPT)
    assert (await again.until("connect")).connect.agent_id == second
    with pytest.raises(grpc.aio.AioRpcError) as used:
        await (await redirected(call.call_id)).next()
    assert used.value.code() == grpc.StatusCode.NOT_FOUND
    for app in (first_app, second_app):
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
    assert confirmed.presence.not_ready_reason == "no-answer"
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
        open_offer = ""
        while True:
            reply = await app.next(60)
            kind = reply.WhichOneof("message")
            # An offer that ended without the call (it timed out before the accept, on a
            # slow machine) leaves the agent free again.
            ended = kind in ("offer_cancelled", "offer_response_refused")
            if ended and getattr(reply, kind).offer_id == open_offer:
                busy_with, open_offer = None, ""
            if kind == "offer":
                if busy_with is not None:
                    violations.append(
                        f"{agent_id} offered {reply.offer.interaction_id} during {busy_with}"
                    )
                busy_with, open_offer = reply.offer.interaction_id, reply.offer.offer_id
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
                busy_with, open_offer = None, ""

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
