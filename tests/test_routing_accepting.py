"""A call connected at its agent's accept by the Routing replica holding its switch
stream (routing/accepting.py), against the running stack: from the accept on, one
transaction takes the call out of the queue connected — its entry, the agent's claim
and unanswered mark gone, the interaction moved to its own lease, the redirect record
written — and the entry is never written connected first. When that replica does not
within a second (paused here), the dispatch leader marks the call connected itself, and
the replica tells the switch once it runs again."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from pathlib import Path

from accessline.routing.storage.v1 import storage_pb2 as rt_store
from accessline_server.presence import keys as pr_keys
from accessline_server.presence import roster as pr_roster
from accessline_server.routing import keys as rt_keys
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from accessline_server.runtime.store import EventKind, Store, WatchEvent
from tests.conftest import eventually
from tests.support.stack import (
    ACCEPT,
    C,
    Call,
    Stack,
    agent,
    answer,
    handoff,
    leading_router,
    new_group,
    pool_subject,
    setup_numbers,
    start_stack,
    stop_stack,
)


class Changes:
    """Every change under Presence's and Routing's keys from now on, a revision at a
    time, while open."""

    def __init__(self, store: Store) -> None:
        self.batches: list[list[WatchEvent]] = []
        self._store = store
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Changes:
        since = await self._store.revision()
        self._task = asyncio.ensure_future(self._record(since))
        return self

    async def _record(self, since: int) -> None:
        # A watch response may hold several revisions: kept a revision to a batch.
        async for events in self._store.watch_span(pr_roster.ROOT, rt_keys.ROOT, since + 1):
            for event in events:
                if self.batches and self.batches[-1][0].revision == event.revision:
                    self.batches[-1].append(event)
                else:
                    self.batches.append([event])

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def first(self, key: str, kind: EventKind) -> list[WatchEvent] | None:
        """The first revision's changes that hold a `kind` change of `key`."""
        for events in self.batches:
            if any(e.key == key and e.kind == kind for e in events):
                return events
        return None

    def shown(self) -> list[list[tuple[str, str]]]:
        return [[(e.key, e.kind.value) for e in events] for events in self.batches]


async def test_the_accept_connects_the_call_in_one_transaction(stack: Stack) -> None:
    group = new_group()
    app_id, _ = await setup_numbers(stack, group)
    subject = await pool_subject(stack, group)
    agent_id, app = await agent(stack, group, 5, ("fr-FR",), skill=subject)
    context = C.ContextData(subject=subject, language="fr-FR")
    started = await handoff(stack, app_id, "c-accept", context)
    call = Call(stack.routers[0], started.access_number)
    await call.until("offered")
    async with Changes(stack.store) as changes:
        preview = await answer(app, ACCEPT)
        connect = (await call.until("connect")).connect
        assert connect.agent_id == agent_id
        queue_key = rt_keys.queued(group, preview.interaction_id)
        leaving = await eventually(
            lambda: changes.first(queue_key, EventKind.DELETE), what="the call out of the queue"
        )
    batches = changes.batches
    written = {(e.key, e.kind) for e in leaving}
    shown = changes.shown()
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


async def test_the_leader_connects_an_accepted_call_its_stream_replica_leaves(
    etcd: EmbeddedEtcd, tmp_path: Path
) -> None:
    own = await start_stack(etcd, f"/test-{uuid.uuid4().hex[:12]}", tmp_path)
    try:
        index = 1 - (await leading_router(own))[0]
        paused = own.router_processes[index].process.pid
        group = new_group()
        app_id, _ = await setup_numbers(own, group)
        subject = await pool_subject(own, group)
        agent_id, app = await agent(own, group, skill=subject)
        started = await handoff(own, app_id, "c-paused", C.ContextData(subject=subject))
        # The call's stream on the replica that does not lead.
        call = Call(own.routers[index], started.access_number)
        await call.until("offered")
        async with Changes(own.store) as changes:
            os.kill(paused, signal.SIGSTOP)
            try:
                preview = await answer(app, ACCEPT)
                queue_key = rt_keys.queued(group, preview.interaction_id)
                marked = await eventually(
                    lambda: changes.first(queue_key, EventKind.PUT), what="the leader's connect"
                )
            finally:
                os.kill(paused, signal.SIGCONT)
            connect = (await call.until("connect")).connect
        assert connect.agent_id == agent_id
        (entry,) = [e for e in marked if e.key == queue_key]
        assert entry.decode(rt_store.QueuedInteraction).state == (
            rt_store.INTERACTION_STATE_CONNECTED
        ), changes.shown()
        # The agent's claim went with it, in the same transaction.
        claims = [e for e in marked if e.key.startswith(rt_keys.claims_of(agent_id))]
        assert [e.kind for e in claims] == [EventKind.DELETE], changes.shown()
        app.call.cancel()
    finally:
        await stop_stack(own)
