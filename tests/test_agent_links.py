"""An agent sends the customer of the call they are working a link: it reaches the
customer's app in-app (and by push), only from allowed origins, only to the customer of
an interaction the agent is on, a bounded number of times, once per URL. Against the
five services as processes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from accessline.journey.v1 import journey_pb2 as jn
from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline.notification.v1 import notification_pb2_grpc as nt_grpc
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from tests.conftest import connect, identity, violated_fields
from tests.support.journey import until_listed
from tests.support.stack import (
    ACCEPT,
    C,
    Call,
    Stack,
    agent,
    answer,
    handoff,
    in_app,
    new_group,
    pool_subject,
    setup_numbers,
    start_stack,
    stop_stack,
)

FORMS = "https://forms.example.test"


@pytest.fixture(scope="module")
async def stack(
    etcd: EmbeddedEtcd, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    started = await start_stack(
        etcd,
        f"/links-{uuid.uuid4().hex[:8]}",
        tmp_path_factory.mktemp("links"),
        notification_env={
            "ACCESSLINE_NOTIFICATION_LINK_ORIGINS": f"{FORMS}, https://sign.example.test",
            "ACCESSLINE_NOTIFICATION_LINKS_PER_INTERACTION": "3",
        },
        ACCESSLINE_ROUTING_OFFER_TIMEOUT_SECONDS="30",
    )
    yield started
    await stop_stack(started)


def as_agent(stack: Stack, agent_id: str) -> Any:
    return nt_grpc.NotificationServiceStub(
        connect(stack.processes[2].address, identity().token(agent_id, "agent"))
    )


async def link(stub: Any, interaction_id: str, url: str, title: str = "") -> Any:
    return await stub.SendLink(
        nt_pb2.SendLinkRequest(interaction_id=interaction_id, url=url, title=title)
    )


async def refused(stub: Any, interaction_id: str, url: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await link(stub, interaction_id, url)
    return caught.value


async def test_a_link_reaches_the_customer_of_the_agents_interaction_only(stack: Stack) -> None:
    group = new_group()
    app_id, numbers = await setup_numbers(stack, group, survey_after_call=True)
    subject = await pool_subject(stack, group)
    agent_id, app = await agent(stack, group, skill=subject)
    customer = f"customer-{uuid.uuid4().hex[:6]}"
    inbox = await in_app(stack, customer, app_id)  # the customer's app listens in-app

    await handoff(stack, app_id, customer, C.ContextData(subject=subject))
    call = Call(stack.routers[0], numbers[0])
    offer = await answer(app, ACCEPT)
    await call.until("connect")
    stub = as_agent(stack, agent_id)

    sent = await link(stub, offer.interaction_id, f"{FORMS}/claims/17?step=2", "Your claim form")
    assert sent.device_count == 1
    assert not sent.duplicate
    received = await asyncio.wait_for(inbox.read(), 15)
    shown = received.notification
    assert (shown.event_type, shown.link_url, shown.title) == (
        nt_pb2.EVENT_TYPE_LINK,
        f"{FORMS}/claims/17?step=2",
        "Your claim form",
    )
    assert shown.data["interaction_id"] == offer.interaction_id
    # The same URL again is sent once.
    again = await link(stub, offer.interaction_id, f"{FORMS}/claims/17?step=2")
    assert again.duplicate
    assert again.notification_id == sent.notification_id

    # Origins not allowed, or not https, are refused with the field named.
    for url in ("https://evil.example.test/x", "http://forms.example.test/x", "javascript:1"):
        bad = await refused(stub, offer.interaction_id, url)
        assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT, url
        assert violated_fields(bad) == {"url"}
    # Another agent cannot reach this customer through this interaction.
    other = await refused(as_agent(stack, "agent-other"), offer.interaction_id, f"{FORMS}/a")
    assert other.code() == grpc.StatusCode.NOT_FOUND

    # At most 3 links per interaction (the first counted once).
    await link(stub, offer.interaction_id, f"{FORMS}/b")
    await link(stub, offer.interaction_id, "https://sign.example.test/doc/9")
    full = await refused(stub, offer.interaction_id, f"{FORMS}/c")
    assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    # Once the agent ended the interaction, no more links.
    await app.send(end_interaction=pr_pb2.EndInteraction(interaction_id=offer.interaction_id))
    await app.next_kind("presence_confirmed")
    ended = await refused(stub, offer.interaction_id, f"{FORMS}/b")
    assert ended.code() == grpc.StatusCode.NOT_FOUND

    # Each link sent is in the customer's journey, pending, with its agent; the call,
    # ended, is closed and followed by the survey's invitation.
    def complete(found: list[Any]) -> bool:
        kinds = [r.channel for r in found]
        return (
            kinds.count(jn.INTERACTION_CHANNEL_LINK) == 3
            and found[-1].status == jn.INTERACTION_STATUS_CLOSED
            and any(r.topic == "survey" for r in found)
        )

    found = await until_listed(stack, app_id, customer, complete)
    assert found[-1].agent_id == agent_id
    links = [r for r in found if r.channel == jn.INTERACTION_CHANNEL_LINK]
    assert len(links) == 3
    assert {(r.status, r.agent_id) for r in links} == {(jn.INTERACTION_STATUS_PENDING, agent_id)}
    assert sent.notification_id in {r.interaction_id for r in links}
    inbox.cancel()
    call.hang_up()
    app.call.cancel()


async def test_a_call_that_matched_no_customer_has_no_one_to_send_a_link_to(
    stack: Stack,
) -> None:
    group = new_group()
    _, numbers = await setup_numbers(stack, group)
    agent_id, app = await agent(stack, group)
    call = Call(stack.routers[0], numbers[0])  # no handoff: the call does not match
    offer = await answer(app, ACCEPT)
    await call.until("connect")
    unknown = await refused(as_agent(stack, agent_id), offer.interaction_id, f"{FORMS}/x")
    assert unknown.code() == grpc.StatusCode.FAILED_PRECONDITION
    call.hang_up()
    app.call.cancel()
