"""The customer's journey against the five services and a real history database: a
handoff and its call recorded by CallMatching and Routing, an outside e-mail correlated
by its transaction, a text by a phone number tied to the customer, a customer reading
only their own records, the open transactions travelling with the next call, no
identifier in clear in the tables."""

from __future__ import annotations

import sqlite3
import uuid
from typing import Any

import grpc
import pytest

from accessline.common.v1 import common_pb2 as C
from accessline.journey.v1 import journey_pb2 as jn
from accessline.journey.v1 import journey_pb2_grpc as jn_grpc
from tests.conftest import connect, eventually, identity
from tests.support.stack import (
    ACCEPT,
    Call,
    Stack,
    agent,
    answer,
    handoff,
    new_group,
    pool_subject,
    setup_numbers,
)

EMAIL = jn.INTERACTION_CHANNEL_EMAIL
TEXT = jn.INTERACTION_CHANNEL_TEXT
VOICE = jn.INTERACTION_CHANNEL_APP_VOICE


def journey(stack: Stack, token: str | None = None) -> Any:
    """JourneyService on the stack's CallMatching (the superuser's unless a token)."""
    channel = stack.channels[1] if token is None else connect(stack.processes[3].address, token)
    return jn_grpc.JourneyServiceStub(channel)


async def listed(stub: Any, app_id: str, customer: str = "", **more: Any) -> list[jn.Interaction]:
    reply = await stub.ListInteractions(
        jn.ListInteractionsRequest(application_id=app_id, customer_id=customer, **more)
    )
    return list(reply.interactions)


async def until_listed(stack: Stack, app_id: str, customer: str, check: Any) -> list[Any]:
    """The customer's records once `check` holds of them (services write off the call
    path: a record lands a moment after what it records)."""
    found: list[Any] = []

    async def holds() -> bool:
        nonlocal found
        found = await listed(journey(stack), app_id, customer)
        return bool(check(found))

    await eventually(holds, timeout=20, what="the journey to show it")
    return found


async def outside(
    stack: Stack, app_id: str, interaction_id: str, channel: int, **correlation: str
) -> jn.Interaction:
    transaction = correlation.pop("transaction_id", "")
    reply = await journey(stack).RecordInteraction(
        jn.RecordInteractionRequest(
            interaction=jn.Interaction(
                interaction_id=interaction_id,
                application_id=app_id,
                transaction_id=transaction,
                channel=channel,
                topic="claim",
                status=jn.INTERACTION_STATUS_RECEIVED,
            ),
            correlation=jn.Correlation(**correlation),
        )
    )
    return reply.interaction


async def connected_call(
    stack: Stack, context: C.ContextData, customer: str, app_id: str = ""
) -> tuple[Any, ...]:
    """A customer's handoff (of a new application unless given) and their call connected
    to an agent: (app, session, agent, group, the switch's Connect)."""
    group = new_group()
    new_app, _ = await setup_numbers(stack, group, 2)
    app_id = app_id or new_app
    context.subject = await pool_subject(stack, group)
    agent_id, agent_app = await agent(stack, group)
    reached = await handoff(stack, app_id, customer, context)
    call = Call(stack.routers[0], reached.access_number)
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
    await outside(stack, app_id, "text-1", TEXT, customer_id=customer, phone_number="+33612345678")
    # ...so a later text from that number, in national form, is theirs too.
    await outside(stack, app_id, "text-2", TEXT, phone_number="06 12 34 56 78", default_region="FR")
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
