"""Sends the survey invitations Presence writes (surveys.py) whose application asks for
surveys: to the customer's devices of that application, in-app and by push
(EVENT_TYPE_SURVEY, with the journey's interaction id only), once whichever replica
sends it (the idempotency key is the interaction's); then, asked or not, records the
interaction closed in the customer's journey and deletes the invitation. An invitation
a replica dies holding is sent by another: it stays until sent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from accessline.journey.v1 import journey_pb2 as jn_pb2
from accessline.notification.storage.v1 import storage_pb2 as nt_store
from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline_server.callmatching.journey import records
from accessline_server.notification import journal
from accessline_server.notification.domain import Notifications
from accessline_server.notification.schedule import DueQueue, one_by_one
from accessline_server.notification.surveys import SURVEYS
from accessline_server.runtime.errors import AccesslineError
from accessline_server.runtime.store import Compare, Entry, EventKind, Op, Store

log = logging.getLogger("accessline.notification")

SURVEY_TTL_SECONDS = 7 * 24 * 3600.0


def invitation(found: nt_store.SurveyInvitation) -> nt_pb2.PublishRequest:
    request = nt_pb2.PublishRequest(
        customer_id=found.customer_id,
        application_id=found.application_id,
        event_type=nt_pb2.EVENT_TYPE_SURVEY,
        title="How did it go?",
        body="Tell us how your conversation with our advisor went.",
        data={"interaction_id": found.interaction_id},
        idempotency_key=f"survey:{found.application_id}:{found.interaction_id}",
        collapse_key=f"survey-{found.interaction_id}",
    )
    request.ttl.FromSeconds(int(SURVEY_TTL_SECONDS))
    return request


class SurveyWorker:
    """Sends each invitation once; one per Notification replica."""

    def __init__(self, store: Store, notifications: Notifications) -> None:
        self._store = store
        self._notifications = notifications
        self._queue = DueQueue(one_by_one(self._send), concurrency=8)
        self._task: asyncio.Task[None] | None = None
        # Invitations as the load or the watch showed them, not read again to send them
        # (the delete's compare tells if one changed meanwhile).
        self._seen: dict[str, Entry[nt_store.SurveyInvitation]] = {}

    def start(self) -> None:
        self._task = asyncio.create_task(
            self._queue.run("survey worker", self._load, self._follow), name="surveys"
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _load(self) -> int:
        rows, revision = await self._store.get_prefix(SURVEYS, nt_store.SurveyInvitation)
        for row in rows:
            self._seen[row.key] = row
            self._queue.schedule(row.key, time.time())
        return revision

    async def _follow(self, revision: int) -> None:
        async for event in self._store.watch_prefix(SURVEYS, revision + 1):
            if event.kind == EventKind.PUT:
                found = event.decode(nt_store.SurveyInvitation)
                self._seen[event.key] = Entry(event.key, found, event.meta)
                self._queue.schedule(event.key, time.time())

    async def _send(self, key: str) -> None:
        try:
            entry = self._seen.pop(key, None) or await self._store.get(
                key, nt_store.SurveyInvitation
            )
            if entry is None:
                return  # sent by another replica
            found = entry.value
            if found.ask:
                request = invitation(found)
                published = await self._notifications.publish(
                    request, SURVEY_TTL_SECONDS, application_id=found.application_id
                )
                if not published.duplicate:
                    journal.notification(request, published.notification_id)
            records.record(
                records.Record(
                    application_id=found.application_id,
                    interaction_id=found.interaction_id,
                    channel=jn_pb2.INTERACTION_CHANNEL_APP_VOICE,
                    status=jn_pb2.INTERACTION_STATUS_CLOSED,
                    customer_id=found.customer_id,
                    agent_id=found.agent_id,
                )
            )
            await self._store.txn(
                [Compare.modified_at(key, entry.meta.mod_revision)], [Op.delete(key)]
            )
        except AccesslineError as exc:
            log.warning("survey invitation not sent yet", extra={"fields": {"error": exc.message}})
            self._queue.schedule(key, time.time() + 1.0)
