"""Routing end to end, callbacks: dials streamed to switches (StreamCallbackDials),
retries, completion, and dials no switch reports.
The stack (tests/conftest.py's `routing_stack`, the five services as processes, two
Routing replicas) is shared by the routing test modules; every group is a fresh one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest

from accessline.journey.v1 import journey_pb2 as jn
from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.routing.storage.v1 import storage_pb2 as rt_store
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline_server.routing import keys as rt_keys
from accessline_server.routing.callbacks import Callbacks
from accessline_server.routing.queue import Rules
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from accessline_server.runtime.sealing import Sealer
from accessline_server.runtime.store import Store
from tests.conftest import (
    error_details,
    eventually,
)
from tests.support.journey import by_channel, until_listed
from tests.support.stack import (
    ACCEPT,
    C,
    Stack,
    agent,
    answer,
    in_app,
    leading_router,
    new_group,
    start_stack,
    stop_stack,
    stored_anywhere,
    window,
)

# -- callbacks ------------------------------------------------------------------------


async def dial_for(stream: Any, callback_id: str) -> rt_pb2.StreamCallbackDialsResponse:
    """The next dial of this callback on a switch stream (dials of other tests' callbacks
    may come first on this shared stack)."""
    while True:
        dial = await asyncio.wait_for(stream.read(), 20)
        assert dial is not grpc.aio.EOF
        if dial.callback_id == callback_id:
            return dial


def callback_request(customer: str, group: str, **fields: Any) -> rt_pb2.RequestCallbackRequest:
    """The bank's request of a callback to the customer's mobile within the hour, unless
    `fields` say otherwise."""
    request: dict[str, Any] = {
        "application_id": "bank",
        "customer_id": customer,
        "phone_number": "+33612345678",
        "latest": window(3600),
        "resource_group": group,
        **fields,
    }
    return rt_pb2.RequestCallbackRequest(**request)


async def report_attempt(
    stack: Stack, router: int, callback_id: str, outcome: int
) -> rt_pb2.ReportCallbackAttemptResponse:
    """The switch's report of a dial's outcome, to Routing replica `router`."""
    reply: rt_pb2.ReportCallbackAttemptResponse = await stack.routers[router].ReportCallbackAttempt(
        rt_pb2.ReportCallbackAttemptRequest(
            callback_id=callback_id,
            outcome=outcome,  # type: ignore[arg-type]
        )
    )
    return reply


async def journey_has_both_callbacks_and_the_notice(stack: Stack, customer: str) -> None:
    """The customer's journey: the callback completed, the one cancelled, and the notice
    of the failed attempt."""
    found = await until_listed(stack, "bank", customer, lambda f: len(f) == 3)
    assert by_channel(found, jn.INTERACTION_CHANNEL_CALLBACK) == [
        (jn.INTERACTION_STATUS_CLOSED, "CANCELLED"),
        (jn.INTERACTION_STATUS_ANSWERED, "COMPLETED"),
    ]
    [notice] = [r for r in found if r.channel == jn.INTERACTION_CHANNEL_NOTIFICATION]
    assert notice.topic == "callback_attempt_failed"


async def test_a_callback_is_dialled_retried_and_completed(stack: Stack) -> None:
    group = new_group()
    member, app = await agent(stack, group)
    customer = f"c-{uuid.uuid4().hex[:6]}"
    pushes = await in_app(stack, customer, "bank")
    dials = stack.routers[1].StreamCallbackDials(rt_pb2.StreamCallbackDialsRequest(switch_id="sw1"))
    context = C.ContextData(
        subject="mortgage", attributes={"display_name": "Ms Petit", "iban": "FR7630001007941"}
    )
    requested = await stack.routers[0].RequestCallback(
        callback_request(
            customer,
            group,
            phone_number="+33 6 12 34 56 78",
            idempotency_key="cb-key-1",
            context=context,
        )
    )
    callback_id = requested.callback.callback_id
    assert requested.callback.state == rt_pb2.CALLBACK_STATE_QUEUED
    # The same request again returns the same callback; another one is refused.
    again = await stack.routers[1].RequestCallback(
        callback_request(customer, group, idempotency_key="cb-key-1")
    )
    assert again.callback.callback_id == callback_id
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.routers[1].RequestCallback(callback_request(customer, group))
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
    report = await report_attempt(stack, 1, callback_id, rt_pb2.CALLBACK_ATTEMPT_OUTCOME_NO_ANSWER)
    assert report.callback.state == rt_pb2.CALLBACK_STATE_QUEUED
    told = (await asyncio.wait_for(pushes.read(), 20)).notification
    assert told.event_type == nt_pb2.EVENT_TYPE_CALLBACK_ATTEMPT_FAILED
    assert dict(told.data) == {"callback_id": callback_id}
    assert "+336" not in told.body

    await answer(app, ACCEPT)
    await dial_for(dials, callback_id)
    done = await report_attempt(stack, 0, callback_id, rt_pb2.CALLBACK_ATTEMPT_OUTCOME_CONNECTED)
    assert (done.callback.state, done.callback.attempts) == (rt_pb2.CALLBACK_STATE_COMPLETED, 2)
    # Finished: the customer may ask again, and a late report is refused.
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await report_attempt(stack, 0, callback_id, rt_pb2.CALLBACK_ATTEMPT_OUTCOME_CONNECTED)
    assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    fresh = await stack.routers[0].RequestCallback(
        callback_request(customer, group, latest=window(60))
    )
    await stack.routers[0].CancelCallback(
        rt_pb2.CancelCallbackRequest(callback_id=fresh.callback.callback_id)
    )
    cancelled = await stack.routers[1].GetCallback(
        rt_pb2.GetCallbackRequest(callback_id=fresh.callback.callback_id)
    )
    assert cancelled.callback.state == rt_pb2.CALLBACK_STATE_CANCELLED
    await journey_has_both_callbacks_and_the_notice(stack, customer)
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
    pushes = await in_app(stack, customer, "bank")
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


async def test_a_dial_taken_as_its_switch_drops_goes_back_to_the_others(store: Store) -> None:
    """A switch whose stream ends while Routing writes that it took a dial: the take, if
    written, is undone, so the next switch gets the dial at once (it once stayed taken by
    the stream gone until the dial timed out and counted as a failed attempt)."""
    sealer = Sealer(b"k" * 32, b"routing")
    callbacks = Callbacks(store, None, Rules(), sealer, lambda: None)  # type: ignore[arg-type]
    for n in range(40):
        callback_id = f"cb-{n}"
        dial = rt_pb2.StreamCallbackDialsResponse(callback_id=callback_id, phone_number="+3361")
        await store.put(
            rt_keys.dial(callback_id),
            rt_store.PendingDial(sealed_dial=sealer.seal(dial.SerializeToString(), callback_id)),
        )

        async def switch(stopping: asyncio.Event) -> None:
            async for _ in callbacks.stream_dials("sw", stopping):
                pass

        stream = asyncio.ensure_future(switch(asyncio.Event()))
        # Dropped 0 to 4 ms after it opened: before, during and after the take.
        await asyncio.sleep((n % 9) / 2000)
        stream.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stream
        left = await store.get(rt_keys.dial(callback_id), rt_store.PendingDial)
        assert left is not None
        assert left.value.taken_by == "", n
        await store.delete(rt_keys.dial(callback_id))


async def test_a_callback_cancelled_as_its_agent_accepts_frees_the_agent(
    etcd: EmbeddedEtcd, tmp_path: Path
) -> None:
    """The customer cancels the callback just after the agent accepted its offer, before
    the dispatch leader moved it on (the leader paused here): the agent's interaction
    ends with the callback, their app told the customer is gone (it once stayed, the
    agent busy with a callback nobody would dial)."""
    own = await start_stack(etcd, f"/test-{uuid.uuid4().hex[:12]}", tmp_path)
    try:
        leader, _ = await leading_router(own)
        paused = own.router_processes[leader].process.pid
        group = new_group()
        _, app = await agent(own, group)
        requested = await own.routers[1 - leader].RequestCallback(
            callback_request(f"c-{uuid.uuid4().hex[:6]}", group)
        )
        offer = await app.next_kind("offer")
        os.kill(paused, signal.SIGSTOP)
        try:
            await app.send(
                offer_response=pr_pb2.OfferResponse(offer_id=offer.offer_id, decision=ACCEPT)
            )
            await app.next_kind("offer_response_recorded")
            await own.routers[1 - leader].CancelCallback(
                rt_pb2.CancelCallbackRequest(callback_id=requested.callback.callback_id)
            )
        finally:
            os.kill(paused, signal.SIGCONT)
        gone = await app.next_kind("offer_cancelled")
        assert (gone.offer_id, gone.reason) == (
            offer.offer_id,
            pr_pb2.OFFER_CANCEL_REASON_CALLER_GONE,
        )
        app.call.cancel()
    finally:
        await stop_stack(own)


async def test_a_callback_cancelled_by_a_caller_who_gives_up_withdraws_its_offer(
    stack: Stack,
) -> None:
    """CancelCallback given up on by its caller as it runs: once the callback is
    cancelled, its offer is withdrawn all the same (it once stayed open until it timed
    out, counted against the agent as an offer left unanswered)."""
    group = new_group()
    _, app = await agent(stack, group)
    for n in range(12):
        requested = await stack.routers[0].RequestCallback(
            callback_request(f"c-{uuid.uuid4().hex[:6]}", group)
        )
        callback_id = requested.callback.callback_id
        offer = await app.next_kind("offer")
        cancelling = stack.routers[0].CancelCallback(
            rt_pb2.CancelCallbackRequest(callback_id=callback_id)
        )
        await asyncio.sleep((n % 6) / 1000)  # given up on 0 to 5 ms after it was sent
        cancelling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cancelling
        got = await stack.routers[0].GetCallback(rt_pb2.GetCallbackRequest(callback_id=callback_id))
        if got.callback.state != rt_pb2.CALLBACK_STATE_CANCELLED:  # given up on before it ran
            await stack.routers[0].CancelCallback(
                rt_pb2.CancelCallbackRequest(callback_id=callback_id)
            )
        gone = await app.next_kind("offer_cancelled")
        assert (gone.offer_id, gone.reason) == (
            offer.offer_id,
            pr_pb2.OFFER_CANCEL_REASON_WITHDRAWN,
        ), n
    app.call.cancel()


async def test_a_failed_attempt_whose_report_is_given_up_on_still_tells_the_customer(
    stack: Stack,
) -> None:
    """ReportCallbackAttempt given up on by the switch as it runs: once the attempt is
    recorded, the customer is told all the same (it once stopped with the switch's call,
    the attempt recorded and the customer never told)."""
    group = new_group()
    _, app = await agent(stack, group)
    dials = stack.routers[1].StreamCallbackDials(rt_pb2.StreamCallbackDialsRequest(switch_id="sw2"))
    for n in range(8):
        customer = f"c-{uuid.uuid4().hex[:6]}"
        pushes = await in_app(stack, customer, "bank")
        requested = await stack.routers[0].RequestCallback(callback_request(customer, group))
        callback_id = requested.callback.callback_id
        while (offer := await app.next_kind("offer")).interaction_id != callback_id:
            pass  # the offer of the callback before, queued again and then cancelled
        await app.send(
            offer_response=pr_pb2.OfferResponse(offer_id=offer.offer_id, decision=ACCEPT)
        )
        await dial_for(dials, callback_id)
        await app.send(end_interaction=pr_pb2.EndInteraction(interaction_id=callback_id))
        reporting = stack.routers[1].ReportCallbackAttempt(
            rt_pb2.ReportCallbackAttemptRequest(
                callback_id=callback_id, outcome=rt_pb2.CALLBACK_ATTEMPT_OUTCOME_NO_ANSWER
            )
        )
        await asyncio.sleep((n % 4) / 1000)  # given up on 0 to 3 ms after it was sent
        reporting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporting
        got = await stack.routers[0].GetCallback(rt_pb2.GetCallbackRequest(callback_id=callback_id))
        if got.callback.state == rt_pb2.CALLBACK_STATE_DIALLING:  # given up on before it ran
            await report_attempt(stack, 1, callback_id, rt_pb2.CALLBACK_ATTEMPT_OUTCOME_NO_ANSWER)
        told = (await asyncio.wait_for(pushes.read(), 20)).notification
        assert (told.event_type, dict(told.data)) == (
            nt_pb2.EVENT_TYPE_CALLBACK_ATTEMPT_FAILED,
            {"callback_id": callback_id},
        ), n
        await stack.routers[0].CancelCallback(rt_pb2.CancelCallbackRequest(callback_id=callback_id))
        pushes.cancel()
    dials.cancel()
    app.call.cancel()
