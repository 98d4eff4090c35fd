"""Routing end to end under faults: a switch hanging up as its call is being queued, the
dispatch leader killed or deposed, a stopping replica handing its calls over, queue
limits over all replicas, a router dying after an accept, a dependency failing mid-call.
The stack (tests/conftest.py's `routing_stack`, the five services as processes, two
Routing replicas) is shared by the routing test modules; every group is a fresh one."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
import uuid
from pathlib import Path

import grpc
import pytest
from google.protobuf import empty_pb2

from accessline.presence.storage.v1 import storage_pb2 as pr_store
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.routing.storage.v1 import storage_pb2 as rt_store
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline_server.presence import offers as pr_offers
from accessline_server.routing import keys as rt_keys
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd, free_port
from tests.conftest import (
    eventually,
)
from tests.support.stack import (
    ACCEPT,
    ROUTING_ENV,
    C,
    Call,
    Stack,
    agent,
    answer,
    handoff,
    leading_router,
    new_group,
    one_more_router,
    pool_subject,
    set_available,
    setup_numbers,
    start_stack,
    stop_stack,
    stored_anywhere,
)

# -- the switch hanging up ------------------------------------------------------------


async def test_a_call_hung_up_at_its_match_decision_leaves_nothing_in_the_queue(
    stack: Stack,
) -> None:
    """A switch that sends the caller to its IVR drops the stream at the match decision,
    possibly while Routing writes the call into the queue: an entry written all the same
    is taken out again. (It once stayed, under the replica's lease: the next agent free
    was offered a call nobody held, and was left with it once they accepted.)"""
    group = new_group()
    _, numbers = await setup_numbers(stack, group)
    _, app = await agent(stack, group, available=False)  # logged in, not ready: calls wait
    # A caller id each: unmatched calls count as failed match attempts, and calls whose
    # id is withheld all share one bucket with the other tests' callers.
    callers = random.randrange(100_000)
    for n in range(40):
        call = Call(stack.routers[n % 2], numbers[0], ani=f"+3361{n:02d}{callers:05d}")
        await call.next()  # the match decision
        # Hung up 0 to 4 ms after it: before, during and after the queue's transaction.
        await asyncio.sleep((n % 5) / 1000)
        call.hang_up()

    async def empty() -> bool:
        queued, _ = await stack.store.get_prefix(rt_keys.queue(group), rt_store.QueuedInteraction)
        return not queued

    await eventually(empty, what="no call left in the queue")
    app.call.cancel()


# -- leader failover --------------------------------------------------------------------


async def test_killing_the_dispatch_leader_loses_no_queued_call_or_offer(
    etcd: EmbeddedEtcd, tmp_path: Path
) -> None:
    own = await start_stack(etcd, f"/test-{uuid.uuid4().hex[:12]}", tmp_path)
    try:
        index, leader = await leading_router(own)
        pid = own.router_processes[index].process.pid
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
    index, _ = await leading_router(stack)
    deposed = stack.router_processes[index]
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
