"""The agent's session as a browser holds it (a server stream, messages by unary calls),
resuming a session after a drop or a replica's death, and not-ready reason codes: against
two real Presence replicas on one etcd."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.presence.v1 import presence_pb2_grpc as pr_grpc
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from accessline_server.runtime.store import Store
from tests.conftest import ServiceProcess, connect, identity, violated_fields, wait_serving
from tests.support.presence import SETTINGS, App, C, Cluster, register

REASONS = "break,lunch,training"


@pytest.fixture
async def cluster(
    service_factory: Callable[..., ServiceProcess], etcd: EmbeddedEtcd, prefix: str
) -> AsyncIterator[Cluster]:
    # A lease long enough that a killed replica's session is still there to resume.
    settings = {
        **SETTINGS,
        "ACCESSLINE_PRESENCE_LEASE_SECONDS": "15",
        "ACCESSLINE_PRESENCE_NOT_READY_REASONS": REASONS,
    }
    replicas = [service_factory("accessline_server.presence", **settings) for _ in range(2)]
    for replica in replicas:
        await wait_serving(replica)
    channels = [connect(r.address) for r in replicas]
    async with Store(etcd.endpoint, prefix) as store:
        yield Cluster(replicas, [pr_grpc.PresenceServiceStub(c) for c in channels], store)
    for channel in channels:
        await channel.close()


class BrowserSession:
    """An agent session opened as the console opens it: OpenSession's stream down, each
    message up by SendSessionMessage on the same server."""

    def __init__(self, address: str, agent_id: str, token: str | None = None) -> None:
        self.agent_id = agent_id
        self.channel = connect(address, token or identity().token(agent_id, "agent"))
        self.stub = pr_grpc.PresenceServiceStub(self.channel)
        self.call: Any = None
        self.session_id = ""

    async def open(self, resume_token: str = "") -> pr_pb2.Snapshot:
        login = pr_pb2.Login(agent_id=self.agent_id, resume_token=resume_token)
        self.call = self.stub.OpenSession(pr_pb2.OpenSessionRequest(login=login))
        first = await self.next()
        assert first.HasField("snapshot"), first
        self.session_id = first.snapshot.agent_session_id
        return first.snapshot

    async def next(self, timeout: float = 15.0) -> pr_pb2.ConnectResponse:
        reply = await asyncio.wait_for(self.call.read(), timeout)
        assert reply is not grpc.aio.EOF, "the session's stream ended"
        return reply.message

    async def next_kind(self, kind: str) -> Any:
        while True:
            reply = await self.next()
            if reply.WhichOneof("message") == kind:
                return getattr(reply, kind)

    async def send(self, session_id: str | None = None, **message: Any) -> None:
        await self.stub.SendSessionMessage(
            pr_pb2.SendSessionMessageRequest(
                agent_session_id=self.session_id if session_id is None else session_id,
                message=pr_pb2.ConnectRequest(**message),
            )
        )

    async def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
        await self.channel.close()


def unavailable(channel: int, reason: str = "") -> pr_pb2.SetChannelPresence:
    return pr_pb2.SetChannelPresence(
        channel=channel,  # type: ignore[arg-type]
        available=False,
        reason_code=reason,
    )


async def test_a_browser_session_sends_by_unary_calls_and_hears_on_its_stream(
    cluster: Cluster,
) -> None:
    agent_id = await register(cluster.stubs[0])
    browser = BrowserSession(cluster.addresses[0], agent_id)
    snapshot = await browser.open()
    assert snapshot.presence.overall == C.OVERALL_PRESENCE_PARTIALLY_READY
    assert list(snapshot.not_ready_reasons) == ["break", "lunch", "training"]
    assert not snapshot.resumed

    await browser.send(set_channel_presence=unavailable(C.CHANNEL_DESK_VOICE, "lunch"))
    confirmed = await browser.next_kind("presence_confirmed")
    assert confirmed.presence.overall == C.OVERALL_PRESENCE_NOT_READY
    assert confirmed.presence.not_ready_reason == "lunch"
    # Supervisors see the reason too.
    seen = await cluster.stubs[1].GetPresence(pr_pb2.GetPresenceRequest(agent_ids=[agent_id]))
    assert seen.agents[0].not_ready_reason == "lunch"

    # A reason not configured is refused on the call; the session goes on.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await browser.send(set_channel_presence=unavailable(C.CHANNEL_CHAT, "coffee"))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(refused.value) == {"set_channel_presence.reason_code"}
    await browser.send(heartbeat=pr_pb2.Heartbeat())
    assert (await browser.next()).HasField("heartbeat_ack")

    # Available again: the reason is cleared.
    await browser.send(
        set_channel_presence=pr_pb2.SetChannelPresence(channel=C.CHANNEL_CHAT, available=True)
    )
    confirmed = await browser.next_kind("presence_confirmed")
    assert confirmed.presence.overall == C.OVERALL_PRESENCE_PARTIALLY_READY
    assert confirmed.presence.not_ready_reason == ""
    await browser.close()


async def test_a_session_message_reaches_only_its_own_agents_session_on_its_server(
    cluster: Cluster,
) -> None:
    agent_id = await register(cluster.stubs[0])
    other_id = await register(cluster.stubs[0])
    browser = BrowserSession(cluster.addresses[0], agent_id)
    await browser.open()

    async def refused(sender: BrowserSession, session_id: str) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await sender.send(session_id, heartbeat=pr_pb2.Heartbeat())
        return caught.value

    # Another agent's token cannot drive this agent's session, even knowing its id.
    intruder = BrowserSession(cluster.addresses[0], other_id)
    denied = await refused(intruder, browser.session_id)
    assert denied.code() == grpc.StatusCode.NOT_FOUND
    # The other server does not hold it.
    elsewhere = BrowserSession(cluster.addresses[1], agent_id)
    assert (await refused(elsewhere, browser.session_id)).code() == grpc.StatusCode.NOT_FOUND
    assert (await refused(browser, "as-unknown")).code() == grpc.StatusCode.NOT_FOUND
    # A login is not a message of an open session.
    with pytest.raises(grpc.aio.AioRpcError) as login:
        await browser.send(login=pr_pb2.Login(agent_id=agent_id))
    assert login.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await browser.send(heartbeat=pr_pb2.Heartbeat())
    assert (await browser.next()).HasField("heartbeat_ack")
    for session in (browser, intruder, elsewhere):
        await session.close()


async def _dropped_with_choices(cluster: Cluster, agent_id: str) -> str:
    """A session on replica 0 where the agent made mobile voice available, then went on
    do-not-disturb for training; the network then drops it. Its id."""
    browser = BrowserSession(cluster.addresses[0], agent_id)
    await browser.open()
    await browser.send(
        set_channel_presence=pr_pb2.SetChannelPresence(
            channel=C.CHANNEL_MOBILE_VOICE, available=True
        )
    )
    await browser.next_kind("presence_confirmed")
    await browser.send(
        set_do_not_disturb=pr_pb2.SetDoNotDisturb(enabled=True, reason_code="training")
    )
    confirmed = await browser.next_kind("presence_confirmed")
    assert confirmed.presence.overall == C.OVERALL_PRESENCE_DO_NOT_DISTURB
    await browser.close()
    return browser.session_id


async def test_a_dropped_session_is_resumed_with_the_agents_choices_on_any_server(
    cluster: Cluster,
) -> None:
    agent_id = await register(cluster.stubs[0])
    dropped = await _dropped_with_choices(cluster, agent_id)

    again = BrowserSession(cluster.addresses[1], agent_id)
    snapshot = await again.open(resume_token=dropped)
    assert snapshot.resumed
    assert snapshot.agent_session_id != dropped
    assert snapshot.presence.do_not_disturb
    assert snapshot.presence.not_ready_reason == "training"
    await again.send(set_do_not_disturb=pr_pb2.SetDoNotDisturb(enabled=False))
    confirmed = await again.next_kind("presence_confirmed")
    # The choices made before the drop come back with do-not-disturb off.
    assert confirmed.presence.overall == C.OVERALL_PRESENCE_PARTIALLY_READY
    assert [c.presence for c in confirmed.presence.channels] == [
        C.CHANNEL_PRESENCE_AVAILABLE,
        C.CHANNEL_PRESENCE_AVAILABLE,
        C.CHANNEL_PRESENCE_UNAVAILABLE,
    ]
    await again.close()

    # A login without the token, or with another, starts from the login defaults.
    fresh = BrowserSession(cluster.addresses[0], agent_id)
    snapshot = await fresh.open(resume_token="as-someone-else")
    assert not snapshot.resumed
    assert not snapshot.presence.do_not_disturb
    assert snapshot.presence.overall == C.OVERALL_PRESENCE_PARTIALLY_READY
    await fresh.close()


async def test_a_session_of_a_dead_replica_is_resumed_on_another(cluster: Cluster) -> None:
    agent_id = await register(cluster.stubs[0])
    app = App(cluster.addresses[0])
    first = await app.login(agent_id)
    await app.send(set_do_not_disturb=pr_pb2.SetDoNotDisturb(enabled=True, reason_code="break"))
    await app.next_kind("presence_confirmed")
    cluster.replicas[0].signal(signal.SIGKILL)  # no clean end: the presence waits for its lease
    await cluster.replicas[0].wait_exit()

    again = BrowserSession(cluster.addresses[1], agent_id)
    snapshot = await again.open(resume_token=first.agent_session_id)
    assert snapshot.resumed
    assert snapshot.presence.overall == C.OVERALL_PRESENCE_DO_NOT_DISTURB
    assert snapshot.presence.not_ready_reason == "break"
    await again.close()


async def test_a_reason_is_refused_when_becoming_ready(cluster: Cluster) -> None:
    agent_id = await register(cluster.stubs[0])
    app = App(cluster.addresses[0])
    await app.login(agent_id)
    await app.send(
        set_channel_presence=pr_pb2.SetChannelPresence(
            channel=C.CHANNEL_CHAT, available=True, reason_code="lunch"
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await app.next_kind("presence_confirmed")
    assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(ended.value) == {"set_channel_presence.reason_code"}


async def test_a_login_on_the_same_replica_survives_the_end_of_the_session_it_replaces(
    cluster: Cluster,
) -> None:
    """The replaced session ends and releases its lease while the new one is writing its
    presence: the old key's deletion is not the new session's loss, however they
    interleave (tried over a chain of logins of one agent on one replica)."""
    agent_id = await register(cluster.stubs[0])
    previous = App(cluster.addresses[0])
    await previous.login(agent_id)
    for _ in range(15):
        current = App(cluster.addresses[0])
        await current.login(agent_id)
        await current.send(
            set_channel_presence=pr_pb2.SetChannelPresence(channel=C.CHANNEL_CHAT, available=True)
        )
        await current.next_kind("presence_confirmed")
        previous.call.cancel()
        previous = current
    previous.call.cancel()
