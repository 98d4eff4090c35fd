"""Presence under faults of etcd: an agent's session lives through an outage shorter
than its lease, and what the agent asked for meanwhile is applied once etcd is back.
(Replicas and apps that die are test_presence.py's.)"""

from __future__ import annotations

from collections.abc import Callable

from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.presence.v1 import presence_pb2_grpc as pr_grpc
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from tests.conftest import ServiceProcess, connect, wait_serving
from tests.support.presence import App, C, register


async def test_an_agent_session_lives_through_an_etcd_outage_and_its_change_is_applied(
    service_factory: Callable[..., ServiceProcess], private_etcd: EmbeddedEtcd
) -> None:
    """A change the agent asks for while etcd cannot take it (here: etcd stopped, as in
    a leader election that outlasts a request) is applied once etcd is back, and the
    session lives on: the app is not cut off for what is no fault of its own."""
    replica = service_factory(
        "accessline_server.presence",
        etcd_endpoints=private_etcd.endpoint,
        ACCESSLINE_PRESENCE_LEASE_SECONDS="15",
        ACCESSLINE_PRESENCE_HEARTBEAT_TIMEOUT_SECONDS="60",
        ACCESSLINE_ETCD_TIMEOUT_SECONDS="1",
    )
    await wait_serving(replica)
    async with connect(replica.address) as channel:
        agent_id = await register(pr_grpc.PresenceServiceStub(channel))
    app = App(replica.address)
    await app.login(agent_id)
    private_etcd.stop()
    await app.send(
        set_channel_presence=pr_pb2.SetChannelPresence(channel=C.CHANNEL_CHAT, available=True)
    )
    private_etcd.start()
    await private_etcd.wait_ready()
    confirmed = await app.next_kind("presence_confirmed", timeout=30)
    chat = [c for c in confirmed.presence.channels if c.channel == C.CHANNEL_CHAT]
    assert chat[0].presence == C.CHANNEL_PRESENCE_AVAILABLE
    await app.send(heartbeat=pr_pb2.Heartbeat())
    assert (await app.next_kind("heartbeat_ack")).HasField("server_time")
    app.call.cancel()
