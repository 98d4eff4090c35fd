"""The etcd store: the only module that talks to etcd (with the etcd API stubs that
aetcd ships, on channels of its own).

Keys are namespaced under a configurable prefix and values are serialized protobuf
messages. It offers what the services need: create-if-absent under a lease
(compare-and-swap), multi-key transactions with fencing compares, leases kept alive by
one shared stream that notices loss, prefix reads, and watches that resume from the last
seen revision after a reconnect and report compaction instead of losing events. etcd
failures surface as Unavailable / DeadlineExceeded domain errors with a retry delay.

etcd is a cluster in production: the store is given every member's endpoint, talks to one
at a time, and moves to the next healthy one when a member fails, is unreachable or has
lost its leader (every request asks for a member with a leader, so a member cut off from
the quorum refuses at once instead of serving stale reads or holding streams open).
Reads are retried on the next member; writes only when etcd cannot have applied them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, NamedTuple, TypeVar

import aetcd.rpc as etcdrpc
import grpc
from google.protobuf.message import DecodeError, Message

from services.runtime.errors import AccesslineError, DeadlineExceeded, Unavailable

log = logging.getLogger("accessline.store")

M = TypeVar("M", bound=Message)
T = TypeVar("T")

# How long callers are told to wait before retrying after etcd failed.
RETRY_AFTER_SECONDS = 1.0
# Every request asks for a member that has a leader: one that lost it refuses with
# "etcdserver: no leader" before doing anything, and cancels the streams it holds.
REQUIRE_LEADER = (("hasleader", "true"),)
# Failures after which etcd cannot have applied a request (safe to send it elsewhere).
_NOT_APPLIED = ("no leader", "failed to connect", "connection refused", "not connected")
# A member that failed is avoided for this long when another one is available.
FAILED_MEMBER_AVOID_SECONDS = 5.0


class StoreUnavailable(Unavailable):
    """etcd could not be reached."""

    default_reason = "ETCD_UNAVAILABLE"


class StoreTimeout(DeadlineExceeded):
    """etcd did not answer within the store's deadline."""

    default_reason = "ETCD_TIMEOUT"


class StoreRejected(AccesslineError):
    """etcd refused the request (too large, bad lease...): a bug or a limit, not an outage."""

    code = grpc.StatusCode.INTERNAL
    default_reason = "ETCD_REJECTED"


class CorruptValue(AccesslineError):
    """A stored value does not parse as the expected message."""

    code = grpc.StatusCode.DATA_LOSS
    default_reason = "CORRUPT_VALUE"


class WatchCompacted(Exception):
    """The watch cannot resume: etcd compacted the revisions it would need. The
    watcher must reload its state from a fresh read and watch again from there."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"etcd compacted history up to revision {compact_revision}")
        self.compact_revision = compact_revision


def _timed_out(exc: grpc.aio.AioRpcError) -> bool:
    # etcd reports its own side of a deadline as an error text, not always as the code.
    return exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED or "deadline exceeded" in (
        exc.details() or ""
    )


def _translate(exc: grpc.aio.AioRpcError) -> AccesslineError:
    code = exc.code()
    detail = exc.details() or code.name
    if code == grpc.StatusCode.UNAVAILABLE:
        return StoreUnavailable(f"etcd is unavailable: {detail}", retry_after=RETRY_AFTER_SECONDS)
    if _timed_out(exc):
        return StoreTimeout("etcd did not answer in time", retry_after=RETRY_AFTER_SECONDS)
    if code == grpc.StatusCode.CANCELLED:
        return StoreUnavailable("etcd request was cancelled", retry_after=RETRY_AFTER_SECONDS)
    return StoreRejected(f"etcd refused the request: {detail}")


@dataclass(frozen=True)
class KeyMeta:
    """etcd's bookkeeping of a key. `create_revision` is the fencing token of
    anything held under a lease."""

    create_revision: int
    mod_revision: int
    version: int
    lease: int


class RawKV(NamedTuple):
    """A key as a transaction's `get` op found it, not decoded (`decode` does that)."""

    key: str
    value: bytes
    meta: KeyMeta


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A decoded key and value. `key` is relative to the store's prefix."""

    key: str
    value: T
    meta: KeyMeta


@dataclass(frozen=True)
class Compare:
    """One condition of a transaction."""

    key: str
    target: str
    op: str
    operand: int | bytes

    @staticmethod
    def absent(key: str) -> Compare:
        """The key does not exist."""
        return Compare(key, "create", "==", 0)

    @staticmethod
    def exists(key: str) -> Compare:
        """The key exists."""
        return Compare(key, "create", ">", 0)

    @staticmethod
    def created_at(key: str, revision: int) -> Compare:
        """The key still exists with this create revision (a fencing token)."""
        return Compare(key, "create", "==", revision)

    @staticmethod
    def modified_at(key: str, revision: int) -> Compare:
        """The key was last modified at this revision (optimistic concurrency)."""
        return Compare(key, "mod", "==", revision)

    @staticmethod
    def written_fewer_than(key: str, times: int) -> Compare:
        """The key was written fewer than `times` times since it was created (its
        version; an absent key has version 0): a counter whose check and count are one
        transaction, with no conflict between concurrent counts below the limit."""
        return Compare(key, "version", "<", times)


@dataclass(frozen=True)
class Op:
    """One operation of a transaction."""

    kind: str
    key: str
    value: bytes = b""
    lease: int = 0
    prefix: bool = False
    keep_value: bool = False

    @staticmethod
    def put(key: str, value: Message | bytes, lease: int = 0) -> Op:
        data = value if isinstance(value, bytes) else value.SerializeToString()
        return Op("put", key, data, lease)

    @staticmethod
    def relet(key: str, lease: int) -> Op:
        """Moves an existing key to another lease, its value unchanged (the transaction
        fails with an error if the key does not exist: compare it first)."""
        return Op("put", key, b"", lease, keep_value=True)

    @staticmethod
    def delete(key: str) -> Op:
        return Op("delete", key)

    @staticmethod
    def delete_prefix(prefix: str) -> Op:
        return Op("delete", prefix, prefix=True)

    @staticmethod
    def get(key: str) -> Op:
        return Op("get", key)

    @staticmethod
    def get_prefix(prefix: str) -> Op:
        return Op("get", prefix, prefix=True)


@dataclass(frozen=True)
class TxnResult:
    """Whether the compares held, the store revision after the transaction, and for
    each `get` op the raw keys it found."""

    succeeded: bool
    revision: int
    gets: list[list[RawKV]]
    deleted: list[int]

    def first(self, index: int = 0) -> RawKV | None:
        """The first key the `index`-th get op found (in the ops that ran), or None."""
        if index >= len(self.gets) or not self.gets[index]:
            return None
        return self.gets[index][0]


class EventKind(Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True)
class WatchEvent:
    """One change seen by a watch. `value` is empty for a delete; `prev_value` is the
    value before the change when etcd still had it."""

    kind: EventKind
    key: str
    value: bytes
    meta: KeyMeta
    prev_value: bytes | None

    @property
    def revision(self) -> int:
        return self.meta.mod_revision

    def decode(self, message_type: type[M]) -> M:
        return _decode(message_type, self.key, self.value)

    def decode_prev(self, message_type: type[M]) -> M | None:
        if self.prev_value is None:
            return None
        return _decode(message_type, self.key, self.prev_value)


def _decode(message_type: type[M], key: str, data: bytes) -> M:
    message = message_type()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise CorruptValue(f"value of {key} is not a {message_type.__name__}") from exc
    return message


def _meta(kv: Any) -> KeyMeta:
    return KeyMeta(kv.create_revision, kv.mod_revision, kv.version, kv.lease)


def prefix_range_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key that starts with `prefix`."""
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


class KeptLease:
    """A lease the store keeps alive until stopped. `lost` is set when etcd says the
    lease is gone or no refresh succeeded for a whole TTL: whatever was held under it
    must be considered lost."""

    def __init__(self, lease_id: int, ttl: int) -> None:
        self.id = lease_id
        self.ttl = ttl
        self.lost = asyncio.Event()
        self.refresh_count = 0
        self._last_ok = time.monotonic()
        self._next_due = self._last_ok + self.refresh_interval
        self._refreshed = asyncio.Condition()

    @property
    def refresh_interval(self) -> float:
        return max(0.2, self.ttl / 3)

    async def wait_refreshes(self, count: int) -> None:
        """Waits until the lease has been refreshed `count` times in all."""
        async with self._refreshed:
            await self._refreshed.wait_for(
                lambda: self.refresh_count >= count or self.lost.is_set()
            )

    async def _mark_refreshed(self, ttl: int) -> None:
        self._last_ok = time.monotonic()
        self.ttl = ttl
        self._next_due = self._last_ok + self.refresh_interval
        async with self._refreshed:
            self.refresh_count += 1
            self._refreshed.notify_all()

    async def _mark_lost(self) -> None:
        self.lost.set()
        async with self._refreshed:
            self._refreshed.notify_all()


class _LeaseKeeper:
    """One LeaseKeepAlive stream shared by every kept lease of a store."""

    TICK = 0.1

    def __init__(self, store: Store) -> None:
        self._store = store
        self._leases: dict[int, KeptLease] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def add(self, lease: KeptLease) -> None:
        self._leases[lease.id] = lease
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="etcd-lease-keeper")
        self._wake.set()

    def remove(self, lease_id: int) -> None:
        self._leases.pop(lease_id, None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _expire_overdue(self) -> None:
        now = time.monotonic()
        for lease in list(self._leases.values()):
            if now - lease._last_ok > lease.ttl:
                log.warning("lease %x lost: no refresh for its whole TTL", lease.id)
                self._leases.pop(lease.id, None)
                await lease._mark_lost()

    async def _send_due(self, call: Any) -> None:
        """Writes a refresh for every lease that is due, on this stream only: when the
        stream breaks this task ends with it, so no refresh is ever written into a dead
        stream and counted as sent."""
        while True:
            now = time.monotonic()
            for lease in list(self._leases.values()):
                if lease._next_due <= now:
                    # Not due again until this refresh is answered or an interval passed.
                    lease._next_due = now + lease.refresh_interval
                    await call.write(etcdrpc.LeaseKeepAliveRequest(ID=lease.id))
            await self._expire_overdue()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.TICK)

    async def _receive(self, call: Any) -> None:
        while True:
            reply = await call.read()
            if reply is grpc.aio.EOF:
                return
            lease = self._leases.get(reply.ID)
            if lease is None:
                continue
            if reply.TTL <= 0:
                log.warning("lease %x lost: etcd no longer has it", reply.ID)
                self._leases.pop(reply.ID, None)
                await lease._mark_lost()
            else:
                await lease._mark_refreshed(reply.TTL)

    async def _run(self) -> None:
        backoff = 0.1
        while self._leases:
            member = self._store._member()
            call = member.lease.LeaseKeepAlive(metadata=REQUIRE_LEADER)
            # A fresh stream refreshes every lease at once: refreshes written into the
            # broken one may never have reached etcd.
            for lease in self._leases.values():
                lease._next_due = 0.0
            tasks = [
                asyncio.ensure_future(self._send_due(call)),
                asyncio.ensure_future(self._receive(call)),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
                backoff = 0.1
            except grpc.aio.AioRpcError as exc:
                log.warning("lease keep-alive stream failed: %s", exc.code().name)
                if _member_fault(exc):
                    self._store._failed(member, exc)
            except asyncio.InvalidStateError:
                log.warning("lease keep-alive stream ended")
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                call.cancel()
            await self._expire_overdue()
            await asyncio.sleep(backoff * (1 + random.random()))
            backoff = min(backoff * 2, 2.0)


@dataclass(frozen=True)
class EtcdTls:
    """TLS to etcd: the CA that signs the members' certificates and, for etcd started
    with `--client-cert-auth`, the client certificate and key (PEM bytes). `server_name`
    overrides the name checked in the members' certificates."""

    ca: bytes
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str = ""


def parse_endpoints(endpoints: str | Sequence[str]) -> list[str]:
    """`host:port` endpoints from a comma-separated string or a list."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out = [item.strip() for item in items if item.strip()]
    if not out:
        raise ValueError("at least one etcd endpoint is needed")
    return out


class _Member:
    """One etcd endpoint: its channel and the etcd API stubs on it."""

    def __init__(self, address: str, tls: EtcdTls | None, options: list[tuple[str, Any]]) -> None:
        self.address = address
        if tls is None:
            self.channel = grpc.aio.insecure_channel(address, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
            )
            if tls.server_name:
                options = [*options, ("grpc.ssl_target_name_override", tls.server_name)]
            self.channel = grpc.aio.secure_channel(address, credentials, options=options)
        self.kv = etcdrpc.KVStub(self.channel)
        self.lease = etcdrpc.LeaseStub(self.channel)
        self.maintenance = etcdrpc.MaintenanceStub(self.channel)
        self.watch = etcdrpc.WatchStub(self.channel)
        self.failed_at = -math.inf

    def usable(self, now: float) -> bool:
        state = self.channel.get_state(try_to_connect=True)
        recently_failed = now - self.failed_at < FAILED_MEMBER_AVOID_SECONDS
        return state != grpc.ChannelConnectivity.TRANSIENT_FAILURE and not recently_failed


def _not_applied(exc: grpc.aio.AioRpcError) -> bool:
    detail = (exc.details() or "").lower()
    return exc.code() == grpc.StatusCode.UNAVAILABLE and any(t in detail for t in _NOT_APPLIED)


def _member_fault(exc: grpc.aio.AioRpcError) -> bool:
    return exc.code() == grpc.StatusCode.UNAVAILABLE or _timed_out(exc)


class Store:
    """Accessline's access to etcd. One per process; share it."""

    def __init__(
        self,
        endpoints: str | Sequence[str],
        prefix: str,
        timeout: float = 5.0,
        *,
        tls: EtcdTls | None = None,
        reconnect_backoff_max: float = 2.0,
    ) -> None:
        options: list[tuple[str, Any]] = [
            # Reconnecting to a member that came back takes at most this long.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", max(100, int(reconnect_backoff_max * 1000))),
            # A frozen member (its connection open, nothing answering) is noticed.
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ]
        self._members = [_Member(a, tls, options) for a in parse_endpoints(endpoints)]
        self._current = 0
        self._prefix = prefix.rstrip("/").encode()
        self._timeout = timeout
        self._keeper = _LeaseKeeper(self)
        self._closed = False
        self._shared_leases: dict[int, tuple[int, float]] = {}
        self._process_lease: KeptLease | None = None
        self._process_lease_lock = asyncio.Lock()

    # -- plumbing ---------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        return [m.address for m in self._members]

    @property
    def current_endpoint(self) -> str:
        """The member requests go to now."""
        return self._members[self._current].address

    async def connect(self) -> None:
        """Nothing to do: channels connect lazily, and etcd may still be down."""

    async def close(self) -> None:
        self._closed = True
        await self._keeper.close()
        for member in self._members:
            await member.channel.close()

    async def __aenter__(self) -> Store:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _member(self) -> _Member:
        return self._members[self._current]

    def _failed(self, member: _Member, exc: grpc.aio.AioRpcError) -> None:
        """A request to `member` failed in a way that speaks against the member: move on
        to the next member that looks healthy (or simply the next one)."""
        member.failed_at = time.monotonic()
        if len(self._members) == 1 or self._members[self._current] is not member:
            return
        now = time.monotonic()
        count = len(self._members)
        start = self._members.index(member)
        order = [self._members[(start + i) % count] for i in range(1, count)]
        chosen = next((m for m in order if m.usable(now)), order[0])
        self._current = self._members.index(chosen)
        log.warning(
            "etcd member %s failed (%s); using %s",
            member.address,
            exc.code().name,
            chosen.address,
        )

    def _abs(self, key: str) -> bytes:
        return self._prefix + b"/" + key.encode()

    def _rel(self, key: bytes) -> str:
        return key[len(self._prefix) + 1 :].decode()

    async def _call(
        self, stub: str, method: str, request: Any, *, read: bool, timeout: float | None = None
    ) -> Any:
        """One request to the current member. A member at fault is left for the next one;
        the request follows it when it is a read, or a write etcd cannot have applied."""
        for attempt in range(len(self._members)):
            member = self._member()
            fn = getattr(getattr(member, stub), method)
            try:
                return await fn(request, timeout=timeout or self._timeout, metadata=REQUIRE_LEADER)
            except grpc.aio.AioRpcError as exc:
                if not _member_fault(exc):
                    raise _translate(exc) from None
                self._failed(member, exc)
                last = attempt + 1 == len(self._members)
                if last or not (read or _not_applied(exc)):
                    raise _translate(exc) from None
        raise AssertionError("unreachable")

    # -- reads ------------------------------------------------------------------------

    async def revision(self) -> int:
        """The current store revision; also a cheap reachability check."""
        reply = await self._call(
            "kv", "Range", etcdrpc.RangeRequest(key=self._abs("\0"), count_only=True), read=True
        )
        return int(reply.header.revision)

    async def ping(self, timeout: float | None = None) -> None:
        """Raises StoreUnavailable / StoreTimeout when no member can serve a linearizable
        read (which needs the quorum); moves off a member that cannot."""
        await self._call(
            "kv",
            "Range",
            etcdrpc.RangeRequest(key=self._abs("\0"), count_only=True),
            read=True,
            timeout=timeout,
        )

    async def get(self, key: str, message_type: type[M]) -> Entry[M] | None:
        reply = await self._call("kv", "Range", etcdrpc.RangeRequest(key=self._abs(key)), read=True)
        if not reply.kvs:
            return None
        item = reply.kvs[0]
        return Entry(key, _decode(message_type, key, item.value), _meta(item))

    async def get_prefix(
        self,
        prefix: str,
        message_type: type[M],
        *,
        limit: int = 0,
        start_after: str | None = None,
        revision: int = 0,
    ) -> tuple[list[Entry[M]], int]:
        """Entries whose key starts with `prefix`, in key order, and the revision they
        were read at (watch from revision + 1 to see every later change)."""
        start = self._abs(start_after) + b"\0" if start_after else self._abs(prefix)
        request = etcdrpc.RangeRequest(
            key=start,
            range_end=prefix_range_end(self._abs(prefix)),
            limit=limit,
            revision=revision,
        )
        reply = await self._call("kv", "Range", request, read=True)
        entries = [
            Entry(
                self._rel(item.key),
                _decode(message_type, self._rel(item.key), item.value),
                _meta(item),
            )
            for item in reply.kvs
        ]
        return entries, int(reply.header.revision)

    async def count_prefix(self, prefix: str) -> int:
        request = etcdrpc.RangeRequest(
            key=self._abs(prefix),
            range_end=prefix_range_end(self._abs(prefix)),
            count_only=True,
        )
        reply = await self._call("kv", "Range", request, read=True)
        return int(reply.count)

    # -- writes -----------------------------------------------------------------------

    async def put(self, key: str, value: Message, lease: int = 0) -> int:
        """Writes unconditionally; returns the revision of the write."""
        reply = await self._call(
            "kv",
            "Put",
            etcdrpc.PutRequest(key=self._abs(key), value=value.SerializeToString(), lease=lease),
            read=False,
        )
        return int(reply.header.revision)

    async def create(self, key: str, value: Message, lease: int = 0) -> int | None:
        """Creates the key only if it does not exist (compare-and-swap on
        create_revision == 0). Returns its create revision, or None if it existed."""
        result = await self.txn([Compare.absent(key)], [Op.put(key, value, lease)])
        return result.revision if result.succeeded else None

    async def delete(self, key: str) -> bool:
        reply = await self._call(
            "kv", "DeleteRange", etcdrpc.DeleteRangeRequest(key=self._abs(key)), read=False
        )
        return bool(reply.deleted)

    async def delete_prefix(self, prefix: str) -> int:
        reply = await self._call(
            "kv",
            "DeleteRange",
            etcdrpc.DeleteRangeRequest(
                key=self._abs(prefix), range_end=prefix_range_end(self._abs(prefix))
            ),
            read=False,
        )
        return int(reply.deleted)

    def _compare(self, compare: Compare) -> Any:
        message = etcdrpc.Compare(key=self._abs(compare.key))
        message.result = {
            "==": etcdrpc.Compare.EQUAL,
            "!=": etcdrpc.Compare.NOT_EQUAL,
            "<": etcdrpc.Compare.LESS,
            ">": etcdrpc.Compare.GREATER,
        }[compare.op]
        if compare.target == "create":
            message.target = etcdrpc.Compare.CREATE
            message.create_revision = int(compare.operand)
        elif compare.target == "mod":
            message.target = etcdrpc.Compare.MOD
            message.mod_revision = int(compare.operand)
        elif compare.target == "version":
            message.target = etcdrpc.Compare.VERSION
            message.version = int(compare.operand)
        else:
            raise ValueError(f"unknown compare target {compare.target}")
        return message

    def _op(self, op: Op) -> Any:
        key = self._abs(op.key)
        if op.kind == "put":
            return etcdrpc.RequestOp(
                request_put=etcdrpc.PutRequest(
                    key=key, value=op.value, lease=op.lease, ignore_value=op.keep_value
                )
            )
        if op.kind == "delete":
            end = prefix_range_end(key) if op.prefix else b""
            return etcdrpc.RequestOp(
                request_delete_range=etcdrpc.DeleteRangeRequest(key=key, range_end=end)
            )
        if op.kind == "get":
            end = prefix_range_end(key) if op.prefix else b""
            return etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=key, range_end=end))
        raise ValueError(f"unknown op {op.kind}")

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
    ) -> TxnResult:
        """One etcd transaction: if every compare holds, the success ops run, else the
        failure ops, atomically."""
        request = etcdrpc.TxnRequest(
            compare=[self._compare(c) for c in compares],
            success=[self._op(o) for o in success],
            failure=[self._op(o) for o in failure],
        )
        # A transaction without writes is a read (a consistent snapshot of several keys).
        read_only = all(o.kind == "get" for o in (*success, *failure))
        reply = await self._call("kv", "Txn", request, read=read_only)
        gets: list[list[RawKV]] = []
        deleted: list[int] = []
        for response in reply.responses:
            kind = response.WhichOneof("response")
            if kind == "response_range":
                gets.append(
                    [
                        RawKV(self._rel(i.key), i.value, _meta(i))
                        for i in response.response_range.kvs
                    ]
                )
            elif kind == "response_delete_range":
                deleted.append(int(response.response_delete_range.deleted))
        return TxnResult(bool(reply.succeeded), int(reply.header.revision), gets, deleted)

    async def compact(self, revision: int) -> None:
        """Discards history before `revision` (operators and tests)."""
        await self._call(
            "kv", "Compact", etcdrpc.CompactionRequest(revision=revision, physical=True), read=False
        )

    # -- leases -----------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        """Grants a lease of `ttl` seconds (etcd may round a small TTL up); returns its id."""
        # An unused lease granted twice only expires: granting is safe to repeat.
        reply = await self._call(
            "lease", "LeaseGrant", etcdrpc.LeaseGrantRequest(TTL=ttl), read=True
        )
        if reply.error:
            raise StoreRejected(f"etcd refused the lease: {reply.error}")
        return int(reply.ID)

    async def shared_lease(self, min_ttl: float, window: float = 1.0) -> int:
        """A lease that outlives `min_ttl` seconds from now by at most `window` + 1 s,
        shared by every caller asking for the same TTL within `window` seconds: for keys
        that must live at least a while (quarantines, outcomes) and are never revoked
        one by one. Saves a grant per key."""
        key = math.ceil(min_ttl)
        now = time.monotonic()
        cached = self._shared_leases.get(key)
        if cached is not None and now - cached[1] < window:
            return cached[0]
        lease = await self.grant_lease(max(1, math.ceil(min_ttl + window)))
        self._shared_leases[key] = (lease, now)
        return lease

    async def process_lease(self, ttl: int = 5) -> int:
        """A lease kept alive while this process runs (granted again once lost), for keys
        that must vanish with this replica: a dead replica's keys end within `ttl`."""
        async with self._process_lease_lock:
            lease = self._process_lease
            if lease is None or lease.lost.is_set():
                lease_id = await self.grant_lease(ttl)
                lease = self._process_lease = await self.keep_alive(lease_id, ttl)
            return lease.id

    async def release_process_lease(self) -> None:
        """Ends the process lease now (a clean stop), deleting the keys under it."""
        lease, self._process_lease = self._process_lease, None
        if lease is not None:
            self.stop_keep_alive(lease)
            await self.revoke_lease(lease.id)

    async def revoke_lease(self, lease_id: int) -> None:
        """Ends a lease now, deleting every key under it. A lease already gone is fine."""
        self._keeper.remove(lease_id)
        try:
            # Revoking twice is harmless: the second finds no lease.
            await self._call(
                "lease", "LeaseRevoke", etcdrpc.LeaseRevokeRequest(ID=lease_id), read=True
            )
        except StoreRejected as exc:
            if "not found" in exc.message:
                return
            raise

    async def lease_ttl(self, lease_id: int) -> int:
        """Seconds left on a lease, or -1 when it no longer exists."""
        reply = await self._call(
            "lease", "LeaseTimeToLive", etcdrpc.LeaseTimeToLiveRequest(ID=lease_id), read=True
        )
        return int(reply.TTL)

    async def keep_alive(self, lease_id: int, ttl: int) -> KeptLease:
        """Keeps a lease alive until `stop_keep_alive` or until it is lost."""
        lease = KeptLease(lease_id, ttl)
        self._keeper.add(lease)
        return lease

    def stop_keep_alive(self, lease: KeptLease) -> None:
        """Stops refreshing; the lease then expires by itself after its TTL."""
        self._keeper.remove(lease.id)

    # -- watches ----------------------------------------------------------------------

    def watch_key(
        self, key: str, start_revision: int, *, max_backoff: float = 2.0
    ) -> AsyncIterator[WatchEvent]:
        """Every change of the one key `key` from `start_revision` on (as `watch_prefix`,
        without the keys that merely start with it)."""
        return self._watch(key, start_revision, max_backoff, whole_prefix=False)

    def watch_prefix(
        self, prefix: str, start_revision: int, *, max_backoff: float = 2.0
    ) -> AsyncIterator[WatchEvent]:
        """Every change under `prefix` from `start_revision` on, in revision order, with
        nothing lost across reconnects: after a broken stream the watch resumes from the
        revision after the last event seen. Raises WatchCompacted when etcd no longer
        has the revisions needed to resume."""
        return self._watch(prefix, start_revision, max_backoff, whole_prefix=True)

    async def _watch(
        self, prefix: str, start_revision: int, max_backoff: float, *, whole_prefix: bool
    ) -> AsyncIterator[WatchEvent]:
        next_revision = start_revision
        backoff = 0.05
        abs_prefix = self._abs(prefix)
        range_end = prefix_range_end(abs_prefix) if whole_prefix else b""
        while not self._closed:
            stop = asyncio.Event()

            async def requests(
                revision: int = next_revision, stop: asyncio.Event = stop
            ) -> AsyncIterator[Any]:
                yield etcdrpc.WatchRequest(
                    create_request=etcdrpc.WatchCreateRequest(
                        key=abs_prefix,
                        range_end=range_end,
                        start_revision=revision,
                        prev_kv=True,
                        progress_notify=True,
                    )
                )
                # Closing the request side would end etcd's watch stream: hold it open.
                await stop.wait()

            member = self._member()
            call = member.watch.Watch(requests(), metadata=REQUIRE_LEADER)
            try:
                async for reply in call:
                    if reply.compact_revision:
                        raise WatchCompacted(int(reply.compact_revision))
                    if reply.canceled:
                        log.warning("etcd cancelled a watch: %s", reply.cancel_reason)
                        if "leader" in reply.cancel_reason:
                            member.failed_at = time.monotonic()
                        break
                    backoff = 0.05
                    for event in reply.events:
                        kv = event.kv
                        prev = event.prev_kv.value if event.HasField("prev_kv") else None
                        yield WatchEvent(
                            EventKind.DELETE
                            if event.type == etcdrpc.Event.DELETE
                            else EventKind.PUT,
                            self._rel(kv.key),
                            kv.value,
                            _meta(kv),
                            prev,
                        )
                        next_revision = int(kv.mod_revision) + 1
                    if not reply.events and not reply.created and reply.header.revision:
                        # A progress notification: everything up to this revision was sent.
                        next_revision = max(next_revision, int(reply.header.revision) + 1)
            except grpc.aio.AioRpcError as exc:
                log.warning(
                    "watch on %s broke (%s); resuming from revision %d",
                    prefix,
                    exc.code().name,
                    next_revision,
                )
                if _member_fault(exc):
                    self._failed(member, exc)
            finally:
                stop.set()
                call.cancel()
            await asyncio.sleep(backoff * (1 + random.random()))
            backoff = min(backoff * 2, max_backoff)


def decode(message_type: type[M], key: str, data: bytes) -> M:
    """Decodes a raw value read by a transaction's `get` op."""
    return _decode(message_type, key, data)


__all__ = [
    "Compare",
    "CorruptValue",
    "Entry",
    "EtcdTls",
    "EventKind",
    "KeptLease",
    "KeyMeta",
    "Op",
    "RawKV",
    "Store",
    "StoreRejected",
    "StoreTimeout",
    "StoreUnavailable",
    "TxnResult",
    "WatchCompacted",
    "WatchEvent",
    "decode",
    "parse_endpoints",
]
