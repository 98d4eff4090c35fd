"""Webhooks: an application's backend registers endpoints for the events it wants
(events.py is how the services where they happen write them); each endpoint has a signing
secret (Standard Webhooks: `whsec_` and base64 of 32 random bytes), sealed in etcd, shown
only when made, and rotated with an overlap during which both sign. An application holds
at most `MAX_WEBHOOKS` endpoints: each takes a slot key created only if absent, so the
limit holds however many registrations race.

Where an endpoint may point is checked here (https, no user info; plain http and
addresses of private networks only where the deployment allows them) and again when a
delivery resolves it (webhook_delivery.py), so a name that later resolves inside the
network is refused too."""

from __future__ import annotations

import base64
import ipaddress
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from accessline.notification.storage.v1 import storage_pb2 as nt_store
from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline_server.notification.keys import (
    WEBHOOK_DELIVERIES,
    WEBHOOKS,
    Keys,
)
from accessline_server.runtime import identity
from accessline_server.runtime.clock import seconds, timestamp
from accessline_server.runtime.errors import (
    Aborted,
    FieldViolation,
    NotFound,
    ResourceExhausted,
)
from accessline_server.runtime.sealing import Sealer
from accessline_server.runtime.store import Compare, Op, Store

# Endpoints one application may register.
MAX_WEBHOOKS = 10
SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret
DEFAULT_OVERLAP_SECONDS = 86400.0
MAX_OVERLAP_SECONDS = 7 * 86400.0


@dataclass(frozen=True)
class Reach:
    """Where endpoints may point: plain http, and addresses of private networks
    (loopback, RFC 1918, link-local...), only when the deployment says so."""

    allow_http: bool = False
    allow_private: bool = False

    def url_violations(self, url: str, field: str) -> list[FieldViolation]:
        if not url or len(url) > 2048:
            return [FieldViolation(field, "must be a URL of at most 2,048 characters")]
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            return [FieldViolation(field, "is not a URL")]
        schemes = ("https", "http") if self.allow_http else ("https",)
        if parts.scheme not in schemes:
            return [FieldViolation(field, f"must be {' or '.join(schemes)}")]
        if not parts.hostname or parts.username or parts.password:
            return [FieldViolation(field, "must name a host, without user info")]
        try:
            address = ipaddress.ip_address(parts.hostname)
        except ValueError:
            return []  # a name: checked once resolved, at each delivery
        if not self.address_allowed(address):
            return [FieldViolation(field, "points into a private network")]
        return []

    def address_allowed(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return self.allow_private or address.is_global


def _until(secret: nt_store.WebhookSecret) -> float:
    """When a secret stops signing (never, for the current one)."""
    return seconds(secret.valid_until) if secret.HasField("valid_until") else float("inf")


def new_secret() -> tuple[str, bytes]:
    """A signing secret as shown to its owner, and its bytes."""
    raw = secrets.token_bytes(32)
    return SECRET_PREFIX + base64.b64encode(raw).decode(), raw


def delivery_order(occurred_at: float, event_id: str) -> str:
    """The key suffix of a delivery: newest event first, then by id."""
    return f"{(1 << 62) - int(occurred_at * 1e6):020d}-{event_id}"


class Webhooks:
    """The registry of webhooks in etcd."""

    def __init__(self, store: Store, secret: bytes, reach: Reach) -> None:
        self._store = store
        self._keys = Keys(secret)
        self._sealer = Sealer(secret, b"accessline webhook secret v1")
        self.reach = reach

    def _slot_key(self, application_id: str, slot: int) -> str:
        return f"{self._keys.application(application_id)}{slot:02d}"

    def seal(self, webhook_id: str, raw: bytes) -> bytes:
        return self._sealer.seal(raw, webhook_id)

    def signing_secrets(self, stored: nt_store.StoredWebhook, now: float) -> list[bytes]:
        """The secrets that sign a delivery now: the current one and those still in
        their overlap."""
        return [
            self._sealer.unseal(s.sealed, stored.webhook.webhook_id)
            for s in stored.secrets
            if _until(s) > now
        ]

    async def register(self, webhook: nt_pb2.Webhook) -> tuple[nt_pb2.Webhook, str]:
        """Stores a webhook the servicer checked (its URL by `reach`), in a free slot of
        its application; the webhook as stored and its secret as shown once."""
        shown = nt_pb2.Webhook()
        shown.CopyFrom(webhook)
        shown.webhook_id = "wh_" + secrets.token_urlsafe(12)
        shown.created_at.CopyFrom(timestamp(time.time()))
        shown_secret, raw = new_secret()
        stored = nt_store.StoredWebhook(
            webhook=shown,
            secrets=[nt_store.WebhookSecret(sealed=self.seal(shown.webhook_id, raw))],
        )
        taken, _ = await self._store.get_prefix(
            self._keys.application(webhook.application_id), nt_store.WebhookSlot
        )
        used = {int(entry.key.rsplit("/", 1)[1]) for entry in taken}
        for slot in (s for s in range(MAX_WEBHOOKS) if s not in used):
            stored.slot = slot
            key = self._slot_key(webhook.application_id, slot)
            result = await self._store.txn(
                [Compare.absent(key)],
                [
                    Op.put(key, nt_store.WebhookSlot(webhook_id=shown.webhook_id)),
                    Op.put(WEBHOOKS + shown.webhook_id, stored),
                ],
            )
            if result.succeeded:
                return shown, shown_secret
        raise ResourceExhausted(
            f"application {webhook.application_id} has {MAX_WEBHOOKS} webhooks already;"
            " delete one first",
            reason="TOO_MANY_WEBHOOKS",
            metadata={"application_id": webhook.application_id},
        )

    async def stored(self, webhook_id: str) -> tuple[nt_store.StoredWebhook, int]:
        """The webhook and its revision: NOT_FOUND when there is none, PERMISSION_DENIED
        when it is another application's than the caller may act for."""
        entry = await self._store.get(WEBHOOKS + webhook_id, nt_store.StoredWebhook)
        if entry is None:
            raise NotFound(
                f"webhook {webhook_id} does not exist",
                reason="WEBHOOK_NOT_FOUND",
                metadata={"webhook_id": webhook_id},
            )
        identity.require_application(entry.value.webhook.application_id, f"webhook {webhook_id}")
        return entry.value, entry.meta.mod_revision

    async def for_application(self, application_id: str) -> list[nt_store.StoredWebhook]:
        slots, _ = await self._store.get_prefix(
            self._keys.application(application_id), nt_store.WebhookSlot
        )
        if not slots:
            return []
        result = await self._store.txn(
            [], [Op.get(WEBHOOKS + slot.value.webhook_id) for slot in slots]
        )
        return [nt_store.StoredWebhook.FromString(rows[0].value) for rows in result.gets if rows]

    async def rotate(self, webhook_id: str, overlap: float) -> str:
        stored, revision = await self.stored(webhook_id)
        now = time.time()
        kept = [s for s in stored.secrets if _until(s) > now]
        for secret in kept:
            if _until(secret) > now + overlap:
                secret.valid_until.CopyFrom(timestamp(now + overlap))
        shown_secret, raw = new_secret()
        del stored.secrets[:]
        stored.secrets.extend([nt_store.WebhookSecret(sealed=self.seal(webhook_id, raw)), *kept])
        await self._write(webhook_id, stored, revision)
        return shown_secret

    async def _write(self, webhook_id: str, stored: nt_store.StoredWebhook, revision: int) -> None:
        result = await self._store.txn(
            [Compare.modified_at(WEBHOOKS + webhook_id, revision)],
            [Op.put(WEBHOOKS + webhook_id, stored)],
        )
        if not result.succeeded:
            raise Aborted("the webhook changed meanwhile; retry", reason="CONCURRENT_UPDATE")

    async def delete(self, webhook_id: str) -> None:
        stored, revision = await self.stored(webhook_id)
        slot = self._slot_key(stored.webhook.application_id, stored.slot)
        await self._store.txn(
            [Compare.modified_at(WEBHOOKS + webhook_id, revision)],
            [
                Op.delete(WEBHOOKS + webhook_id),
                Op.delete(slot),
                Op.delete_prefix(f"{WEBHOOK_DELIVERIES}{webhook_id}/"),
            ],
        )

    async def deliveries(
        self, webhook_id: str, page_size: int, page_token: str
    ) -> tuple[Sequence[nt_pb2.WebhookDelivery], str]:
        await self.stored(webhook_id)
        prefix = f"{WEBHOOK_DELIVERIES}{webhook_id}/"
        rows, _ = await self._store.get_prefix(
            prefix,
            nt_store.StoredWebhookDelivery,
            limit=page_size + 1,
            start_after=prefix + page_token if page_token else None,
        )
        page = rows[:page_size]
        token = page[-1].key[len(prefix) :] if len(rows) > page_size else ""
        return [row.value.delivery for row in page], token
