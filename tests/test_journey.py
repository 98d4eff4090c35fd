"""The customer's journey against the five services and a real history database: a
handoff and its call recorded by CallMatching and Routing, an outside e-mail correlated
by its transaction, a text by a phone number tied to the customer, a customer reading
only their own records, the open transactions travelling with the next call, no
identifier in clear in the tables."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from accessline.common.v1 import common_pb2 as C
from accessline.journey.v1 import journey_pb2 as jn
from accessline.journey.v1 import journey_pb2_grpc as jn_grpc
from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.routing.v1 import routing_pb2 as rt_pb2
from tests.conftest import (
    ServiceProcess,
    connect,
    error_details,
    eventually,
    identity,
    violated_fields,
    wait_serving,
)
from tests.support.journey import journey, listed, until_listed
from tests.support.stack import (
    ACCEPT,
    Call,
    Stack,
    agent,
    answer,
    handoff,
    in_app,
    new_group,
    pool_subject,
    setup_numbers,
    window,
)

EMAIL = jn.INTERACTION_CHANNEL_EMAIL
TEXT = jn.INTERACTION_CHANNEL_TEXT
VOICE = jn.INTERACTION_CHANNEL_APP_VOICE
CLOSED = jn.INTERACTION_STATUS_CLOSED


async def outside(
    stack: Stack,
    app_id: str,
    interaction_id: str,
    channel: int,
    ago: float = 0.0,
    **correlation: str,
) -> jn.Interaction:
    """An interaction another system posts (`ago` seconds ago: now unless given)."""
    transaction = correlation.pop("transaction_id", "")
    interaction = jn.Interaction(
        interaction_id=interaction_id,
        application_id=app_id,
        transaction_id=transaction,
        channel=channel,
        topic="claim",
        status=jn.INTERACTION_STATUS_RECEIVED,
    )
    if ago:
        interaction.occurred_at.FromSeconds(int(time.time() - ago))
    reply = await journey(stack).RecordInteraction(
        jn.RecordInteractionRequest(
            interaction=interaction, correlation=jn.Correlation(**correlation)
        )
    )
    return reply.interaction


async def connected_call(
    stack: Stack, context: C.ContextData, customer: str, app_id: str = "", ani: str = ""
) -> tuple[Any, ...]:
    """A customer's handoff (of a new application unless given) and their call connected
    to an agent: (app, session, agent, group, the switch's Connect)."""
    group = new_group()
    new_app, _ = await setup_numbers(stack, group, 2)
    app_id = app_id or new_app
    context.subject = await pool_subject(stack, group)
    agent_id, agent_app = await agent(stack, group)
    reached = await handoff(stack, app_id, customer, context)
    call = Call(stack.routers[0], reached.access_number, ani=ani)
    await answer(agent_app, ACCEPT)
    connect_event = (await call.until("connect")).connect
    agent_app.call.cancel()
    return app_id, reached.session_id, agent_id, group, connect_event


async def test_a_handoff_and_its_call_are_one_answered_interaction(stack: Stack) -> None:
    customer = f"cust-{uuid.uuid4().hex[:6]}"
    app_id, session_id, agent_id, group, _ = await connected_call(
        stack, C.ContextData(service_request_id="claim-77"), customer
    )
    # Routing and CallMatching each add what they know, in whichever order they land.
    [record] = await until_listed(
        stack,
        app_id,
        customer,
        lambda f: f and f[0].status == jn.INTERACTION_STATUS_ANSWERED and f[0].outcome,
    )
    assert record.interaction_id == session_id
    assert record.channel == VOICE
    assert record.source == jn.INTERACTION_SOURCE_ACCESSLINE
    assert (record.agent_id, record.resource_group, record.outcome) == (agent_id, group, "MATCHED")
    assert record.transaction_id == "claim-77"
    assert record.topic  # the handoff's subject


async def test_an_outside_email_joins_the_customer_by_its_transaction(stack: Stack) -> None:
    customer, other = (f"cust-{uuid.uuid4().hex[:6]}" for _ in range(2))
    claim = f"claim-{uuid.uuid4().hex[:6]}"
    app_id, session_id, *_ = await connected_call(
        stack, C.ContextData(service_request_id=claim), customer
    )
    await until_listed(stack, app_id, customer, lambda f: len(f) == 1)
    # The e-mail names the claim only: no customer id, no address known.
    email = await outside(
        stack, app_id, f"mail-{uuid.uuid4().hex[:6]}", EMAIL, transaction_id=claim
    )
    assert email.source == jn.INTERACTION_SOURCE_OUTSIDE
    mine = await listed(journey(stack), app_id, customer)
    assert [r.interaction_id for r in mine] == [email.interaction_id, session_id]
    # Another system does not rewrite what Accessline recorded.
    with pytest.raises(grpc.aio.AioRpcError) as taken:
        await outside(stack, app_id, session_id, EMAIL, customer_id=customer)
    assert error_details(taken.value)["ErrorInfo"].reason == "INTERACTION_RECORDED_BY_ACCESSLINE"
    assert await listed(journey(stack), app_id, other) == []
    by_claim = await listed(journey(stack), app_id, transaction_id=claim)
    assert {r.interaction_id for r in by_claim} == {email.interaction_id, session_id}
    only_mail = await listed(journey(stack), app_id, customer, channels=[EMAIL])
    assert [r.interaction_id for r in only_mail] == [email.interaction_id]


async def test_a_text_joins_the_customer_by_a_phone_number_tied_to_them(stack: Stack) -> None:
    group = new_group()
    app_id, _ = await setup_numbers(stack, group)
    customer = f"cust-{uuid.uuid4().hex[:6]}"
    # One record names the customer and their phone: the number is tied to them...
    await outside(
        stack, app_id, "text-1", TEXT, 600, customer_id=customer, phone_number="+33612345678"
    )
    # ...so a later text from that number, in national form, is theirs too.
    await outside(
        stack, app_id, "text-2", TEXT, 60, phone_number="06 12 34 56 78", default_region="FR"
    )
    await outside(stack, app_id, "text-3", TEXT, phone_number="+33699999999")
    mine = await listed(journey(stack), app_id, customer)
    assert sorted(r.interaction_id for r in mine) == ["text-1", "text-2"]
    # Pages of one, newest first, no record twice.
    first = await journey(stack).ListInteractions(
        jn.ListInteractionsRequest(application_id=app_id, customer_id=customer, page_size=1)
    )
    second = await journey(stack).ListInteractions(
        jn.ListInteractionsRequest(
            application_id=app_id,
            customer_id=customer,
            page_size=1,
            page_token=first.next_page_token,
        )
    )
    assert [r.interaction_id for r in (*first.interactions, *second.interactions)] == [
        r.interaction_id for r in mine
    ]
    assert second.next_page_token == ""
    # Only what happened within a time range.
    since = timestamp_pb2.Timestamp()
    since.FromSeconds(int(time.time() - 300))
    recent = await listed(journey(stack), app_id, customer, start_time=since)
    assert [r.interaction_id for r in recent] == ["text-2"]


async def test_a_matched_call_ties_its_callers_number_to_the_customer(stack: Stack) -> None:
    customer = f"cust-{uuid.uuid4().hex[:6]}"
    number = f"+3361{uuid.uuid4().int % 10**7:07d}"
    app_id, session_id, *_ = await connected_call(stack, C.ContextData(), customer, ani=number)
    await until_listed(stack, app_id, customer, lambda f: f and f[0].outcome == "MATCHED")
    # The IVR's system posts a later call from that number, without the customer's id.
    await outside(stack, app_id, "ivr-call-1", jn.INTERACTION_CHANNEL_VOICE, phone_number=number)
    mine = await listed(journey(stack), app_id, customer)
    assert [r.interaction_id for r in mine] == ["ivr-call-1", session_id]


async def test_a_customer_reads_only_their_own_journey(stack: Stack) -> None:
    group = new_group()
    app_id, _ = await setup_numbers(stack, group)
    customer = f"cust-{uuid.uuid4().hex[:6]}"
    await outside(stack, app_id, "mail-own", EMAIL, customer_id=customer)
    theirs = identity().token(customer, "customer", applications=[app_id])
    assert [r.interaction_id for r in await listed(journey(stack, theirs), app_id, customer)] == [
        "mail-own"
    ]
    refused = {
        "another customer": (theirs, app_id, "someone-else"),
        "another application": (theirs, "other-app", customer),
        "a token naming no application": (
            identity().token(customer, "customer"),
            app_id,
            customer,
        ),
    }
    for case, (token, app, whose) in refused.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await listed(journey(stack, token), app, whose)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, case


async def test_open_transactions_travel_with_the_next_call(stack: Stack) -> None:
    customer = f"cust-{uuid.uuid4().hex[:6]}"
    claim = f"claim-{uuid.uuid4().hex[:6]}"
    app_id, _, _, _, first = await connected_call(
        stack, C.ContextData(service_request_id=claim), customer
    )
    assert list(first.context.open_transactions) == []
    await until_listed(stack, app_id, customer, lambda f: len(f) == 1)
    # The customer comes back through the same application: the claim is still open.
    *_, second = await connected_call(stack, C.ContextData(), customer, app_id)
    [open_one] = second.context.open_transactions
    assert open_one.transaction_id == claim
    # Once closed, it no longer travels.
    for record in await listed(journey(stack), app_id, customer, transaction_id=claim):
        await journey(stack).UpdateInteractionStatus(
            jn.UpdateInteractionStatusRequest(
                application_id=app_id,
                interaction_id=record.interaction_id,
                status=jn.INTERACTION_STATUS_CLOSED,
            )
        )
    *_, third = await connected_call(stack, C.ContextData(), customer, app_id)
    assert list(third.context.open_transactions) == []


async def test_the_tables_hold_no_identifier_in_clear(stack: Stack) -> None:
    group = new_group()
    app_id, _ = await setup_numbers(stack, group)
    customer = f"cust-{uuid.uuid4().hex[:6]}"
    email, phone = f"{customer}@example.org", "+33612340000"
    await outside(
        stack, app_id, "mail-raw", EMAIL, customer_id=customer, email=email, phone_number=phone
    )
    assert stack.history is not None
    database = stack.history
    with sqlite3.connect(database) as raw:
        names = [r[0] for r in raw.execute("select name from sqlite_master where type='table'")]
        cells = [
            str(cell)
            for name in names
            for row in raw.execute(f'select * from "{name}"')  # noqa: S608 (table names)
            for cell in row
        ]
    assert any("mail-raw" in c for c in cells)  # the records are there...
    for clear in (customer, email, phone, phone.removeprefix("+")):
        assert not any(clear in c for c in cells), clear  # ...not who they are about


async def test_a_record_posted_again_is_one_record_and_own_channels_are_refused(
    stack: Stack,
) -> None:
    group = new_group()
    app_id, _ = await setup_numbers(stack, group)
    customer = f"cust-{uuid.uuid4().hex[:6]}"
    await outside(stack, app_id, "chat-1", jn.INTERACTION_CHANNEL_CHAT, customer_id=customer)
    again = await journey(stack).RecordInteraction(
        jn.RecordInteractionRequest(
            interaction=jn.Interaction(
                interaction_id="chat-1",
                application_id=app_id,
                channel=jn.INTERACTION_CHANNEL_CHAT,
                status=jn.INTERACTION_STATUS_ANSWERED,
                agent_id="agent-9",
            ),
            correlation=jn.Correlation(customer_id=customer),
        )
    )
    assert (again.interaction.status, again.interaction.agent_id) == (
        jn.INTERACTION_STATUS_ANSWERED,
        "agent-9",
    )
    assert again.interaction.topic == "claim"  # kept: not given again
    assert len(await listed(journey(stack), app_id, customer)) == 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await outside(stack, app_id, "voice-1", VOICE, customer_id=customer)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == {"interaction.channel"}


async def test_a_callback_that_could_not_be_made_is_told_and_recorded(stack: Stack) -> None:
    group = new_group()  # no agent: the callback's window closes unserved
    customer = f"cust-{uuid.uuid4().hex[:6]}"
    pushes = await in_app(stack, customer, "bank")
    requested = await stack.routers[0].RequestCallback(
        rt_pb2.RequestCallbackRequest(
            application_id="bank",
            customer_id=customer,
            phone_number="+33612345681",
            latest=window(1),
            resource_group=group,
            context=C.ContextData(subject="claims", service_request_id="claim-cb"),
        )
    )
    told = (await asyncio.wait_for(pushes.read(), 20)).notification
    assert told.event_type == nt_pb2.EVENT_TYPE_CALLBACK_ATTEMPT_FAILED
    found = await until_listed(stack, "bank", customer, lambda f: len(f) == 2)
    [callback] = [r for r in found if r.channel == jn.INTERACTION_CHANNEL_CALLBACK]
    assert (callback.interaction_id, callback.status, callback.outcome) == (
        requested.callback.callback_id,
        jn.INTERACTION_STATUS_CLOSED,
        "WINDOW_CLOSED",
    )
    assert (callback.transaction_id, callback.topic) == ("claim-cb", "claims")
    [notice] = [r for r in found if r.channel == jn.INTERACTION_CHANNEL_NOTIFICATION]
    assert notice.topic == "callback_attempt_failed"
    pushes.cancel()


async def test_records_past_the_retention_are_purged(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    cm = service_factory(
        "accessline_server.callmatching",
        ACCESSLINE_HISTORY_DSN=f"sqlite+aiosqlite:///{tmp_path / 'h.db'}",
        ACCESSLINE_HISTORY_RETENTION_DAYS="30",
        ACCESSLINE_HISTORY_PURGE_INTERVAL_SECONDS="0.2",
    )
    await wait_serving(cm)
    async with connect(cm.address) as channel:
        stub = jn_grpc.JourneyServiceStub(channel)
        for interaction_id, age_days in (("old", 31), ("recent", 29)):
            occurred = timestamp_pb2.Timestamp()
            occurred.FromSeconds(int(time.time() - age_days * 86400))
            await stub.RecordInteraction(
                jn.RecordInteractionRequest(
                    interaction=jn.Interaction(
                        interaction_id=interaction_id,
                        application_id="bank",
                        channel=EMAIL,
                        status=jn.INTERACTION_STATUS_RECEIVED,
                        occurred_at=occurred,
                    ),
                    correlation=jn.Correlation(customer_id="cust-1"),
                )
            )

        async def purged() -> bool:
            return [r.interaction_id for r in await listed(stub, "bank", "cust-1")] == ["recent"]

        await eventually(purged, what="the record past the retention purged")


async def test_a_survey_follows_the_end_of_the_interaction_and_is_answered_once(
    stack: Stack,
) -> None:
    group = new_group()
    app_id, _ = await setup_numbers(stack, group, 2, survey_after_call=True)
    subject = await pool_subject(stack, group)
    agent_id, agent_app = await agent(stack, group)
    customer = f"cust-{uuid.uuid4().hex[:6]}"
    inbox = await in_app(stack, customer, app_id)
    reached = await handoff(stack, app_id, customer, C.ContextData(subject=subject))
    call = Call(stack.routers[0], reached.access_number)
    offer = await answer(agent_app, ACCEPT)
    await call.until("connect")
    # The agent ends the interaction: the customer is asked to rate it.
    await agent_app.send(end_interaction=pr_pb2.EndInteraction(interaction_id=offer.interaction_id))
    asked = (await asyncio.wait_for(inbox.read(), 20)).notification
    assert asked.event_type == nt_pb2.EVENT_TYPE_SURVEY
    assert dict(asked.data) == {"interaction_id": reached.session_id}
    await until_listed(stack, app_id, customer, lambda f: any(r.status == CLOSED for r in f))
    own = journey(stack, identity().token(customer, "customer", applications=[app_id]))
    rate = jn.SubmitSurveyRequest(
        application_id=app_id, customer_id=customer, interaction_id=reached.session_id, rating=4
    )
    rated = await own.SubmitSurvey(rate)
    assert (rated.interaction.rating, rated.interaction.agent_id) == (4, agent_id)
    with pytest.raises(grpc.aio.AioRpcError) as twice:
        await own.SubmitSurvey(rate)
    assert error_details(twice.value)["ErrorInfo"].reason == "SURVEY_ANSWERED"
    # Another customer cannot rate it: not in their journey.
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await journey(stack).SubmitSurvey(
            jn.SubmitSurveyRequest(
                application_id=app_id,
                customer_id="someone-else",
                interaction_id=reached.session_id,
                rating=1,
            )
        )
    assert other.value.code() == grpc.StatusCode.NOT_FOUND
    by_agent = await journey(stack).GetSurveySummary(
        jn.GetSurveySummaryRequest(application_id=app_id, group_by=jn.SURVEY_GROUPING_AGENT)
    )
    assert [(r.key, r.count, r.mean_rating) for r in by_agent.rows] == [(agent_id, 1, 4.0)]
    by_group = await journey(stack).GetSurveySummary(
        jn.GetSurveySummaryRequest(
            application_id=app_id, group_by=jn.SURVEY_GROUPING_RESOURCE_GROUP
        )
    )
    assert [(r.key, r.count) for r in by_group.rows] == [(group, 1)]
    inbox.cancel()
    call.hang_up()
    agent_app.call.cancel()


async def test_an_application_that_asks_no_survey_gets_its_calls_closed_without_one(
    stack: Stack,
) -> None:
    """Surveys are the application's choice (`survey_after_call`, off unless set): the
    call an agent ends is recorded closed all the same, and no survey is published."""
    group = new_group()
    app_id, _ = await setup_numbers(stack, group, 2)
    subject = await pool_subject(stack, group)
    _, agent_app = await agent(stack, group)
    customer = f"cust-{uuid.uuid4().hex[:6]}"
    reached = await handoff(stack, app_id, customer, C.ContextData(subject=subject))
    call = Call(stack.routers[0], reached.access_number)
    offer = await answer(agent_app, ACCEPT)
    await call.until("connect")
    await agent_app.send(end_interaction=pr_pb2.EndInteraction(interaction_id=offer.interaction_id))
    # The survey's publish would be recorded before the call's end, by the same writer.
    found = await until_listed(
        stack, app_id, customer, lambda f: any(r.status == CLOSED for r in f)
    )
    assert [r.interaction_id for r in found if r.status == CLOSED] == [reached.session_id]
    assert [r for r in found if r.topic == "survey"] == []
    call.hang_up()
    agent_app.call.cancel()
