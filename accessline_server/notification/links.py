"""Links an agent sends the customer of the interaction they are working (a form to fill,
a document to sign): checked against the allowed origins, only to the customer of an
interaction the agent is on now (read through Presence's published `offers` module),
counted per interaction in one transaction, then published in-app and by push to that
customer's devices of that application."""

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit

from accessline.notification.storage.v1 import storage_pb2 as nt_store
from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline_server.notification import journal
from accessline_server.notification.domain import Notifications
from accessline_server.notification.keys import LINKS
from accessline_server.presence import offers as presence_offers
from accessline_server.runtime.errors import (
    FailedPrecondition,
    FieldViolation,
    NotFound,
    ResourceExhausted,
)
from accessline_server.runtime.store import Compare, Op, Store

DEFAULT_TITLE = "A link from your advisor"
MAX_URL = 1024
# A link stays readable in the app this long.
LINK_TTL_SECONDS = 7 * 86400.0
# The tally of an interaction's links outlives the longest interaction.
TALLY_SECONDS = 7 * 86400.0


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


class Links:
    def __init__(
        self,
        store: Store,
        notifications: Notifications,
        origins: tuple[str, ...],
        per_interaction: int,
    ) -> None:
        self._store = store
        self._notifications = notifications
        self._origins = {o.rstrip("/").lower() for o in origins}
        self._per_interaction = per_interaction

    def url_violations(self, url: str, field: str) -> list[FieldViolation]:
        if not url or len(url) > MAX_URL:
            return [FieldViolation(field, f"must be 1 to {MAX_URL} characters")]
        try:
            parts = urlsplit(url)
        except ValueError:
            return [FieldViolation(field, "is not a URL")]
        if parts.scheme != "https" or not parts.hostname or parts.username or parts.password:
            return [FieldViolation(field, "must be an https URL without credentials")]
        if origin_of(url) not in self._origins:
            allowed = ", ".join(sorted(self._origins)) or "none configured"
            return [FieldViolation(field, f"its origin is not allowed (allowed: {allowed})")]
        return []

    async def send(
        self, agent_id: str, interaction_id: str, url: str, title: str
    ) -> nt_pb2.SendLinkResponse:
        working = await presence_offers.working_on(self._store, agent_id, interaction_id)
        if working is None:
            raise NotFound(
                "the agent is not on this interaction (not accepted, or ended)",
                reason="NOT_ON_INTERACTION",
            )
        if not working.customer_id:
            raise FailedPrecondition(
                "the customer of this interaction is unknown (the call matched no app's"
                " customer): a link has no one to go to",
                reason="CUSTOMER_UNKNOWN",
            )
        digest = hashlib.sha256(url.encode()).hexdigest()
        await self._count(agent_id, interaction_id, digest)
        request = nt_pb2.PublishRequest(
            customer_id=working.customer_id,
            event_type=nt_pb2.EVENT_TYPE_LINK,
            title=title or DEFAULT_TITLE,
            data={"interaction_id": interaction_id},
            idempotency_key=f"link:{interaction_id}:{digest}",
            priority=nt_pb2.PRIORITY_HIGH,
        )
        published = await self._notifications.publish(
            request, LINK_TTL_SECONDS, link_url=url, application_id=working.application_id
        )
        if not published.duplicate:
            journal.link(
                working.application_id, working.customer_id, agent_id, published.notification_id
            )
        return nt_pb2.SendLinkResponse(
            notification_id=published.notification_id,
            device_count=published.device_count,
            duplicate=published.duplicate,
        )

    async def _count(self, agent_id: str, interaction_id: str, digest: str) -> None:
        """Adds the URL to the interaction's tally in one transaction (a URL already in
        it counts once), or refuses it when the tally is full."""
        key = f"{LINKS}{agent_id}/{interaction_id}"
        while True:
            entry = await self._store.get(key, nt_store.LinkTally)
            tally = entry.value if entry is not None else nt_store.LinkTally()
            if digest in tally.url_digests:
                return
            if len(tally.url_digests) >= self._per_interaction:
                raise ResourceExhausted(
                    f"at most {self._per_interaction} links per interaction",
                    reason="TOO_MANY_LINKS",
                    retry_after=3600.0,
                )
            tally.url_digests.append(digest)
            lease = await self._store.shared_lease(TALLY_SECONDS, window=3600.0)
            compare = (
                Compare.modified_at(key, entry.meta.mod_revision)
                if entry is not None
                else Compare.absent(key)
            )
            result = await self._store.txn([compare], [Op.put(key, tally, lease)])
            if result.succeeded:
                return
