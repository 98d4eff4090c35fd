"""Key watches multiplexed on one etcd Watch stream: what a process follows key by key
(a waiting call's queue entry, an offer until it is answered) costs a create and a cancel
message on a stream already open instead of a gRPC stream of its own, opened and torn
down each time.

Each watch keeps the semantics of a watch of its own: every change of its key from its
start revision on, in order; after the stream breaks (a member failed) every watch
resumes on a new stream from the revision after the last event it saw; a watch whose
revisions etcd compacted away raises WatchCompacted. Watch ids are chosen here (etcd
takes a client's `watch_id` since 3.4), so a create needs no answer to be matched."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aetcd.rpc as etcdrpc
import grpc

from accessline_server.runtime.backoff import Backoff
from accessline_server.runtime.etcdlink import REQUIRE_LEADER, Members, member_fault
from accessline_server.runtime.kv import EventKind, WatchEvent, key_meta

log = logging.getLogger("accessline.store")


class WatchCompacted(Exception):
    """The watch cannot resume: etcd compacted the revisions it would need. The
    watcher must reload its state from a fresh read and watch again from there."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"etcd compacted history up to revision {compact_revision}")
        self.compact_revision = compact_revision


@dataclass
class _Watch:
    key: bytes
    next_revision: int
    queue: asyncio.Queue[WatchEvent | WatchCompacted] = field(default_factory=asyncio.Queue)
    # The stream (its generation) the watch was created on; 0: on none yet.
    created_on: int = 0
    ended: bool = False  # etcd ended it (compacted): never created again


class WatchMux:
    """The key watches of one store on one Watch stream to the current member."""

    def __init__(self, members: Members, rel: Callable[[bytes], str], max_backoff: float) -> None:
        self._members = members
        self._rel = rel
        self._max_backoff = max_backoff
        self._watches: dict[int, _Watch] = {}
        self._next_id = 1
        self._call: Any = None
        self._generation = 0
        self._write_lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def watch(self, key: bytes, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Every change of `key` (absolute) from `start_revision` on."""
        watch_id, self._next_id = self._next_id, self._next_id + 1
        watch = _Watch(key, start_revision)
        self._watches[watch_id] = watch
        if self._reader is None or self._reader.done():
            self._reader = asyncio.ensure_future(self._read())
        else:
            await self._create(watch_id, watch)
        try:
            while True:
                item = await watch.queue.get()
                if isinstance(item, WatchCompacted):
                    raise item
                yield item
        finally:
            del self._watches[watch_id]
            if watch.created_on == self._generation and self._call is not None:
                self._send_later(
                    etcdrpc.WatchRequest(
                        cancel_request=etcdrpc.WatchCancelRequest(watch_id=watch_id)
                    )
                )

    async def close(self) -> None:
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def _create(self, watch_id: int, watch: _Watch) -> None:
        """Creates the watch on the current stream, once per stream."""
        if self._call is None or watch.ended or watch.created_on == self._generation:
            return
        watch.created_on = self._generation
        request = etcdrpc.WatchRequest(
            create_request=etcdrpc.WatchCreateRequest(
                key=watch.key,
                start_revision=watch.next_revision,
                prev_kv=True,
                progress_notify=True,
                watch_id=watch_id,
            )
        )
        # Shielded: a watcher cancelled while its create is written (a call hung up) must
        # not cancel the write, which would cancel the stream of every watch on it.
        await asyncio.shield(self._send_later(request))

    def _send_later(self, request: Any) -> asyncio.Task[None]:
        """Writes `request` on the current stream in a task of its own. A write that
        failed needs nothing more: the stream broke, and the reader opens a new one and
        creates every watch on it again."""
        call = self._call

        async def send() -> None:
            try:
                async with self._write_lock:
                    await call.write(request)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass
            except asyncio.CancelledError:
                # The stream was cancelled under the write (it broke and was closed);
                # only a cancel of this task itself is one to pass on.
                if _cancelling():
                    raise

        task = asyncio.ensure_future(send())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _read(self) -> None:
        """Keeps a stream open while watches exist, each created on it, and hands them
        their events; a broken stream is opened again on the current member."""
        backoff = Backoff(0.05, self._max_backoff)
        while not self._closed and self._watches:
            member = self._members.current
            # The request side is never closed (that would end etcd's watch stream).
            call = member.watch.Watch(metadata=REQUIRE_LEADER)
            self._call, self._generation = call, self._generation + 1
            try:
                for watch_id, watch in list(self._watches.items()):
                    if watch_id in self._watches:  # not closed while the others were made
                        await self._create(watch_id, watch)
                async for reply in call:
                    backoff.reset()
                    if self._answer(reply, member):
                        break
            except grpc.aio.AioRpcError as exc:
                log.warning("etcd watch stream broke (%s); resuming", exc.code().name)
                if member_fault(exc):
                    self._members.failed(member, exc)
            except asyncio.InvalidStateError:
                log.warning("etcd watch stream ended before it started; resuming")
            except asyncio.CancelledError:
                # The stream was cancelled, not this reader: resume on a new one.
                if _cancelling():
                    raise
                log.warning("etcd watch stream was cancelled; resuming")
            finally:
                self._call = None
                call.cancel()
            if self._watches:
                await asyncio.sleep(backoff.next())

    def _answer(self, reply: Any, member: Any) -> bool:
        """Hands a reply to its watch; True when the stream must be opened again."""
        watch = self._watches.get(int(reply.watch_id))
        if watch is None:
            return False  # cancelled meanwhile
        if reply.compact_revision:
            watch.queue.put_nowait(WatchCompacted(int(reply.compact_revision)))
            watch.ended = True
            return False
        if reply.canceled:
            log.warning("etcd cancelled a watch: %s", reply.cancel_reason)
            if "leader" in reply.cancel_reason:
                member.failed_at = time.monotonic()
            return True
        for event in reply.events:
            kv = event.kv
            watch.queue.put_nowait(
                WatchEvent(
                    EventKind.DELETE if event.type == etcdrpc.Event.DELETE else EventKind.PUT,
                    self._rel(kv.key),
                    kv.value,
                    key_meta(kv),
                    event.prev_kv.value if event.HasField("prev_kv") else None,
                )
            )
            watch.next_revision = int(kv.mod_revision) + 1
        if not reply.events and not reply.created and reply.header.revision:
            # A progress notification: everything up to this revision was sent.
            watch.next_revision = max(watch.next_revision, int(reply.header.revision) + 1)
        return False


def _cancelling() -> bool:
    """Whether the running task is being cancelled (rather than merely seeing a
    CancelledError raised by a gRPC call that was cancelled under it)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
