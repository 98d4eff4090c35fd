"""Group commit: the transactions one process asks of etcd at the same time are sent as
one etcd transaction holding each of them as a nested transaction, so that N concurrent
requests cost one round trip instead of N.

Each nested transaction keeps its own compares and branches, but etcd evaluates every
compare of the request before it applies any operation, and applies the operations in
order. Requests are therefore batched only when none writes a key another one reads,
compares or writes (keys and prefix ranges compared as intervals): then the batch has
the same outcome as the requests sent one after the other, in any order, and each
request's reads see the state at the batch's revision. A request that conflicts with
one already in the batch waits for the next one.

A request is never delayed while fewer than `max_in_flight` requests or batches are
under way: under light load each goes alone, as it would without batching; batches form
only behind those in flight. A batch etcd refuses as a whole (one request's lease gone, a
limit) is sent again one request at a time, so a request gets the answer it would have
got alone."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aetcd.rpc as etcdrpc

from accessline_server.runtime.etcdlink import StoreRejected

# (start, end) of a key or a range of keys, as etcd takes them: end b"" is the key `start`
# alone, end b"\0" every key from `start` on.
Interval = tuple[bytes, bytes]
Send = Callable[[Any, bool], Awaitable[Any]]

MAX_BATCH = 32  # requests in one etcd transaction
MAX_OPS = 512  # operations and compares of a batch, in all
MAX_BYTES = 512 * 1024  # of a batch's request (etcd refuses requests over 1.5 MiB)


def _before_end(key: bytes, interval: Interval) -> bool:
    """Whether `key` comes before the end of `interval` (exclusive)."""
    start, end = interval
    if end == b"\0":
        return True
    return key < (end or start + b"\0")


def overlaps(a: Sequence[Interval], b: Sequence[Interval]) -> bool:
    """Whether a key of `a` lies in a range of `b` (or the other way round)."""
    return any(_before_end(x[0], y) and _before_end(y[0], x) for x in a for y in b)


@dataclass
class Request:
    """One transaction asked for: the etcd request and, worked out only when it is
    batched, the keys it reads and writes."""

    message: Any
    read_only: bool
    future: asyncio.Future[tuple[Any, int]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @functools.cached_property
    def _described(self) -> tuple[list[Interval], list[Interval], int]:
        return describe(self.message)

    @property
    def reads(self) -> list[Interval]:
        return self._described[0]

    @property
    def writes(self) -> list[Interval]:
        return self._described[1]

    @property
    def ops(self) -> int:
        return self._described[2]

    @functools.cached_property
    def size(self) -> int:
        return int(self.message.ByteSize())


class Footprint:
    """The keys a batch's requests read and write, single keys in sets (most are), so
    that a request's conflict with the batch is found in time linear in its own keys."""

    def __init__(self) -> None:
        self.read_keys: set[bytes] = set()
        self.write_keys: set[bytes] = set()
        self.read_ranges: list[Interval] = []
        self.write_ranges: list[Interval] = []

    def add(self, reads: Sequence[Interval], writes: Sequence[Interval]) -> None:
        """Adds a request's keys (`Request.reads`, `Request.writes`) to the batch's."""
        for keys, ranges, intervals in (
            (self.read_keys, self.read_ranges, reads),
            (self.write_keys, self.write_ranges, writes),
        ):
            for start, end in intervals:
                if end:
                    ranges.append((start, end))
                else:
                    keys.add(start)

    def conflicts(self, reads: Sequence[Interval], writes: Sequence[Interval]) -> bool:
        """Whether a request writes a key the batch reads or writes, or reads a key it
        writes."""
        return _hits(writes, self.write_keys | self.read_keys) or (
            _hits(reads, self.write_keys)
            or overlaps(writes, self.write_ranges + self.read_ranges)
            or overlaps(reads, self.write_ranges)
        )


def _hits(intervals: Sequence[Interval], keys: set[bytes]) -> bool:
    """Whether a key of `keys` lies in one of `intervals`."""
    for start, end in intervals:
        if end:
            if any(_before_end(key, (start, end)) and start <= key for key in keys):
                return True
        elif start in keys:
            return True
    return False


def describe(message: Any) -> tuple[list[Interval], list[Interval], int]:
    """The keys a TxnRequest reads (compares, ranges) and writes (puts, deletes), and its
    number of compares and operations."""
    reads: list[Interval] = [(c.key, b"") for c in message.compare]
    writes: list[Interval] = []
    ops = list(message.success) + list(message.failure)
    for op in ops:
        kind = op.WhichOneof("request")
        if kind == "request_range":
            reads.append((op.request_range.key, op.request_range.range_end))
        elif kind == "request_put":
            writes.append((op.request_put.key, b""))
        elif kind == "request_delete_range":
            writes.append((op.request_delete_range.key, op.request_delete_range.range_end))
        else:  # a nested transaction of the caller's: never batched with another
            writes.append((b"", b"\0"))
    return reads, writes, len(message.compare) + len(ops)


class GroupCommit:
    """Batches one process's concurrent transactions. `send(request, read_only)` makes
    one etcd Txn call (the store's, which knows the members and their faults)."""

    def __init__(self, send: Send, max_in_flight: int = 2) -> None:
        self._send = send
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        self._pending: list[Request] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent = 0  # etcd calls made
        self.asked = 0  # transactions asked for

    async def txn(self, message: Any, read_only: bool) -> tuple[Any, int]:
        """The TxnResponse of `message` as if sent alone, and the store's revision."""
        request = Request(message, read_only)
        self.asked += 1
        self._pending.append(request)
        if self._in_flight < self._max_in_flight:
            self._launch()
        return await request.future

    def _take(self) -> list[Request]:
        """The next batch: pending requests in order, skipping those that conflict with
        one taken or are not of its kind (read-only or not; they stay for the next
        batch), within the batch's limits."""
        batch: list[Request] = []
        left: list[Request] = []
        footprint = Footprint()
        ops = size = 0
        for request in self._pending:
            if request.future.done():
                continue  # its caller gave up before it was sent: never sent
            if len(self._pending) == 1:
                batch.append(request)  # alone: nothing to work out
                break
            fits = (
                len(batch) < MAX_BATCH
                and ops + request.ops <= MAX_OPS
                and size + request.size <= MAX_BYTES
            )
            # Reads go with reads only: a read follows a failing member to the next one,
            # a batch holding a write may not.
            alike = not batch or batch[0].read_only == request.read_only
            if batch and (
                not fits or not alike or footprint.conflicts(request.reads, request.writes)
            ):
                left.append(request)
                continue
            batch.append(request)
            footprint.add(request.reads, request.writes)
            ops += request.ops
            size += request.size
        self._pending = left
        return batch

    def _launch(self) -> None:
        batch = self._take()
        if not batch:
            return
        self._in_flight += 1
        task = asyncio.ensure_future(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[Request]) -> None:
        try:
            if len(batch) == 1:
                await self._alone(batch[0])
            else:
                await self._together(batch)
        finally:
            self._in_flight -= 1
            while self._pending and self._in_flight < self._max_in_flight:
                self._launch()

    async def _alone(self, request: Request) -> None:
        self.sent += 1
        try:
            reply = await self._send(request.message, request.read_only)
        except BaseException as exc:  # noqa: BLE001 - the caller's to handle, as sent alone
            _fail(request, exc)
            return
        _answer(request, reply, int(reply.header.revision))

    async def _together(self, batch: list[Request]) -> None:
        outer = etcdrpc.TxnRequest(
            success=[etcdrpc.RequestOp(request_txn=r.message) for r in batch]
        )
        self.sent += 1
        try:
            reply = await self._send(outer, all(r.read_only for r in batch))
        except StoreRejected:
            # Refused as a whole (a lease of one of them gone, a limit of this etcd's):
            # each on its own, to get the answer it would have got alone.
            await asyncio.gather(*(self._alone(r) for r in batch))
            return
        except BaseException as exc:  # noqa: BLE001 - each caller gets what it would have
            for request in batch:
                _fail(request, exc)
            return
        revision = int(reply.header.revision)
        for request, response in zip(batch, reply.responses, strict=True):
            _answer(request, response.response_txn, revision)


def _answer(request: Request, reply: Any, revision: int) -> None:
    if not request.future.done():
        request.future.set_result((reply, revision))


def _fail(request: Request, exc: BaseException) -> None:
    if request.future.done():
        return
    if isinstance(exc, asyncio.CancelledError):
        request.future.cancel()
    else:
        request.future.set_exception(exc)
