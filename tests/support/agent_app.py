"""A stand-alone agent app process for presence tests: logs in, prints `logged-in`,
then heartbeats every half second until it is stopped, frozen or killed.

    python -m tests.support.agent_app ADDRESS AGENT_ID TOKEN IDENTITY_FOLDER

It connects over mutual TLS with a client certificate of the identity in IDENTITY_FOLDER
and the agent's bearer TOKEN.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.presence.v1 import presence_pb2_grpc as pr_grpc
from accessline_server.runtime.devpki import DevIdentity

# Heartbeat pace of an agent app (well within the heartbeat time-out): not a wait on
# anything in particular.
HEARTBEAT_EVERY = 0.5


async def main(address: str, agent_id: str, token: str, folder: str) -> None:
    async def messages() -> AsyncIterator[pr_pb2.ConnectRequest]:
        yield pr_pb2.ConnectRequest(login=pr_pb2.Login(agent_id=agent_id))
        while True:
            await asyncio.sleep(HEARTBEAT_EVERY)
            yield pr_pb2.ConnectRequest(heartbeat=pr_pb2.Heartbeat())

    async with DevIdentity(Path(folder)).channel(address, token) as channel:
        stub = pr_grpc.PresenceServiceStub(channel)
        async for reply in stub.Connect(messages()):
            if reply.HasField("snapshot"):
                print("logged-in", flush=True)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
