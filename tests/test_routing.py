"""Routing end to end: NumberDistribution, CallMatching, Presence and two Routing
replicas as real processes on one etcd, agent apps on Presence streams. A matched call
skips the IVR and reaches the best agent with its context; an unmatched call is sent
through the IVR and routed by the dialled number's group; a decline or a timeout moves
on to the next agent; a hang-up releases the agent; an agent is never offered two calls."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.callmatching.v1 import call_matching_pb2_grpc as cm_grpc
from accessline.common.v1 import common_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2_grpc as nd_grpc
from accessline.presence.storage.v1 import storage_pb2 as pr_store
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.presence.v1 import presence_pb2_grpc as pr_grpc
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline.routing.v1 import routing_pb2_grpc as rt_grpc
from services.presence import keys as pr_keys
from services.routing import keys as rt_keys
from services.runtime.embedded_etcd import EmbeddedEtcd
from services.runtime.store import Store
from tests.conftest import ServiceProcess, eventually, wait_serving
from tests.test_presence import App

C = common_pb2


@dataclass
class Stack:
    nd: Any
    cm: Any
    pr: Any
    routers: list[Any]
    store: Store


@pytest.fixture
async def stack(
    service_factory: Callable[..., ServiceProcess], etcd: EmbeddedEtcd, prefix: str, tmp_path: Any
) -> AsyncIterator[Stack]:
    nd = service_factory("services.numberdistribution")
    pr = service_factory("services.presence")
    await wait_serving(nd)
    cm = service_factory(
        "services.callmatching",
        ACCESSLINE_NUMBERDISTRIBUTION_ADDRESS=nd.address,
        ACCESSLINE_HISTORY_DSN=f"sqlite+aiosqlite:///{tmp_path / 'history.db'}",
    )
    await wait_serving(pr)
    await wait_serving(cm)
    routers = [
        service_factory(
            "services.routing",
            ACCESSLINE_CALLMATCHING_ADDRESS=cm.address,
            ACCESSLINE_PRESENCE_ADDRESS=pr.address,
            ACCESSLINE_ROUTING_OFFER_TIMEOUT_SECONDS="2",
        )
        for _ in range(2)
    ]
    for router in routers:
        await wait_serving(router)
    channels = [grpc.aio.insecure_channel(p.address) for p in (nd, cm, pr, *routers)]
    async with Store(etcd.endpoint, prefix) as store:
        yield Stack(
            nd_grpc.NumberDistributionServiceStub(channels[0]),
            cm_grpc.CallMatchingServiceStub(channels[1]),
            pr_grpc.PresenceServiceStub(channels[2]),
            [rt_grpc.RoutingServiceStub(c) for c in channels[3:]],
            store,
        )
    for channel in channels:
        await channel.close()


async def agent(stack: Stack, group: str, level: int, languages: list[str]) -> tuple[str, App]:
    agent_id = f"agent-{uuid.uuid4().hex[:6]}"
    await stack.pr.RegisterAgent(
        pr_pb2.RegisterAgentRequest(
            agent=pr_pb2.Agent(
                agent_id=agent_id,
                skills=[pr_pb2.Skill(name="mortgage", level=level)],
                languages=languages,
                resource_groups=[group],
                channels=[
                    pr_pb2.ChannelConfig(
                        channel=C.CHANNEL_DESK_VOICE,
                        address=f"ext-{agent_id}",
                        available_on_login=True,
                    )
                ],
            )
        )
    )
    app = App(stack.pr)
    await app.login(agent_id)
    return agent_id, app


async def setup_numbers(stack: Stack, group: str) -> tuple[str, str]:
    subject = "mortgage"
    pool_id = f"p-{uuid.uuid4().hex[:6]}"
    await stack.nd.CreatePool(
        nd_pb2.CreatePoolRequest(
            pool=nd_pb2.Pool(pool_id=pool_id, subjects=[subject], resource_group=group)
        )
    )
    number = f"+3313{uuid.uuid4().int % 10**7:07d}"
    await stack.nd.AddNumbers(nd_pb2.AddNumbersRequest(pool_id=pool_id, numbers=[number]))
    app_id = f"app-{uuid.uuid4().hex[:6]}"
    await stack.cm.RegisterApplication(
        cm_pb2.RegisterApplicationRequest(
            application=cm_pb2.Application(
                application_id=app_id, match_schema=C.MATCH_SCHEMA_NUMBER, skip_ivr_on_match=True
            )
        )
    )
    return app_id, number


async def events_until_offer(call: Any) -> list[rt_pb2.RouteInboundCallResponse]:
    seen = []
    while True:
        event = await asyncio.wait_for(call.read(), 20)
        assert event is not grpc.aio.EOF, seen
        seen.append(event)
        if event.WhichOneof("event") in ("offered", "connect", "failed"):
            return seen


async def test_a_matched_call_skips_the_ivr_and_reaches_the_best_agent_with_its_context(
    stack: Stack,
) -> None:
    group = f"g-{uuid.uuid4().hex[:6]}"
    app_id, _number = await setup_numbers(stack, group)
    _junior, junior_app = await agent(stack, group, 3, ["fr-FR"])
    expert, expert_app = await agent(stack, group, 9, ["fr-FR"])
    context = C.ContextData(
        subject="mortgage",
        language="fr-FR",
        service_request_id="SR-7",
        attributes={"display_name": "Ms Martin"},
    )
    handoff = await stack.cm.StartHandoff(
        cm_pb2.StartHandoffRequest(application_id=app_id, customer_id="c1", context=context)
    )

    call = stack.routers[0].RouteInboundCall(
        rt_pb2.RouteInboundCallRequest(call_id="call-1", dnis=handoff.access_number)
    )
    decided, offered = await events_until_offer(call)
    assert decided.match_decided.treatment == rt_pb2.TREATMENT_SKIP_IVR
    assert decided.match_decided.resource_group == group
    assert offered.offered.agent_id == expert
    preview = await expert_app.next_kind("offer")
    assert (preview.summary.customer_display_name, preview.summary.service_request_id) == (
        "Ms Martin",
        "SR-7",
    )
    await expert_app.send(
        offer_response=pr_pb2.OfferResponse(
            offer_id=preview.offer_id, decision=pr_pb2.OFFER_DECISION_ACCEPT
        )
    )
    connect = (await asyncio.wait_for(call.read(), 20)).connect
    assert (connect.agent_id, connect.address, connect.session_id) == (
        expert,
        f"ext-{expert}",
        handoff.session_id,
    )
    assert connect.context == context
    assert await call.read() is grpc.aio.EOF
    for app in (junior_app, expert_app):
        app.call.cancel()


async def test_an_unmatched_call_goes_through_the_ivr_then_to_the_numbers_group(
    stack: Stack,
) -> None:
    group = f"g-{uuid.uuid4().hex[:6]}"
    _, number = await setup_numbers(stack, group)
    member, app = await agent(stack, group, 5, ["en-GB"])
    call = stack.routers[1].RouteInboundCall(
        rt_pb2.RouteInboundCallRequest(call_id="call-2", dnis=number)
    )
    decided, offered = await events_until_offer(call)
    assert decided.match_decided.outcome == cm_pb2.MATCH_OUTCOME_NO_RESERVATION
    assert decided.match_decided.treatment == rt_pb2.TREATMENT_IVR_AUTHENTICATE
    assert offered.offered.agent_id == member
    preview = await app.next_kind("offer")
    assert preview.summary.subject == ""  # nothing known of an unmatched caller
    call.cancel()
    app.call.cancel()


async def test_a_decline_and_a_timeout_move_on_to_the_next_agent(stack: Stack) -> None:
    group = f"g-{uuid.uuid4().hex[:6]}"
    _, number = await setup_numbers(stack, group)
    first, first_app = await agent(stack, group, 9, [])
    second, second_app = await agent(stack, group, 6, [])
    third, third_app = await agent(stack, group, 3, [])
    call = stack.routers[0].RouteInboundCall(
        rt_pb2.RouteInboundCallRequest(call_id="call-3", dnis=number)
    )
    _, offered = await events_until_offer(call)
    assert offered.offered.agent_id == first
    preview = await first_app.next_kind("offer")
    await first_app.send(
        offer_response=pr_pb2.OfferResponse(
            offer_id=preview.offer_id, decision=pr_pb2.OFFER_DECISION_DECLINE
        )
    )
    offered = (await asyncio.wait_for(call.read(), 20)).offered
    assert offered.agent_id == second
    await second_app.next_kind("offer")  # and let it time out (2 s here)
    assert (
        await second_app.next_kind("offer_cancelled")
    ).reason == pr_pb2.OFFER_CANCEL_REASON_TIMED_OUT
    offered = (await asyncio.wait_for(call.read(), 20)).offered
    assert offered.agent_id == third
    preview = await third_app.next_kind("offer")
    await third_app.send(
        offer_response=pr_pb2.OfferResponse(
            offer_id=preview.offer_id, decision=pr_pb2.OFFER_DECISION_ACCEPT
        )
    )
    assert (await asyncio.wait_for(call.read(), 20)).connect.agent_id == third
    for app in (first_app, second_app, third_app):
        app.call.cancel()


async def test_a_hang_up_releases_the_agent_and_withdraws_the_offer(stack: Stack) -> None:
    group = f"g-{uuid.uuid4().hex[:6]}"
    _, number = await setup_numbers(stack, group)
    member, app = await agent(stack, group, 5, [])
    call = stack.routers[0].RouteInboundCall(
        rt_pb2.RouteInboundCallRequest(call_id="call-4", dnis=number)
    )
    await events_until_offer(call)
    preview = await app.next_kind("offer")
    call.cancel()
    cancelled = await app.next_kind("offer_cancelled")
    assert cancelled.offer_id == preview.offer_id

    async def released() -> bool:
        entries, _ = await stack.store.get_prefix(
            rt_keys.CLAIMS + member + "/", pr_store.StoredOffer
        )
        return not entries

    await eventually(released, what="claim released after hang-up")
    offer = await stack.store.get(pr_keys.offer(member, preview.offer_id), pr_store.StoredOffer)
    assert offer is None or offer.value.state == pr_store.OFFER_STATE_CANCELLED
    app.call.cancel()


async def test_two_replicas_never_offer_one_agent_two_calls(stack: Stack) -> None:
    group = f"g-{uuid.uuid4().hex[:6]}"
    _, number = await setup_numbers(stack, group)
    member, app = await agent(stack, group, 5, [])
    calls = [
        stack.routers[i].RouteInboundCall(
            rt_pb2.RouteInboundCallRequest(call_id=f"race-{i}", dnis=number)
        )
        for i in range(2)
    ]
    results = await asyncio.gather(*(events_until_offer(c) for c in calls))
    last = [r[-1].WhichOneof("event") for r in results]
    assert sorted(last) == ["failed", "offered"]
    assert [r[-1].offered.agent_id for r in results if r[-1].WhichOneof("event") == "offered"] == [
        member
    ]
    for call in calls:
        call.cancel()
    app.call.cancel()


async def test_an_agent_takes_the_next_call_as_soon_as_the_last_one_ends(stack: Stack) -> None:
    group = f"g-{uuid.uuid4().hex[:6]}"
    _, number = await setup_numbers(stack, group)
    member, app = await agent(stack, group, 5, [])
    first = stack.routers[0].RouteInboundCall(
        rt_pb2.RouteInboundCallRequest(call_id="first", dnis=number)
    )
    await events_until_offer(first)
    preview = await app.next_kind("offer")
    await app.send(
        offer_response=pr_pb2.OfferResponse(
            offer_id=preview.offer_id, decision=pr_pb2.OFFER_DECISION_ACCEPT
        )
    )
    assert (await asyncio.wait_for(first.read(), 20)).connect.agent_id == member
    busy = await app.next_kind("presence_confirmed")
    assert busy.presence.channels[0].presence == C.CHANNEL_PRESENCE_BUSY

    # While busy, the agent is not offered another call.
    second = stack.routers[1].RouteInboundCall(
        rt_pb2.RouteInboundCallRequest(call_id="second", dnis=number)
    )
    assert (await events_until_offer(second))[-1].WhichOneof("event") == "failed"

    await app.send(end_interaction=pr_pb2.EndInteraction(interaction_id=preview.interaction_id))
    await app.next_kind("presence_confirmed")
    third = stack.routers[1].RouteInboundCall(
        rt_pb2.RouteInboundCallRequest(call_id="third", dnis=number)
    )
    assert (await events_until_offer(third))[-1].offered.agent_id == member
    third.cancel()
    app.call.cancel()
