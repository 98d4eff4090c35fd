"""A watch-synced copy of the keys under one prefix, for a service that would otherwise
read one of them on every request: loaded once, then kept in step by one watch (reloaded
when etcd compacted the history it needed). It may lag etcd by the watch's delivery
time, so its user writes with a compare on what it took from it (the transaction is the
authority) and reads etcd itself while the copy is not loaded."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Generic, TypeVar

from google.protobuf.message import Message

from accessline_server.runtime.backoff import Backoff
from accessline_server.runtime.errors import AccesslineError
from accessline_server.runtime.store import Entry, EventKind, Store, WatchCompacted

log = logging.getLogger("accessline.runtime")

M = TypeVar("M", bound=Message)


class PrefixView(Generic[M]):
    """The keys under `prefix`, decoded as `message_type`, while `start`ed."""

    def __init__(self, store: Store, prefix: str, message_type: type[M]) -> None:
        self._store = store
        self._prefix = prefix
        self._type = message_type
        self._entries: dict[str, Entry[M]] = {}
        self._loaded = False
        self._task: asyncio.Task[None] | None = None

    @property
    def loaded(self) -> bool:
        """Whether `get` answers (a load done, its watch running)."""
        return self._loaded

    def get(self, key: str) -> Entry[M] | None:
        """The key as the copy has it (None: absent); only meaningful while `loaded`."""
        return self._entries.get(key)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._loaded = False

    async def _run(self) -> None:
        backoff = Backoff(0.2, 5.0)
        while True:
            try:
                await self._follow()
            except WatchCompacted:
                log.warning("copy of %s fell behind etcd's history; reloading", self._prefix)
            except AccesslineError as exc:
                log.warning("copy of %s not in step: %s", self._prefix, exc.message)
                await asyncio.sleep(backoff.next())

    async def _follow(self) -> None:
        """Loads the keys and follows their changes; the copy is `loaded` only while
        this runs past its load."""
        entries, revision = await self._store.get_prefix(self._prefix, self._type)
        self._entries = {e.key: e for e in entries}
        self._loaded = True
        try:
            async for event in self._store.watch_prefix(self._prefix, revision + 1):
                if event.kind == EventKind.DELETE:
                    self._entries.pop(event.key, None)
                else:
                    value = event.decode(self._type)
                    self._entries[event.key] = Entry(event.key, value, event.meta)
        finally:
            self._loaded = False
