"""The answers to offers (`pr/offers/`) from one etcd watch per Routing replica, handed
to whatever waits on one: the replica holding a call's switch stream (for the accept,
accepting.py) and the leader settling its offers (settle.py).

A key watch created for one offer starts at the offer's revision, already past when it
is created under load, and etcd brings a watch that starts in the past up to date only
on its next resynchronisation (every 100 ms): an answer could wait that long. The feed
watches from its own start, so its answers come as etcd commits them. An answer that
came before anybody asked is kept for `KEEP_SECONDS`; a waiter whose offer was written
before the feed started (or before the oldest answer dropped) is told to watch the key
itself (`NOT_COVERED`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict

from accessline.presence.storage.v1 import storage_pb2 as pr_store
from accessline_server.presence import offers as pr_offers
from accessline_server.runtime.backoff import Backoff
from accessline_server.runtime.errors import AccesslineError
from accessline_server.runtime.store import EventKind, Store, WatchCompacted, WatchEvent

log = logging.getLogger("accessline.routing")

# How long an answer nobody asked for yet is kept, and how many at most.
KEEP_SECONDS = 120.0
MAX_KEPT = 50_000


class _NotCovered:
    pass


NOT_COVERED = _NotCovered()
Answer = pr_store.StoredOffer | None


class OfferFeed:
    """Offers' answers (the offer as it ended: accepted, declined, withdrawn; None when
    it vanished), while `start`ed."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._kept: OrderedDict[str, tuple[float, int, Answer]] = OrderedDict()
        self._waiters: dict[str, list[asyncio.Future[Answer | _NotCovered]]] = {}
        # Answers after this revision are all seen (0: not following).
        self._from = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def following(self) -> bool:
        """Whether the feed follows etcd now."""
        return self._from > 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def answer(self, key: str, since: int, timeout: float) -> Answer | _NotCovered:
        """The answer to the offer at `key` (written at revision `since`), waiting up to
        `timeout` seconds; NOT_COVERED when the feed cannot tell (watch the key)."""
        if not self._from or since < self._from:
            return NOT_COVERED
        kept = self._kept.get(key)
        if kept is not None:
            return kept[2]
        waiter: asyncio.Future[Answer | _NotCovered] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, []).append(waiter)
        try:
            return await asyncio.wait_for(waiter, max(0.0, timeout))
        except TimeoutError:
            return NOT_COVERED
        finally:
            waiting = self._waiters.get(key, [])
            if waiter in waiting:
                waiting.remove(waiter)
            if not waiting:
                self._waiters.pop(key, None)

    async def _run(self) -> None:
        backoff = Backoff(0.2, 5.0)
        while True:
            try:
                start = await self._store.revision()
                self._from = start
                async for event in self._store.watch_prefix(pr_offers.OFFERS_ROOT, start + 1):
                    self._apply(event)
            except (WatchCompacted, AccesslineError) as exc:
                log.warning("offers' answers not followed: %s", exc)
                self._from = 0
                self._drop_waiters()
                await asyncio.sleep(backoff.next())

    def _apply(self, event: WatchEvent) -> None:
        if event.key in self._kept:
            return  # answered already: the first answer is the answer
        if event.kind == EventKind.DELETE:
            answer: Answer = None
        else:
            answer = event.decode(pr_store.StoredOffer)
            if answer.state == pr_store.OFFER_STATE_OPEN:
                return
        now = time.monotonic()
        self._kept[event.key] = (now, event.revision, answer)
        self._kept.move_to_end(event.key)
        while self._kept:
            seen, revision, _ = next(iter(self._kept.values()))
            if now - seen < KEEP_SECONDS and len(self._kept) <= MAX_KEPT:
                break
            self._kept.popitem(last=False)
            # Offers written before a dropped answer can no longer be told.
            self._from = max(self._from, revision)
        for waiter in self._waiters.pop(event.key, []):
            if not waiter.done():
                waiter.set_result(answer)

    def _drop_waiters(self) -> None:
        """Waiters whose answers may now be missed: each watches its key itself."""
        for waiting in self._waiters.values():
            for waiter in waiting:
                if not waiter.done():
                    waiter.set_result(NOT_COVERED)
        self._waiters.clear()
