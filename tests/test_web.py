"""Connect and gRPC-Web: every service answers over HTTP on its web port, with the same
handlers, authentication, errors (rich details) and streams as over native gRPC, called
by `buf curl` and by plain HTTP requests; browsers get in from the configured origins."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import struct
import subprocess
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from google.rpc import error_details_pb2

from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from tests.conftest import ROOT, error_details, identity
from tests.support.stack import Stack, start_stack, stop_stack

BUF = ROOT / "node_modules" / ".bin" / "buf"
CONSOLE = "https://console.example.test"

# A read of each service, as an operator's tool would make it.
READS = {
    "nd": ("accessline.numberdistribution.v1.NumberDistributionService/ListPools", {}),
    "callmatching": ("accessline.callmatching.v1.CallMatchingService/ListApplications", {}),
    "presence": ("accessline.presence.v1.PresenceService/ListAgents", {}),
    "notification": (
        "accessline.notification.v1.NotificationService/GetDelivery",
        {"notification_id": "n-unknown"},
    ),
    "routing": (
        "accessline.routing.v1.RoutingService/EstimateWait",
        {"resource_group": "g-web"},
    ),
}


@pytest.fixture(scope="module")
async def stack(
    etcd: EmbeddedEtcd, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    started = await start_stack(
        etcd,
        f"/web-{uuid.uuid4().hex[:8]}",
        tmp_path_factory.mktemp("web"),
        web={"ACCESSLINE_WEB_CORS_ORIGINS": f"{CONSOLE}, https://other.example.test"},
    )
    yield started
    await stop_stack(started)


def buf_curl(
    protocol: str, url: str, body: dict[str, Any], token: str, *, reflect: bool = False
) -> Any:
    schema = ["--reflect"] if reflect else ["--schema", str(ROOT / "protos")]
    done = subprocess.run(
        [
            str(BUF),
            "curl",
            "--protocol",
            protocol,
            *schema,
            "--cacert",
            str(identity().files.ca),
            "-H",
            f"authorization: Bearer {token}",
            "-d",
            json.dumps(body),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # The answer on stdout; a refusal (as JSON) on stderr.
    printed = done.stdout.strip() or done.stderr.strip()
    try:
        return done.returncode, json.loads(printed)
    except json.JSONDecodeError:
        return done.returncode, printed


def client(**headers: str) -> httpx.AsyncClient:
    trusted = ssl.create_default_context(cafile=str(identity().files.ca))
    return httpx.AsyncClient(verify=trusted, headers=headers, timeout=30)


@pytest.mark.parametrize("protocol", ["connect", "grpcweb"])
async def test_buf_curl_calls_every_service(stack: Stack, protocol: str) -> None:
    for service, (method, body) in READS.items():
        code, answer = buf_curl(
            protocol, f"https://{stack.web[service]}/{method}", body, identity().superuser
        )
        if service == "notification":
            # Reached, and refused as over gRPC: no such notification.
            assert answer["code"] == "not_found", answer
        else:
            assert code == 0, (service, answer)
            assert isinstance(answer, dict), answer


async def test_buf_curl_finds_the_contract_by_reflection_over_http(stack: Stack) -> None:
    method, body = READS["nd"]
    code, answer = buf_curl(
        "connect", f"https://{stack.web['nd']}/{method}", body, identity().superuser, reflect=True
    )
    assert code == 0, answer
    assert isinstance(answer, dict), answer


async def test_a_refusal_over_http_carries_the_same_status_and_details_as_over_grpc(
    stack: Stack,
) -> None:
    pool: dict[str, Any] = {"pool_id": "bad id!", "subjects": []}
    async with client(authorization=f"Bearer {identity().superuser}") as http:
        reply = await http.post(
            f"https://{stack.web['nd']}/accessline.numberdistribution.v1"
            ".NumberDistributionService/CreatePool",
            json={"pool": pool},
        )
    assert reply.status_code == 400
    body = reply.json()
    assert body["code"] == "invalid_argument"
    over_http = {
        violation.field
        for detail in body["details"]
        if detail["type"] == "google.rpc.BadRequest"
        for violation in error_details_pb2.BadRequest.FromString(
            base64.b64decode(detail["value"] + "==")
        ).field_violations
    }
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.nd.CreatePool(nd_pb2.CreatePoolRequest(pool=nd_pb2.Pool(pool_id="bad id!")))
    over_grpc = {v.field for v in error_details(refused.value)["BadRequest"].field_violations}
    assert over_http == over_grpc
    assert "pool.pool_id" in over_http


async def test_over_http_a_caller_is_its_bearer_token(stack: Stack) -> None:
    pools = (
        f"https://{stack.web['nd']}/accessline.numberdistribution.v1"
        ".NumberDistributionService/ListPools"
    )
    async with client() as http:
        anonymous = await http.post(pools, json={})
    assert (anonymous.status_code, anonymous.json()["code"]) == (401, "unauthenticated")
    async with client(authorization=f"Bearer {identity().token('a-1', 'agent')}") as http:
        agent = await http.post(pools, json={})
    assert (agent.status_code, agent.json()["code"]) == (403, "permission_denied")
    # What only a service may call (by its certificate) is refused over HTTP, whatever
    # the token says: there is no client certificate on the web port.
    async with client(authorization=f"Bearer {identity().superuser}") as http:
        reserve = await http.post(
            f"https://{stack.web['nd']}/accessline.numberdistribution.v1"
            ".NumberDistributionService/ReserveNumber",
            json={"subject": "s", "session_id": "s-1"},
        )
    assert (reserve.status_code, reserve.json()["code"]) == (403, "permission_denied")


def envelope(payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(payload)) + payload


def unpacked(data: bytes) -> list[tuple[int, bytes]]:
    frames = []
    while len(data) >= 5:
        flags, size = struct.unpack(">BI", data[:5])
        frames.append((flags, data[5 : 5 + size]))
        data = data[5 + size :]
    return frames


async def first_frames(http: httpx.AsyncClient, url: str, body: bytes, kind: str) -> bytes:
    """Reads a server stream until its first message."""
    async with http.stream("POST", url, content=body, headers={"content-type": kind}) as reply:
        assert reply.status_code == 200, await reply.aread()
        received = b""
        async for chunk in reply.aiter_bytes():
            received += chunk
            frames = unpacked(received)
            if frames and len(frames[0][1]) == struct.unpack(">I", received[1:5])[0]:
                return frames[0][1]
    raise AssertionError(f"the stream ended before its first message: {received!r}")


async def test_a_server_stream_over_connect_and_grpc_web(stack: Stack) -> None:
    url = f"https://{stack.web['presence']}/accessline.presence.v1.PresenceService/WatchPresence"
    async with client(authorization=f"Bearer {identity().superuser}") as http:
        first = await first_frames(
            http, url, envelope(b'{"resource_groups": ["g-web"]}'), "application/connect+json"
        )
        assert "snapshot" in json.loads(first), first
        request = pr_pb2.WatchPresenceRequest(resource_groups=["g-web"]).SerializeToString()
        first = await first_frames(http, url, envelope(request), "application/grpc-web+proto")
        assert pr_pb2.WatchPresenceResponse.FromString(first).HasField("snapshot")


async def test_browsers_are_let_in_from_the_configured_origins_only(stack: Stack) -> None:
    url = f"https://{stack.web['presence']}/accessline.presence.v1.PresenceService/ListAgents"
    preflight = {
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type",
    }
    async with client() as http:
        allowed = await http.options(url, headers={**preflight, "origin": CONSOLE})
        elsewhere = await http.options(
            url, headers={**preflight, "origin": "https://evil.example.test"}
        )
        called = await http.post(
            url,
            json={},
            headers={"origin": CONSOLE, "authorization": f"Bearer {identity().superuser}"},
        )
    assert allowed.status_code == 204
    assert allowed.headers["access-control-allow-origin"] == CONSOLE
    assert "authorization" in allowed.headers["access-control-allow-headers"]
    assert elsewhere.status_code == 403
    assert "access-control-allow-origin" not in elsewhere.headers
    assert called.status_code == 200
    assert called.headers["access-control-allow-origin"] == CONSOLE
    assert "grpc-status-details-bin" in called.headers["access-control-expose-headers"]


class H2:
    """One raw HTTP/2 connection over TLS, driven frame by frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.ended: dict[int, bool] = {}
        self.status: dict[int, str] = {}

    async def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())
        await self.writer.drain()

    async def until(self, stream: int, *, ended: bool) -> str:
        """Reads frames until the stream has its response headers (and has ended)."""
        while stream not in self.status or (ended and not self.ended.get(stream)):
            data = await asyncio.wait_for(self.reader.read(65536), 10)
            assert data, "the server closed the connection"
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    self.status[event.stream_id] = dict(event.headers)[b":status"].decode()
                elif isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                elif isinstance(event, h2.events.StreamEnded):
                    self.ended[event.stream_id] = True
            await self.flush()
        return self.status[stream]


async def test_a_path_not_served_leaves_the_other_calls_of_its_connection_alone(
    stack: Stack,
) -> None:
    host, port = stack.web["nd"].rsplit(":", 1)
    tls = ssl.create_default_context(cafile=str(identity().files.ca))
    tls.set_alpn_protocols(["h2"])
    reader, writer = await asyncio.open_connection(host, int(port), ssl=tls)
    peer = H2(reader, writer)
    try:
        headers = [
            (":method", "POST"),
            (":scheme", "https"),
            (":authority", stack.web["nd"]),
            ("content-type", "application/connect+json"),
            ("authorization", f"Bearer {identity().superuser}"),
        ]
        # A stream to a path the server does not serve, still sending once answered.
        peer.conn.send_headers(1, [(":path", "/no.such.v1.Service/Call"), *headers])
        peer.conn.send_data(1, envelope(b"{}"))
        await peer.flush()
        assert await peer.until(1, ended=False) == "404"
        peer.conn.send_data(1, envelope(b"{}"), end_stream=True)
        # Then a call on the same connection is answered.
        method, _ = READS["nd"]
        peer.conn.send_headers(
            3,
            [
                (":path", f"/{method}"),
                *headers[:3],
                ("content-type", "application/json"),
                ("authorization", f"Bearer {identity().superuser}"),
            ],
        )
        peer.conn.send_data(3, b"{}", end_stream=True)
        await peer.flush()
        assert await peer.until(3, ended=True) == "200"
    finally:
        writer.close()
