"""What a delivery worker keeps of the items it must look at and when: keys by the time
they are due, handed to the worker's handler in batches once due, a bounded number of
batches at once."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from accessline_server.runtime.errors import AccesslineError
from accessline_server.runtime.store import WatchCompacted

log = logging.getLogger("accessline.notification")


Handler = Callable[[list[str]], Awaitable[None]]


def one_by_one(handle: Callable[[str], Awaitable[None]]) -> Handler:
    """A handler of batches that handles their keys one after the other."""

    async def each(keys: list[str]) -> None:
        for key in keys:
            await handle(key)

    return each


class DueQueue:
    """Keys due at a time; `dispatch` hands due keys to `handle` in batches of at most
    `batch` distinct keys, with at most `concurrency` batches handled at once. A batch is
    formed when a handler is free, of every key due by then: one key due alone goes
    alone at once; keys that fell due while the handlers were busy go together."""

    def __init__(self, handle: Handler, concurrency: int, batch: int = 1) -> None:
        self._handle = handle
        self._concurrency = concurrency
        self._batch = batch
        self._running = 0
        self._due: list[tuple[float, str]] = []
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        # Keys taken from the schedule, waiting for a free handler (in the order they
        # fell due): when each was due.
        self._waiting: dict[str, float] = {}
        self._ready: deque[str] = deque()

    def schedule(self, key: str, at: float) -> None:
        heapq.heappush(self._due, (at, key))
        self._wake.set()

    def lag(self, now: float) -> float:
        """Seconds the most overdue key has been waiting."""
        due = list(self._waiting.values())
        if self._due:
            due.append(self._due[0][0])
        return max(0.0, now - min(due)) if due else 0.0

    async def run(
        self,
        name: str,
        load: Callable[[], Awaitable[int]],
        follow: Callable[[int], Coroutine[Any, Any, None]],
    ) -> None:
        """A worker's life: `load` schedules what is there (and answers the revision it
        read at), `follow` watches from the next one while due keys are handed out; after
        an etcd failure (or a watch too far behind), all over again a second later."""
        while True:
            try:
                revision = await load()
                watcher = asyncio.create_task(follow(revision))
                try:
                    await self.dispatch()
                finally:
                    watcher.cancel()
            except (AccesslineError, WatchCompacted) as exc:
                log.warning(f"{name} restarting", extra={"fields": {"error": str(exc)}})
                await asyncio.sleep(1.0)

    async def dispatch(self) -> None:
        """Hands out due keys until cancelled."""
        while True:
            now = time.time()
            while self._due and self._due[0][0] <= now:
                at, key = heapq.heappop(self._due)
                if key not in self._waiting:
                    self._ready.append(key)
                self._waiting[key] = min(at, self._waiting.get(key, at))
            while self._ready and self._running < self._concurrency:
                keys = [self._ready.popleft() for _ in range(min(self._batch, len(self._ready)))]
                for key in keys:
                    del self._waiting[key]
                self._running += 1
                task = asyncio.create_task(self._run(keys))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            self._wake.clear()
            timeout = min(1.0, self._due[0][0] - now) if self._due else 1.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.01, timeout))

    async def _run(self, keys: list[str]) -> None:
        try:
            await self._handle(keys)
        finally:
            self._running -= 1
            self._wake.set()  # a handler is free: hand out what fell due meanwhile

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
