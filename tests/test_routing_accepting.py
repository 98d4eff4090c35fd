"""A call connected at its agent's accept by the Routing replica holding its switch
stream (routing/accepting.py), against the running stack: from the accept on, one
transaction takes the call out of the queue connected — its entry, the agent's claim
and unanswered mark gone, the interaction moved to its own lease, the redirect record
written — and the entry is never written connected first."""

from __future__ import annotations

import asyncio
import contextlib

from accessline.routing.storage.v1 import storage_pb2 as rt_store
from accessline_server.presence import keys as pr_keys
from accessline_server.presence import roster as pr_roster
from accessline_server.routing import keys as rt_keys
from accessline_server.runtime.store import EventKind, WatchEvent
from tests.conftest import eventually
from tests.support.stack import (
    ACCEPT,
    C,
    Call,
    Stack,
    agent,
    answer,
    handoff,
    new_group,
    pool_subject,
    setup_numbers,
)


async def test_the_accept_connects_the_call_in_one_transaction(stack: Stack) -> None:
    group = new_group()
    app_id, _ = await setup_numbers(stack, group)
    subject = await pool_subject(stack, group)
    agent_id, app = await agent(stack, group, 5, ("fr-FR",), skill=subject)
    context = C.ContextData(subject=subject, language="fr-FR")
    started = await handoff(stack, app_id, "c-accept", context)
    call = Call(stack.routers[0], started.access_number)
    await call.until("offered")
    # Every change from here on, a transaction (a revision) at a time.
    batches: list[list[WatchEvent]] = []

    async def record(since: int) -> None:
        async for events in stack.store.watch_span(pr_roster.ROOT, rt_keys.ROOT, since + 1):
            batches.append(events)

    recorder = asyncio.ensure_future(record(await stack.store.revision()))
    try:
        preview = await answer(app, ACCEPT)
        connect = (await call.until("connect")).connect
        assert connect.agent_id == agent_id
        queue_key = rt_keys.queued(group, preview.interaction_id)

        def out_of_queue() -> list[WatchEvent] | None:
            for events in batches:
                if any(e.key == queue_key and e.kind == EventKind.DELETE for e in events):
                    return events
            return None

        leaving = await eventually(out_of_queue, what="the call out of the queue")
    finally:
        recorder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await recorder
    written = {(e.key, e.kind) for e in leaving}
    shown = [[(e.key, e.kind.value) for e in events] for events in batches]
    interaction = pr_keys.interaction(agent_id, preview.interaction_id)
    assert (interaction, EventKind.PUT) in written, shown  # moved to its own lease
    assert (rt_keys.redirect(preview.interaction_id), EventKind.PUT) in written
    claims = [e for e in leaving if e.key.startswith(rt_keys.claims_of(agent_id))]
    assert [e.kind for e in claims] == [EventKind.DELETE], shown
    # Written first by the accept, under the call's lease; then moved off it.
    first, moved = [e for events in batches for e in events if e.key == interaction][:2]
    assert moved.revision == leaving[0].revision
    assert first.meta.lease != moved.meta.lease
    # Never written connected: the accept's transaction, then this one.
    states = [
        e.decode(rt_store.QueuedInteraction).state
        for events in batches
        for e in events
        if e.key == queue_key and e.kind == EventKind.PUT
    ]
    assert rt_store.INTERACTION_STATE_CONNECTED not in states
    app.call.cancel()
