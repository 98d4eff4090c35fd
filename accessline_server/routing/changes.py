"""What can move a call on, in the order it comes, for the replica holding its switch
stream: its queue entry's changes (a key watch), the agent's accept of the offer the
entry names (a key watch while it is offered, accepting.py), and the replica stopping."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from accessline.routing.storage.v1 import storage_pb2 as rt_store
from accessline_server.routing.accepting import Accepted, accept_of
from accessline_server.routing.offerfeed import OfferFeed
from accessline_server.runtime.errors import AccesslineError
from accessline_server.runtime.store import EventKind, Store

QI = rt_store.QueuedInteraction
# Put in a call's changes when the replica starts stopping.
STOPPING = object()
Change = tuple[QI | None, int] | Accepted | object


class CallChanges:
    """A call's changes from its entry's revision `revision` on, while open."""

    def __init__(
        self,
        store: Store,
        key: str,
        revision: int,
        stopping: asyncio.Event,
        feed: OfferFeed | None = None,
    ) -> None:
        self._store = store
        self._feed = feed
        self._queue: asyncio.Queue[Change] = asyncio.Queue()
        self._watcher = asyncio.ensure_future(self._watch(key, revision))
        self._stopper = asyncio.ensure_future(stopping.wait())
        self._stopper.add_done_callback(lambda _: self._queue.put_nowait(STOPPING))
        self._offer: tuple[str, asyncio.Task[Any]] | None = None

    async def _watch(self, key: str, revision: int) -> None:
        async for change in self._store.watch_key(key, revision + 1):
            if change.kind == EventKind.DELETE:
                self._queue.put_nowait((None, change.revision))
                return
            self._queue.put_nowait((change.decode(QI), change.revision))

    def follow_offer(self, offered: QI, revision: int) -> None:
        """Watches the offer the entry (at `revision`) names for the agent's accept, from
        that revision on, unless it is followed already."""
        offer = offered.offer
        if self._offer is not None:
            if self._offer[0] == offer.offer_id:
                return
            self._offer[1].cancel()

        async def accepted() -> None:
            with contextlib.suppress(AccesslineError):
                found = await accept_of(self._store, offer, revision, self._feed)
                if found is not None:
                    self._queue.put_nowait(found)

        self._offer = (offer.offer_id, asyncio.ensure_future(accepted()))

    async def next(self, timeout: float) -> Change | None:
        """The next change, or None when none came within `timeout` seconds."""
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    def lost(self) -> bool:
        """Whether the entry's watch ended (its error raised): nothing more will come."""
        if not self._watcher.done():
            return False
        self._watcher.result()
        return True

    async def close(self) -> None:
        self._stopper.cancel()
        tasks = [self._watcher, *([self._offer[1]] if self._offer is not None else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, AccesslineError):
                await task
