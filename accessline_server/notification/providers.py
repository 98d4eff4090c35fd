"""Push providers, on their real protocols: APNs over HTTP/2 with token (ES256 JWT)
authentication, FCM HTTP v1 with an OAuth2 bearer token from a service account. HTTP/2
comes from httpx, JWT from PyJWT, the OAuth2 flow from google-auth."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google.auth.exceptions
import httpx
import jwt

from accessline.notification.v1 import notification_pb2 as nt_pb2

log = logging.getLogger("accessline.notification.providers")

# Refresh the APNs token well before Apple's one-hour limit.
APNS_TOKEN_SECONDS = 50 * 60


@dataclass(frozen=True)
class Outcome:
    """What a provider said: sent, retry later (maybe after a delay), or failed for good;
    `unregistered` when the token is dead and the device must be deactivated."""

    sent: bool
    retry: bool = False
    retry_after: float | None = None
    reason: str = ""
    unregistered: bool = False


@dataclass(frozen=True)
class Message:
    """What a device is sent: display text and ids, never personal data."""

    notification: nt_pb2.Notification
    push_token: str
    expires_at: float
    priority: int
    collapse_key: str


# A Retry-After further out than this is taken as this (the notification expires first).
MAX_RETRY_AFTER_SECONDS = 24 * 3600.0


def retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now (a number of seconds or an HTTP date); None when
    absent or neither, so the worker's own backoff applies."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return min(MAX_RETRY_AFTER_SECONDS, max(0.0, seconds))


def _classify(status: int, reason: str, headers: httpx.Headers) -> Outcome:
    if 200 <= status < 300:
        return Outcome(sent=True)
    if status == 429 or status >= 500:
        return Outcome(
            sent=False,
            retry=True,
            retry_after=retry_after(headers.get("retry-after")),
            reason=reason or str(status),
        )
    return Outcome(sent=False, reason=reason or str(status))


def _client(ca_file: str) -> httpx.AsyncClient:
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
    return httpx.AsyncClient(http2=True, verify=verify, timeout=10.0)


class Apns:
    """Apple Push Notification service, token-based authentication."""

    def __init__(
        self, url: str, key_file: str, key_id: str, team_id: str, topic: str, ca_file: str = ""
    ) -> None:
        self._url = url.rstrip("/")
        self._key = Path(key_file).read_text()
        self._key_id = key_id
        self._team_id = team_id
        self._topic = topic
        self._client = _client(ca_file)
        self._token = ""
        self._token_at = 0.0

    def _bearer(self) -> str:
        now = time.time()
        if not self._token or now - self._token_at > APNS_TOKEN_SECONDS:
            self._token = jwt.encode(
                {"iss": self._team_id, "iat": int(now)},
                self._key,
                algorithm="ES256",
                headers={"kid": self._key_id},
            )
            self._token_at = now
        return self._token

    async def send(self, message: Message) -> Outcome:
        n = message.notification
        body = {"aps": {"alert": {"title": n.title, "body": n.body}}, **dict(n.data)}
        if n.link_url:
            body["link_url"] = n.link_url
        headers = {
            "authorization": f"bearer {self._bearer()}",
            "apns-topic": self._topic,
            "apns-push-type": "alert",
            "apns-expiration": str(int(message.expires_at)),
            "apns-priority": "10" if message.priority == nt_pb2.PRIORITY_HIGH else "5",
        }
        if message.collapse_key:
            headers["apns-collapse-id"] = message.collapse_key[:64]
        try:
            response = await self._client.post(
                f"{self._url}/3/device/{message.push_token}",
                content=json.dumps(body),
                headers=headers,
            )
        except httpx.HTTPError as exc:
            return Outcome(sent=False, retry=True, reason=f"transport: {type(exc).__name__}")
        reason = ""
        if response.status_code >= 300 and response.content:
            try:
                reason = str(response.json().get("reason", ""))
            except ValueError:
                reason = ""
        outcome = _classify(response.status_code, reason, response.headers)
        if response.status_code == 410 or reason == "Unregistered":
            return Outcome(sent=False, reason=reason or "Unregistered", unregistered=True)
        return outcome

    async def close(self) -> None:
        await self._client.aclose()


class Fcm:
    """Firebase Cloud Messaging HTTP v1, authenticated with a service account."""

    SCOPE = "https://www.googleapis.com/auth/firebase.messaging"

    def __init__(self, url: str, service_account_file: str, ca_file: str = "") -> None:
        from google.oauth2 import service_account

        info = json.loads(Path(service_account_file).read_text())
        self._project = info["project_id"]
        self._credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
            info, scopes=[self.SCOPE]
        )
        self._url = url.rstrip("/")
        self._client = _client(ca_file)
        self._ca_file = ca_file
        self._lock = asyncio.Lock()

    async def _bearer(self) -> str:
        async with self._lock:
            if not self._credentials.valid:
                await asyncio.to_thread(self._refresh)
            return str(self._credentials.token)

    def _refresh(self) -> None:
        import google.auth.transport.requests
        import requests

        session = requests.Session()
        if self._ca_file:
            # REQUESTS_CA_BUNDLE in the environment would otherwise win over the session.
            session.trust_env = False
            session.verify = self._ca_file
        self._credentials.refresh(google.auth.transport.requests.Request(session=session))

    async def send(self, message: Message) -> Outcome:
        n = message.notification
        ttl = max(0, int(message.expires_at - time.time()))
        android: dict[str, Any] = {
            "priority": "HIGH" if message.priority == nt_pb2.PRIORITY_HIGH else "NORMAL",
            "ttl": f"{ttl}s",
        }
        if message.collapse_key:
            android["collapse_key"] = message.collapse_key
        payload = {
            "message": {
                "token": message.push_token,
                "notification": {"title": n.title, "body": n.body},
                "data": {
                    **dict(n.data),
                    "notification_id": n.notification_id,
                    "event_type": nt_pb2.EventType.Name(n.event_type),
                    **({"link_url": n.link_url} if n.link_url else {}),
                },
                "android": android,
            }
        }
        try:
            token = await self._bearer()
            response = await self._client.post(
                f"{self._url}/v1/projects/{self._project}/messages:send",
                content=json.dumps(payload),
                headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
            )
        except httpx.HTTPError as exc:
            return Outcome(sent=False, retry=True, reason=f"transport: {type(exc).__name__}")
        except google.auth.exceptions.GoogleAuthError as exc:
            return Outcome(sent=False, retry=True, reason=f"oauth2: {type(exc).__name__}")
        reason = ""
        if response.status_code >= 300:
            try:
                error = response.json().get("error", {})
                reason = str(error.get("status", ""))
                for detail in error.get("details", []):
                    reason = str(detail.get("errorCode", reason))
            except ValueError:
                reason = ""
        if reason == "UNREGISTERED" or response.status_code == 404:
            return Outcome(sent=False, reason=reason or "UNREGISTERED", unregistered=True)
        return _classify(response.status_code, reason, response.headers)

    async def close(self) -> None:
        await self._client.aclose()
