"""Local HTTP/2 servers (TLS, ALPN h2) that answer as APNs, FCM and Google's OAuth2
token endpoint do, record every request exactly, and misbehave on cue by device token:
`ok-…` succeeds, `bad-…` is refused (400), `gone-…` is unregistered (410 / UNREGISTERED),
`busy-…` gets 429 with Retry-After: 1 once (half a second after the request came in),
`soon-…` gets 429 with a Retry-After that is no number nor date once, `flaky-…` gets 503
once, `down-…` always 503, `hang-…` is held without an answer the first time."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypercorn.asyncio import serve
from hypercorn.config import Config


@dataclass
class Recorded:
    method: str
    path: str
    http_version: str
    headers: dict[str, str]
    body: bytes
    at: float
    status: int = 0
    # When the answer was sent back.
    answered_at: float = 0.0


@dataclass
class Credentials:
    ca_file: Path
    cert_file: Path
    key_file: Path
    apns_key_file: Path
    apns_public_key: Any
    fcm_account_file: Path
    fcm_public_key: Any


def _pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_credentials(folder: Path, port: int) -> Credentials:
    """A CA, a server certificate for 127.0.0.1, an APNs signing key and an FCM service
    account whose token endpoint is this server."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Accessline test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "server.key").write_bytes(_pem(key))
    apns_key = ec.generate_private_key(ec.SECP256R1())
    (folder / "apns.p8").write_bytes(_pem(apns_key))
    fcm_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    account = {
        "type": "service_account",
        "project_id": "accessline-test",
        "private_key_id": "k1",
        "private_key": _pem(fcm_key).decode(),
        "client_email": "push@accessline-test.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": f"https://127.0.0.1:{port}/token",
    }
    (folder / "fcm.json").write_text(json.dumps(account))
    return Credentials(
        folder / "ca.pem",
        folder / "server.pem",
        folder / "server.key",
        folder / "apns.p8",
        apns_key.public_key(),
        folder / "fcm.json",
        fcm_key.public_key(),
    )


@dataclass
class PushServers:
    credentials: Credentials
    requests: list[Recorded] = field(default_factory=list)
    seen_tokens: dict[str, int] = field(default_factory=dict)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    hung: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_for_requests(self, count: int) -> None:
        """Until `count` provider requests (token requests aside) were received."""
        while len([r for r in self.requests if r.path != "/token"]) < count:
            self.arrived.clear()
            await self.arrived.wait()

    def to(self, path_part: str) -> list[Recorded]:
        return [r for r in self.requests if path_part in r.path]

    def for_token(self, token: str) -> list[Recorded]:
        return [r for r in self.requests if token in r.path or token.encode() in r.body]

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = (await receive())["type"]
                if event == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif event == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        record = Recorded(
            scope["method"], scope["path"], scope["http_version"], headers, body, time.time()
        )
        self.requests.append(record)
        self.arrived.set()
        status, extra, payload = await self._answer(record)
        record.status = status
        record.answered_at = time.time()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    *[(k.encode(), v.encode()) for k, v in extra.items()],
                ],
            }
        )
        await send(
            {"type": "http.response.body", "body": json.dumps(payload).encode() if payload else b""}
        )

    async def _answer(self, r: Recorded) -> tuple[int, dict[str, str], Any]:
        if r.path == "/token":
            form = urllib.parse.parse_qs(r.body.decode())
            claims = jwt.decode(
                form["assertion"][0],
                self.credentials.fcm_public_key,
                algorithms=["RS256"],
                audience=f"https://127.0.0.1:{r.headers.get('host', '').split(':')[-1]}/token",
                options={"verify_aud": False},
            )
            assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
            assert claims["iss"] == "push@accessline-test.iam.gserviceaccount.com"
            return (
                200,
                {},
                {"access_token": "fcm-access-token", "expires_in": 3600, "token_type": "Bearer"},
            )
        if r.path.startswith("/3/device/"):
            token = r.path.rsplit("/", 1)[1]
            fcm = False
        else:
            token = json.loads(r.body)["message"]["token"]
            fcm = True
        count = self.seen_tokens.get(token, 0) + 1
        self.seen_tokens[token] = count
        kind = token.split("-", 1)[0]
        if kind == "hang" and count == 1:
            self.hung.set()
            await self.release.wait()
            return 200, {}, None
        if kind == "bad":
            return (
                400,
                {},
                (
                    {"error": {"code": 400, "status": "INVALID_ARGUMENT"}}
                    if fcm
                    else {"reason": "BadDeviceToken"}
                ),
            )
        if kind == "gone":
            if fcm:
                detail = {
                    "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                    "errorCode": "UNREGISTERED",
                }
                return 404, {}, {"error": {"code": 404, "status": "NOT_FOUND", "details": [detail]}}
            return 410, {}, {"reason": "Unregistered", "timestamp": int(time.time() * 1000)}
        if kind in ("busy", "soon") and count == 1:
            if kind == "busy":
                # A slow refusal: a retry counted from the request, not the answer, is early.
                await asyncio.sleep(0.5)
            return (
                429,
                {"retry-after": "1" if kind == "busy" else "soon"},
                (
                    {"error": {"status": "RESOURCE_EXHAUSTED"}}
                    if fcm
                    else {"reason": "TooManyRequests"}
                ),
            )
        if (kind == "flaky" and count == 1) or kind == "down":
            return (
                503,
                {},
                ({"error": {"status": "UNAVAILABLE"}} if fcm else {"reason": "ServiceUnavailable"}),
            )
        return (
            200,
            ({} if fcm else {"apns-id": "00000000-0000-0000-0000-000000000001"}),
            ({"name": f"projects/accessline-test/messages/{count}"} if fcm else None),
        )

    @staticmethod
    async def ready(port: int, timeout: float = 15.0) -> None:
        """Until the server accepts connections."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def run(self, port: int, stop: asyncio.Event) -> None:
        config = Config()
        config.bind = [f"127.0.0.1:{port}"]
        config.certfile = str(self.credentials.cert_file)
        config.keyfile = str(self.credentials.key_file)
        config.alpn_protocols = ["h2", "http/1.1"]
        config.graceful_timeout = 1.0
        config.keep_alive_max_requests = 10_000_000
        config.accesslog = None
        config.errorlog = None
        await serve(self.app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
