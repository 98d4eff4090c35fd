"""Work that runs to its end even when the call that started it is cancelled (a client
giving up, a deadline passing, a stream dropped), so that what it writes is never left
half done: a write whose caller is cancelled may still be applied by etcd, and what
follows it (an offer withdrawn, a customer told, the rest of a fan-out) must be too."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


class Kept:
    """The tasks of one owner's kept work, held until they end (a task nobody holds may be
    collected before it ends)."""

    def __init__(self) -> None:
        self._running: set[asyncio.Future[Any]] = set()

    def start(self, work: Awaitable[T]) -> asyncio.Future[T]:
        """`work` as a task of its own, held until it ends."""
        task = asyncio.ensure_future(work)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return task

    async def run(self, work: Awaitable[T]) -> T:
        """`work`'s result; cancelling the caller leaves `work` running to its end."""
        return await asyncio.shield(self.start(work))
