"""Handoffs that expire: a session no call matched (and no one cancelled) by its expiry.
Every CallMatching replica follows the waiting sessions (a watch: created, and ended by
a match or a cancel, which delete them) and, at a session's expiry, keeps its outcome
(EXPIRED, so GetSession says so for the retention period) and writes the
`handoff.expired` webhook event, in one transaction that holds only while the session
has no outcome: told once whichever replicas try, never for a session that matched or
was cancelled (those write their outcome in the transaction that ends them).

An expiry while no CallMatching replica runs is told when one starts again, if the
session is still in etcd then (it stays for its number's quarantine after its expiry)."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time

from accessline.callmatching.storage.v1 import storage_pb2 as cm_store
from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline_server.callmatching import keys
from accessline_server.callmatching.journey.reads import Journey
from accessline_server.notification import events
from accessline_server.runtime.clock import seconds, timestamp
from accessline_server.runtime.errors import AccesslineError
from accessline_server.runtime.store import Compare, EventKind, Op, Store, WatchCompacted

log = logging.getLogger("accessline.callmatching")


class ExpiryWatcher:
    def __init__(self, store: Store, retention: float, journey: Journey | None = None) -> None:
        self._journey = journey
        self._store = store
        self._retention = retention
        self._task: asyncio.Task[None] | None = None
        # Sessions waiting, by id, and their expiries in time order (stale entries of
        # ended sessions are skipped when they come up).
        self._waiting: dict[str, cm_store.StoredSession] = {}
        self._due: list[tuple[float, str]] = []
        self._changed = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="handoff-expiry")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _follow(self, session: cm_store.StoredSession) -> None:
        self._waiting[session.session_id] = session
        heapq.heappush(self._due, (seconds(session.expires_at), session.session_id))
        self._changed.set()

    async def _run(self) -> None:
        timer = asyncio.create_task(self._expire())
        try:
            while True:
                try:
                    await self._watch()
                except WatchCompacted:
                    log.warning("handoff expiry watch fell behind a compaction; reading again")
                except AccesslineError as exc:
                    log.warning("handoff expiry watch: %s", exc.message)
                    await asyncio.sleep(1.0)
        finally:
            timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timer

    async def _watch(self) -> None:
        found, revision = await self._store.get_prefix(keys.SESSIONS, cm_store.StoredSession)
        self._waiting.clear()
        self._due.clear()
        for entry in found:
            self._follow(entry.value)
        async for event in self._store.watch_prefix(keys.SESSIONS, revision + 1):
            if event.kind == EventKind.DELETE:
                self._waiting.pop(event.key[len(keys.SESSIONS) :], None)
            else:
                self._follow(event.decode(cm_store.StoredSession))

    async def _expire(self) -> None:
        """At each waiting session's expiry, its outcome and its event."""
        while True:
            self._changed.clear()
            now = time.time()
            while self._due and self._due[0][0] <= now:
                _, session_id = heapq.heappop(self._due)
                session = self._waiting.pop(session_id, None)
                if session is None or seconds(session.expires_at) > now:
                    if session is not None:
                        self._waiting[session_id] = session  # its expiry was moved on
                    continue
                try:
                    await self.expired(session)
                except AccesslineError as exc:
                    # etcd could not take it: again in a second, until it does.
                    log.warning("session %s expired, not told yet: %s", session_id, exc.message)
                    self._waiting[session_id] = session
                    heapq.heappush(self._due, (time.time() + 1.0, session_id))
            wait = self._due[0][0] - time.time() if self._due else 3600.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(0.05, wait))

    async def expired(self, session: cm_store.StoredSession) -> bool:
        """Keeps the session's EXPIRED outcome and tells its application, unless it has
        an outcome already; True when this call did."""
        now = time.time()
        outcome = cm_store.StoredOutcome(
            session_id=session.session_id,
            state=cm_pb2.SESSION_STATE_EXPIRED,
            ended_at=timestamp(now),
            application_id=session.application_id,
        )
        retention = await self._store.shared_lease(self._retention, window=10.0)
        told = await events.event_ops(
            self._store,
            events.HANDOFF_EXPIRED,
            session.application_id,
            {"session_id": session.session_id, "customer_id": session.customer_id},
            now,
        )
        key = keys.outcome(session.session_id)
        result = await self._store.txn(
            [Compare.absent(key)], [Op.put(key, outcome, retention), *told]
        )
        if result.succeeded and self._journey is not None:
            self._journey.record_session_end(
                session.application_id, session.session_id, "EXPIRED", now
            )
        return result.succeeded
