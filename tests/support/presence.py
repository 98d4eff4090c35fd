"""What the Presence tests drive: two replicas on one etcd (the test module's fixture
makes them), an agent app's stream, a presence watcher, and an agent app as a process of
its own (tests/support/agent_app.py) for the tests that crash or freeze it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from typing import Any

import grpc

from accessline.common.v1 import common_pb2
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.presence.v1 import presence_pb2_grpc as pr_grpc
from accessline_server.presence import roster
from accessline_server.runtime.store import Store
from tests.conftest import (
    ROOT,
    ServiceProcess,
    connect,
    identity,
    violated_fields,
)

# The sealing of the test processes' records (their development secret).
SEALING = roster.Sealing(roster.DEVELOPMENT_SECRET.encode())


C = common_pb2


SETTINGS = {
    "ACCESSLINE_PRESENCE_LEASE_SECONDS": "3",
    "ACCESSLINE_PRESENCE_HEARTBEAT_TIMEOUT_SECONDS": "60",
}


def token(agent_id: str) -> str:
    return identity().token(agent_id, "agent")


@dataclass
class Cluster:
    replicas: list[ServiceProcess]
    stubs: list[Any]
    store: Store

    @property
    def addresses(self) -> list[str]:
        return [r.address for r in self.replicas]


async def register(stub: Any, group: str = "mortgage-team") -> str:
    agent_id = f"agent-{uuid.uuid4().hex[:8]}"
    agent = pr_pb2.Agent(
        agent_id=agent_id,
        display_name="Camille",
        skills=[pr_pb2.Skill(name="mortgage", level=7)],
        languages=["fr-FR"],
        resource_groups=[group],
        channels=[
            pr_pb2.ChannelConfig(
                channel=C.CHANNEL_DESK_VOICE, address="4021", available_on_login=True
            ),
            pr_pb2.ChannelConfig(channel=C.CHANNEL_MOBILE_VOICE, address="+33612345678"),
            pr_pb2.ChannelConfig(channel=C.CHANNEL_CHAT, address="camille", capacity=3),
        ],
    )
    await stub.RegisterAgent(pr_pb2.RegisterAgentRequest(agent=agent))
    return agent_id


class App:
    """An agent app's stream, driven by the test: opened with the agent's own token (an
    agent signs in with their company's identity provider, then connects)."""

    def __init__(self, address: str, token: str | None = None) -> None:
        self.address = address
        self._token = token
        self._call: Any = None

    @property
    def call(self) -> Any:
        if self._call is None:
            self.open(self._token or identity().token("some-agent", "agent"))
        return self._call

    def open(self, token: str) -> None:
        channel = connect(self.address, token)
        self._call = pr_grpc.PresenceServiceStub(channel).Connect()

    async def login(self, agent_id: str) -> pr_pb2.Snapshot:
        if self._call is None:
            self.open(self._token or identity().token(agent_id, "agent"))
        await self.call.write(pr_pb2.ConnectRequest(login=pr_pb2.Login(agent_id=agent_id)))
        reply = await self.next()
        assert reply.HasField("snapshot"), reply
        return reply.snapshot

    async def send(self, **message: Any) -> None:
        await self.call.write(pr_pb2.ConnectRequest(**message))

    async def login_unchecked(self, agent_id: str) -> None:
        """Sends a login with the agent's own token, whatever the answer."""
        if self._call is None:
            self.open(identity().token(agent_id, "agent"))
        await self.send(login=pr_pb2.Login(agent_id=agent_id))

    async def next(self, timeout: float = 15.0) -> Any:
        reply = await asyncio.wait_for(self.call.read(), timeout)
        return reply

    async def next_kind(self, kind: str, timeout: float = 15.0) -> Any:
        while True:
            reply = await self.next(timeout)
            assert reply is not grpc.aio.EOF, f"stream ended waiting for {kind}"
            if reply.WhichOneof("message") == kind:
                return getattr(reply, kind)


async def ending(app: App) -> tuple[grpc.StatusCode, list[Any], set[str]]:
    """Reads a stream to its end: its status code, what came before, the fields named."""
    before: list[Any] = []
    try:
        while (reply := await app.next()) is not grpc.aio.EOF:
            before.append(reply)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), before, violated_fields(exc)
    return await app.call.code(), before, set()


class Watcher:
    def __init__(self, stub: Any, **request: Any) -> None:
        self.call = stub.WatchPresence(pr_pb2.WatchPresenceRequest(**request))

    async def next(self, timeout: float = 15.0) -> pr_pb2.WatchPresenceResponse:
        reply = await asyncio.wait_for(self.call.read(), timeout)
        assert reply is not grpc.aio.EOF
        return reply

    async def overall_until(self, want: int, timeout: float = 15.0) -> list[int]:
        seen: list[int] = []
        while not seen or seen[-1] != want:
            reply = await self.next(timeout)
            if reply.HasField("change"):
                seen.append(reply.change.overall)
        return seen


def agent_app(address: str, agent_id: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'gen'}"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.agent_app",
            address,
            agent_id,
            token(agent_id),
            str(identity().files.folder),
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


async def wait_logged_in(app: subprocess.Popen[str]) -> None:
    assert app.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(app.stdout.readline), 30)
    assert line.strip() == "logged-in"


async def overall(stub: Any, agent_id: str) -> int:
    reply = await stub.GetPresence(pr_pb2.GetPresenceRequest(agent_ids=[agent_id]))
    return int(reply.agents[0].overall)
