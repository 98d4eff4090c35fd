"""Presence across two real replicas on one etcd: agent apps log in over a bidirectional
stream, change presence, receive offers written by a third party and answer them;
watchers on the other replica see every change; crashed or frozen apps and dead
replicas let their agents go offline by themselves."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from accessline.presence.storage.v1 import storage_pb2 as pr_store
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.presence.v1 import presence_pb2_grpc as pr_grpc
from accessline_server.presence import offers
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from accessline_server.runtime.store import Store
from tests.conftest import (
    ServiceProcess,
    connect,
    eventually,
    identity,
    violated_fields,
    wait_serving,
)
from tests.support.presence import (
    SEALING,
    SETTINGS,
    App,
    C,
    Cluster,
    Watcher,
    agent_app,
    ending,
    overall,
    register,
    wait_logged_in,
)


@pytest.fixture
async def cluster(
    service_factory: Callable[..., ServiceProcess], etcd: EmbeddedEtcd, prefix: str
) -> AsyncIterator[Cluster]:
    replicas = [service_factory("accessline_server.presence", **SETTINGS) for _ in range(2)]
    for replica in replicas:
        await wait_serving(replica)
    channels = [connect(r.address) for r in replicas]
    async with Store(etcd.endpoint, prefix) as store:
        yield Cluster(replicas, [pr_grpc.PresenceServiceStub(c) for c in channels], store)
    for channel in channels:
        await channel.close()


async def test_a_watcher_on_another_replica_sees_every_change_in_order(cluster: Cluster) -> None:
    agent_id = await register(cluster.stubs[0])
    watcher = Watcher(cluster.stubs[1], agent_ids=[agent_id])
    first = await watcher.next()
    assert [a.overall for a in first.snapshot.agents] == [C.OVERALL_PRESENCE_OFFLINE]

    app = App(cluster.addresses[0])
    snapshot = await app.login(agent_id)
    assert snapshot.presence.overall == C.OVERALL_PRESENCE_PARTIALLY_READY
    assert [c.presence for c in snapshot.presence.channels] == [
        C.CHANNEL_PRESENCE_AVAILABLE,
        C.CHANNEL_PRESENCE_UNAVAILABLE,
        C.CHANNEL_PRESENCE_UNAVAILABLE,
    ]
    for channel in (C.CHANNEL_MOBILE_VOICE, C.CHANNEL_CHAT):
        await app.send(
            set_channel_presence=pr_pb2.SetChannelPresence(channel=channel, available=True)
        )
        await app.next_kind("presence_confirmed")
    await app.send(set_do_not_disturb=pr_pb2.SetDoNotDisturb(enabled=True))
    confirmed = await app.next_kind("presence_confirmed")
    assert all(c.presence == C.CHANNEL_PRESENCE_UNAVAILABLE for c in confirmed.presence.channels)
    await app.send(set_do_not_disturb=pr_pb2.SetDoNotDisturb(enabled=False))
    await app.next_kind("presence_confirmed")
    await app.call.done_writing()
    assert await app.next() is grpc.aio.EOF

    seen = await watcher.overall_until(C.OVERALL_PRESENCE_OFFLINE)
    assert seen == [
        C.OVERALL_PRESENCE_PARTIALLY_READY,
        C.OVERALL_PRESENCE_PARTIALLY_READY,
        C.OVERALL_PRESENCE_READY,
        C.OVERALL_PRESENCE_DO_NOT_DISTURB,
        C.OVERALL_PRESENCE_READY,
        C.OVERALL_PRESENCE_OFFLINE,
    ]
    watcher.call.cancel()


async def stored_offer(
    cluster: Cluster, agent_id: str, offer_id: str
) -> pr_store.StoredOffer | None:
    entry = await cluster.store.get(offers.offer_key(agent_id, offer_id), pr_store.StoredOffer)
    return entry.value if entry is not None else None


async def respond(app: App, offer_id: str, decision: int, channel: int = 0) -> None:
    """The agent's answer to an offer (on `channel`, when given)."""
    await app.send(
        offer_response=pr_pb2.OfferResponse(
            offer_id=offer_id,
            decision=decision,  # type: ignore[arg-type]
            accept_channel=channel,  # type: ignore[arg-type]
        )
    )


async def test_offers_reach_the_agent_and_answers_come_back(cluster: Cluster) -> None:
    agent_id = await register(cluster.stubs[0])
    app = App(cluster.addresses[1])
    await app.login(agent_id)
    summary = pr_pb2.ContextSummary(customer_display_name="Ms Martin", subject="mortgage")

    # Routing (a third party) writes the offer to etcd; the replica holding the stream delivers it.
    accepted = await offers.make_offer(
        cluster.store,
        agent_id,
        "call-1",
        C.CHANNEL_DESK_VOICE,
        summary,
        timeout=15,
        sealing=SEALING,
    )
    shown = await app.next_kind("offer")
    assert (shown.offer_id, shown.interaction_id, shown.summary) == (
        accepted.offer.offer_id,
        "call-1",
        summary,
    )
    await respond(app, shown.offer_id, pr_pb2.OFFER_DECISION_ACCEPT, C.CHANNEL_DESK_VOICE)
    recorded = await app.next_kind("offer_response_recorded")
    assert recorded.decision == pr_pb2.OFFER_DECISION_ACCEPT
    busy = await app.next_kind("presence_confirmed")
    assert busy.presence.channels[0].presence == C.CHANNEL_PRESENCE_BUSY
    stored = await stored_offer(cluster, agent_id, shown.offer_id)
    assert stored is not None
    assert (stored.state, stored.accepted_channel) == (
        pr_store.OFFER_STATE_ACCEPTED,
        C.CHANNEL_DESK_VOICE,
    )

    declined = await offers.make_offer(
        cluster.store, agent_id, "chat-1", C.CHANNEL_CHAT, summary, timeout=15, sealing=SEALING
    )
    shown = await app.next_kind("offer")
    await respond(app, shown.offer_id, pr_pb2.OFFER_DECISION_DECLINE)
    await app.next_kind("offer_response_recorded")
    stored = await stored_offer(cluster, agent_id, declined.offer.offer_id)
    assert stored is not None
    assert stored.state == pr_store.OFFER_STATE_DECLINED

    ignored = await offers.make_offer(
        cluster.store, agent_id, "call-2", C.CHANNEL_DESK_VOICE, summary, timeout=1, sealing=SEALING
    )
    assert (await app.next_kind("offer")).offer_id == ignored.offer.offer_id
    cancelled = await app.next_kind("offer_cancelled")
    assert (cancelled.offer_id, cancelled.reason) == (
        ignored.offer.offer_id,
        pr_pb2.OFFER_CANCEL_REASON_TIMED_OUT,
    )

    async def expired() -> bool:
        return await stored_offer(cluster, agent_id, ignored.offer.offer_id) is None

    await eventually(expired, what="unanswered offer expired by itself")
    await respond(app, ignored.offer.offer_id, pr_pb2.OFFER_DECISION_ACCEPT)
    refused = await app.next_kind("offer_response_refused")
    assert refused.reason == pr_pb2.OFFER_REFUSAL_UNKNOWN_OFFER

    withdrawn = await offers.make_offer(
        cluster.store, agent_id, "call-3", C.CHANNEL_CHAT, summary, timeout=15, sealing=SEALING
    )
    await app.next_kind("offer")
    assert await offers.cancel_offer(
        cluster.store, agent_id, withdrawn.offer.offer_id, pr_pb2.OFFER_CANCEL_REASON_WITHDRAWN
    )
    assert (await app.next_kind("offer_cancelled")).reason == pr_pb2.OFFER_CANCEL_REASON_WITHDRAWN
    await respond(app, withdrawn.offer.offer_id, pr_pb2.OFFER_DECISION_ACCEPT)
    assert (
        await app.next_kind("offer_response_refused")
    ).reason == pr_pb2.OFFER_REFUSAL_NO_LONGER_OPEN

    await app.send(end_interaction=pr_pb2.EndInteraction(interaction_id="call-1"))
    free = await app.next_kind("presence_confirmed")
    assert free.presence.channels[0].presence == C.CHANNEL_PRESENCE_AVAILABLE
    app.call.cancel()


async def test_an_agent_who_reconnects_during_a_call_is_still_on_it(cluster: Cluster) -> None:
    agent_id = await register(cluster.stubs[0])
    first = App(cluster.addresses[0])
    await first.login(agent_id)
    await offers.make_offer(
        cluster.store,
        agent_id,
        "call-7",
        C.CHANNEL_DESK_VOICE,
        pr_pb2.ContextSummary(),
        15,
        SEALING,
    )
    shown = await first.next_kind("offer")
    await first.send(
        offer_response=pr_pb2.OfferResponse(
            offer_id=shown.offer_id, decision=pr_pb2.OFFER_DECISION_ACCEPT
        )
    )
    await first.next_kind("offer_response_recorded")
    # The app's connection drops while the agent is on the call, and comes back through
    # the other replica.
    first.call.cancel()
    await eventually(lambda: _offline(cluster.stubs[0], agent_id), what="first session ended")
    second = App(cluster.addresses[1])
    snapshot = await second.login(agent_id)
    desk = next(c for c in snapshot.presence.channels if c.channel == C.CHANNEL_DESK_VOICE)
    assert (desk.presence, desk.active_interactions) == (C.CHANNEL_PRESENCE_BUSY, 1)
    shown_to_routing = await cluster.stubs[0].GetPresence(
        pr_pb2.GetPresenceRequest(agent_ids=[agent_id])
    )
    assert shown_to_routing.agents[0].channels[0].presence == C.CHANNEL_PRESENCE_BUSY

    await second.send(end_interaction=pr_pb2.EndInteraction(interaction_id="call-7"))
    free = await second.next_kind("presence_confirmed")
    assert free.presence.channels[0].presence == C.CHANNEL_PRESENCE_AVAILABLE
    # Ending it again (an app retrying after a reconnect) changes nothing and keeps the
    # stream open.
    await second.send(end_interaction=pr_pb2.EndInteraction(interaction_id="call-7"))
    again = await second.next_kind("presence_confirmed")
    assert again.presence.channels[0].presence == C.CHANNEL_PRESENCE_AVAILABLE
    await second.send(heartbeat=pr_pb2.Heartbeat())
    assert await second.next_kind("heartbeat_ack")
    second.call.cancel()


async def _offline(stub: Any, agent_id: str) -> bool:
    return await overall(stub, agent_id) == C.OVERALL_PRESENCE_OFFLINE


async def test_open_offers_of_a_dropped_session_are_cancelled(cluster: Cluster) -> None:
    agent_id = await register(cluster.stubs[0])
    app = App(cluster.addresses[0])
    await app.login(agent_id)
    made = await offers.make_offer(
        cluster.store,
        agent_id,
        "call-9",
        C.CHANNEL_DESK_VOICE,
        pr_pb2.ContextSummary(),
        30,
        SEALING,
    )
    await app.next_kind("offer")
    app.call.cancel()

    async def cancelled() -> bool:
        entry = await cluster.store.get(
            offers.offer_key(agent_id, made.offer.offer_id), pr_store.StoredOffer
        )
        return entry is not None and entry.value.state == pr_store.OFFER_STATE_CANCELLED

    await eventually(cancelled, what="offer cancelled when the session dropped")
    entry = await cluster.store.get(
        offers.offer_key(agent_id, made.offer.offer_id), pr_store.StoredOffer
    )
    assert entry is not None
    assert entry.value.cancel_reason == pr_pb2.OFFER_CANCEL_REASON_SESSION_ENDED


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["crashed-app", "frozen-app"])
async def test_an_app_that_dies_or_freezes_goes_offline_by_itself(
    cluster: Cluster, service_factory: Callable[..., ServiceProcess], how: int
) -> None:
    strict = service_factory(
        "accessline_server.presence",
        **{**SETTINGS, "ACCESSLINE_PRESENCE_HEARTBEAT_TIMEOUT_SECONDS": "2"},
    )
    await wait_serving(strict)
    agent_id = await register(cluster.stubs[0])
    app = agent_app(strict.address, agent_id)
    try:
        await wait_logged_in(app)
        assert await overall(cluster.stubs[1], agent_id) == C.OVERALL_PRESENCE_PARTIALLY_READY
        app.send_signal(how)

        async def offline() -> bool:
            return await overall(cluster.stubs[1], agent_id) == C.OVERALL_PRESENCE_OFFLINE

        # A frozen app keeps its connection open: the heartbeat timeout (2 s here) ends it.
        await eventually(offline, timeout=15, what="agent offline")
    finally:
        app.kill()
        app.wait()


async def test_a_dead_replica_lets_its_agents_go_offline_within_the_lease_ttl(
    cluster: Cluster,
) -> None:
    agent_id = await register(cluster.stubs[0])
    app = App(cluster.addresses[0])
    await app.login(agent_id)
    watcher = Watcher(cluster.stubs[1], agent_ids=[agent_id])
    await watcher.next()
    cluster.replicas[0].signal(signal.SIGKILL)
    # Nobody deletes the session: its lease (3 s here) runs out.
    seen = await watcher.overall_until(C.OVERALL_PRESENCE_OFFLINE, timeout=20)
    assert seen[-1] == C.OVERALL_PRESENCE_OFFLINE
    watcher.call.cancel()


async def test_a_second_login_replaces_the_first_session(cluster: Cluster) -> None:
    agent_id = await register(cluster.stubs[0])
    first = App(cluster.addresses[0])
    first_snapshot = await first.login(agent_id)
    second = App(cluster.addresses[1])
    second_snapshot = await second.login(agent_id)
    assert second_snapshot.agent_session_id != first_snapshot.agent_session_id
    replaced = await first.next_kind("session_replaced")
    assert replaced is not None
    assert await first.next() is grpc.aio.EOF
    assert await first.call.code() == grpc.StatusCode.OK
    # The replacing session stays online and works.
    await second.send(
        set_channel_presence=pr_pb2.SetChannelPresence(channel=C.CHANNEL_CHAT, available=True)
    )
    assert (
        await second.next_kind("presence_confirmed")
    ).presence.overall == C.OVERALL_PRESENCE_PARTIALLY_READY
    assert await overall(cluster.stubs[0], agent_id) == C.OVERALL_PRESENCE_PARTIALLY_READY
    second.call.cancel()


async def test_bad_messages_get_a_clear_status_and_never_affect_another_agent(
    cluster: Cluster,
) -> None:
    bystander = await register(cluster.stubs[0])
    calm = App(cluster.addresses[0])
    await calm.login(bystander)
    culprit = await register(cluster.stubs[0])

    no_login = App(cluster.addresses[0])
    await no_login.send(heartbeat=pr_pb2.Heartbeat())
    assert (await ending(no_login))[0] == grpc.StatusCode.INVALID_ARGUMENT

    # Another agent's token: an agent logs in as themselves only.
    someone_else = App(cluster.addresses[0], identity().token(bystander, "agent"))
    await someone_else.send(login=pr_pb2.Login(agent_id=culprit))
    assert (await ending(someone_else))[0] == grpc.StatusCode.PERMISSION_DENIED

    unknown = App(cluster.addresses[0])
    await unknown.login_unchecked("nobody-here")
    assert (await ending(unknown))[0] == grpc.StatusCode.NOT_FOUND

    wrong_channel = App(cluster.addresses[0])
    await wrong_channel.login(culprit)
    await wrong_channel.send(
        set_channel_presence=pr_pb2.SetChannelPresence(channel=C.CHANNEL_EMAIL, available=True)
    )
    code, before, fields = await ending(wrong_channel)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields == {"set_channel_presence.channel"}
    assert not any(r.HasField("presence_confirmed") for r in before)

    assert await overall(cluster.stubs[1], culprit) == C.OVERALL_PRESENCE_OFFLINE
    assert await overall(cluster.stubs[1], bystander) == C.OVERALL_PRESENCE_PARTIALLY_READY
    await calm.send(heartbeat=pr_pb2.Heartbeat())
    assert (await calm.next_kind("heartbeat_ack")).HasField("server_time")
    calm.call.cancel()


async def test_a_watcher_resuming_from_its_token_misses_nothing(cluster: Cluster) -> None:
    agent_id = await register(cluster.stubs[0])
    watcher = Watcher(cluster.stubs[0], agent_ids=[agent_id])
    resume = (await watcher.next()).resume_token
    watcher.call.cancel()

    app = App(cluster.addresses[1])
    await app.login(agent_id)
    await app.send(set_do_not_disturb=pr_pb2.SetDoNotDisturb(enabled=True))
    await app.next_kind("presence_confirmed")
    app.call.cancel()

    resumed = Watcher(cluster.stubs[1], agent_ids=[agent_id], resume_token=resume)
    seen = await resumed.overall_until(C.OVERALL_PRESENCE_OFFLINE)
    assert seen == [
        C.OVERALL_PRESENCE_PARTIALLY_READY,
        C.OVERALL_PRESENCE_DO_NOT_DISTURB,
        C.OVERALL_PRESENCE_OFFLINE,
    ]
    resumed.call.cancel()


async def test_group_availability_counts_agents_per_channel(cluster: Cluster) -> None:
    group = f"g-{uuid.uuid4().hex[:6]}"
    agents = [await register(cluster.stubs[0], group) for _ in range(3)]
    apps = []
    for agent_id in agents[:2]:
        app = App(cluster.addresses[0])
        await app.login(agent_id)
        apps.append(app)
    await apps[1].send(set_do_not_disturb=pr_pb2.SetDoNotDisturb(enabled=True))
    await apps[1].next_kind("presence_confirmed")
    reply = await cluster.stubs[1].GetGroupAvailability(
        pr_pb2.GetGroupAvailabilityRequest(resource_groups=[group])
    )
    desk = next(c for c in reply.groups[0].channels if c.channel == C.CHANNEL_DESK_VOICE)
    assert (desk.available_agents, desk.logged_in_agents) == (1, 2)
    for app in apps:
        app.call.cancel()


async def test_presence_of_a_batch_answers_what_exists_and_names_what_does_not(
    cluster: Cluster,
) -> None:
    # More agents than one etcd transaction may read (128 operations by default).
    group = f"batch-{uuid.uuid4().hex[:6]}"
    agents = [await register(cluster.stubs[0], group) for _ in range(100)]
    asked = [agents[0], "ghost-1", *agents[1:], "ghost-2", agents[0]]
    reply = await cluster.stubs[1].GetPresence(pr_pb2.GetPresenceRequest(agent_ids=asked))
    assert [a.agent_id for a in reply.agents] == agents
    assert list(reply.missing_agent_ids) == ["ghost-1", "ghost-2"]


async def test_registering_a_bad_agent_names_every_bad_field(cluster: Cluster) -> None:
    agent = pr_pb2.Agent(
        agent_id="bad id",
        skills=[pr_pb2.Skill(name="mortgage", level=11)],
        channels=[
            pr_pb2.ChannelConfig(channel=C.CHANNEL_CHAT, address="x"),
            pr_pb2.ChannelConfig(channel=C.CHANNEL_CHAT, address=""),
        ],
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cluster.stubs[0].RegisterAgent(pr_pb2.RegisterAgentRequest(agent=agent))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == {
        "agent.agent_id",
        "agent.skills[0].level",
        "agent.channels[1].channel",
        "agent.channels[1].address",
    }


async def test_presence_streams_have_limits(
    service_factory: Callable[..., ServiceProcess], cluster: Cluster
) -> None:
    replica = service_factory(
        "accessline_server.presence",
        ACCESSLINE_PRESENCE_MAX_WATCHERS="2",
        ACCESSLINE_PRESENCE_LOGIN_TIMEOUT_SECONDS="1",
        ACCESSLINE_PRESENCE_RESUME_REVISIONS="100",
    )
    await wait_serving(replica)
    async with connect(replica.address) as channel:
        stub: Any = pr_grpc.PresenceServiceStub(channel)
        watchers = [Watcher(stub) for _ in range(3)]
        answers = await asyncio.gather(*(w.call.read() for w in watchers), return_exceptions=True)
        refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
        assert [r.code() for r in refused] == [grpc.StatusCode.RESOURCE_EXHAUSTED]
        for watcher in watchers:
            watcher.call.cancel()

        # A stream that never logs in is closed after the login time-out, not held open.
        silent = App(replica.address).call
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(silent.read(), 15)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # A resume token far back in etcd's history gets a snapshot, not a replay of it all.
        agent_id = await register(stub)
        for _ in range(110):
            await register(cluster.stubs[0])
        watcher = Watcher(stub, resume_token="1", agent_ids=[agent_id])
        first = await watcher.next()
        assert first.HasField("snapshot")
        assert [a.agent_id for a in first.snapshot.agents] == [agent_id]
        watcher.call.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as future:
            await Watcher(stub, resume_token=str(10**12)).next()
        assert future.value.code() == grpc.StatusCode.INVALID_ARGUMENT
