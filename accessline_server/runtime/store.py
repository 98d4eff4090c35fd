"""The etcd store: with `kv` (compares, ops, entries), `leases` (kept leases) and
`etcdlink` (the members and their channels), the only code that talks to etcd, with the
etcd API stubs that aetcd ships. The services import these names from here.

Keys are namespaced under a configurable prefix and values are serialized protobuf
messages. It offers what the services need: create-if-absent under a lease
(compare-and-swap), multi-key transactions with fencing compares, leases kept alive by
one shared stream that notices loss, prefix reads, and watches that resume from the last
seen revision after a reconnect and report compaction instead of losing events. etcd
failures surface as Unavailable / DeadlineExceeded domain errors with a retry delay.

etcd is a cluster in production: the store is given every member's endpoint, talks to one
at a time, and moves to the next healthy one when a member fails, is unreachable or has
lost its leader (see `etcdlink`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, TypeVar

import aetcd.rpc as etcdrpc
import grpc
from google.protobuf.message import Message

from accessline_server.runtime.backoff import Backoff
from accessline_server.runtime.etcdlink import (
    REQUIRE_LEADER,
    EtcdTls,
    Members,
    StoreRejected,
    StoreTimeout,
    StoreUnavailable,
    member_fault,
    parse_endpoints,
)
from accessline_server.runtime.groupcommit import GroupCommit
from accessline_server.runtime.kv import (
    Compare,
    CorruptValue,
    Entry,
    EventKind,
    KeyMeta,
    Op,
    RawKV,
    TxnResult,
    WatchEvent,
    compare_message,
    decode,
    key_meta,
    op_message,
    prefix_range_end,
)
from accessline_server.runtime.leases import KeptLease, LeaseKeeper
from accessline_server.runtime.watchmux import WatchCompacted, WatchMux

log = logging.getLogger("accessline.store")

M = TypeVar("M", bound=Message)


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
        group_commit: int = 2,
    ) -> None:
        self._members = Members(
            endpoints, tls=tls, timeout=timeout, reconnect_backoff_max=reconnect_backoff_max
        )
        # Concurrent transactions sent together behind `group_commit` under way (0: each
        # alone).
        self.batches = (
            GroupCommit(self._send_txn, max_in_flight=group_commit) if group_commit else None
        )
        self._prefix = prefix.rstrip("/").encode()
        self._keeper = LeaseKeeper(self._members)
        # Key watches share one etcd Watch stream.
        self._mux = WatchMux(self._members, self._rel, reconnect_backoff_max)
        self._closed = False
        self._shared_leases: dict[int, tuple[int, float]] = {}
        self._granting: dict[int, asyncio.Future[int]] = {}
        self._process_lease: KeptLease | None = None
        self._process_lease_lock = asyncio.Lock()

    # -- plumbing ---------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        return [m.address for m in self._members.all]

    @property
    def current_endpoint(self) -> str:
        """The member requests go to now."""
        return self._members.current.address

    async def connect(self) -> None:
        """Nothing to do: channels connect lazily, and etcd may still be down."""

    async def close(self) -> None:
        self._closed = True
        await self._mux.close()
        await self._keeper.close()
        await self._members.close()

    async def __aenter__(self) -> Store:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _abs(self, key: str) -> bytes:
        return self._prefix + b"/" + key.encode()

    def _rel(self, key: bytes) -> str:
        return key[len(self._prefix) + 1 :].decode()

    # -- reads ------------------------------------------------------------------------

    async def revision(self) -> int:
        """The current store revision; also a cheap reachability check."""
        reply = await self._members.call(
            "kv", "Range", etcdrpc.RangeRequest(key=self._abs("\0"), count_only=True), read=True
        )
        return int(reply.header.revision)

    async def ping(self, timeout: float | None = None) -> None:
        """Raises StoreUnavailable / StoreTimeout when no member can serve a linearizable
        read (which needs the quorum); moves off a member that cannot."""
        await self._members.call(
            "kv",
            "Range",
            etcdrpc.RangeRequest(key=self._abs("\0"), count_only=True),
            read=True,
            timeout=timeout,
        )

    async def get(self, key: str, message_type: type[M]) -> Entry[M] | None:
        reply = await self._members.call(
            "kv", "Range", etcdrpc.RangeRequest(key=self._abs(key)), read=True
        )
        if not reply.kvs:
            return None
        item = reply.kvs[0]
        return Entry(key, decode(message_type, key, item.value), key_meta(item))

    async def get_keys(self, keys: Sequence[str]) -> list[RawKV | None]:
        """Several keys read in one etcd transaction (one snapshot), each as found or None;
        `decode` makes the values messages."""
        if not keys:
            return []
        read = await self.txn([], [Op.get(key) for key in keys])
        return [found[0] if found else None for found in read.gets]

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
        reply = await self._members.call("kv", "Range", request, read=True)
        entries = [
            Entry(
                self._rel(item.key),
                decode(message_type, self._rel(item.key), item.value),
                key_meta(item),
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
        reply = await self._members.call("kv", "Range", request, read=True)
        return int(reply.count)

    # -- writes -----------------------------------------------------------------------

    async def put(self, key: str, value: Message, lease: int = 0) -> int:
        """Writes unconditionally; returns the revision of the write."""
        reply = await self._members.call(
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
        reply = await self._members.call(
            "kv", "DeleteRange", etcdrpc.DeleteRangeRequest(key=self._abs(key)), read=False
        )
        return bool(reply.deleted)

    async def delete_prefix(self, prefix: str) -> int:
        reply = await self._members.call(
            "kv",
            "DeleteRange",
            etcdrpc.DeleteRangeRequest(
                key=self._abs(prefix), range_end=prefix_range_end(self._abs(prefix))
            ),
            read=False,
        )
        return int(reply.deleted)

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
    ) -> TxnResult:
        """One etcd transaction: if every compare holds, the success ops run, else the
        failure ops, atomically."""
        request = etcdrpc.TxnRequest(
            compare=[compare_message(c, self._abs(c.key)) for c in compares],
            success=[op_message(o, self._abs(o.key)) for o in success],
            failure=[op_message(o, self._abs(o.key)) for o in failure],
        )
        # A transaction without writes is a read (a consistent snapshot of several keys).
        read_only = all(o.kind == "get" for o in (*success, *failure))
        if self.batches is not None:
            reply, revision = await self.batches.txn(request, read_only)
        else:
            reply = await self._send_txn(request, read_only)
            revision = int(reply.header.revision)
        gets: list[list[RawKV]] = []
        deleted: list[int] = []
        for response in reply.responses:
            kind = response.WhichOneof("response")
            if kind == "response_range":
                gets.append(
                    [
                        RawKV(self._rel(i.key), i.value, key_meta(i))
                        for i in response.response_range.kvs
                    ]
                )
            elif kind == "response_delete_range":
                deleted.append(int(response.response_delete_range.deleted))
        return TxnResult(bool(reply.succeeded), revision, gets, deleted)

    async def _send_txn(self, request: etcdrpc.TxnRequest, read_only: bool) -> Any:
        return await self._members.call("kv", "Txn", request, read=read_only)

    async def compact(self, revision: int) -> None:
        """Discards history before `revision` (operators and tests)."""
        await self._members.call(
            "kv", "Compact", etcdrpc.CompactionRequest(revision=revision, physical=True), read=False
        )

    # -- leases -----------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        """Grants a lease of `ttl` seconds (etcd may round a small TTL up); returns its id."""
        # An unused lease granted twice only expires: granting is safe to repeat.
        reply = await self._members.call(
            "lease", "LeaseGrant", etcdrpc.LeaseGrantRequest(TTL=ttl), read=True
        )
        if reply.error:
            raise StoreRejected(f"etcd refused the lease: {reply.error}")
        return int(reply.ID)

    async def shared_lease(self, min_ttl: float, window: float = 1.0) -> int:
        """A lease that outlives `min_ttl` seconds from now by at most `window` + 1 s,
        shared by every caller asking for the same TTL within `window` seconds: for keys
        that must live at least a while (quarantines, outcomes) and are never revoked
        one by one. Saves a grant per key; callers who ask while one is being granted
        wait for it."""
        key = math.ceil(min_ttl)
        now = time.monotonic()
        cached = self._shared_leases.get(key)
        if cached is not None and now - cached[1] < window:
            return cached[0]
        pending = self._granting.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self.grant_lease(max(1, math.ceil(min_ttl + window))))
            self._granting[key] = pending
            try:
                lease = await asyncio.shield(pending)
            finally:
                self._granting.pop(key, None)
            self._shared_leases[key] = (lease, now)
            return lease
        return await asyncio.shield(pending)

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
            await self._members.call(
                "lease", "LeaseRevoke", etcdrpc.LeaseRevokeRequest(ID=lease_id), read=True
            )
        except StoreRejected as exc:
            if "not found" in exc.message:
                return
            raise

    async def lease_ttl(self, lease_id: int) -> int:
        """Seconds left on a lease, or -1 when it no longer exists."""
        reply = await self._members.call(
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

    def watch_key(self, key: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Every change of the one key `key` from `start_revision` on (as `watch_prefix`,
        without the keys that merely start with it), on the one stream this store's key
        watches share (`watchmux`)."""
        return self._mux.watch(self._abs(key), start_revision)

    async def watch_prefix(
        self, prefix: str, start_revision: int, *, max_backoff: float = 2.0
    ) -> AsyncIterator[WatchEvent]:
        """Every change under `prefix` from `start_revision` on, in revision order, with
        nothing lost across reconnects: after a broken stream the watch resumes from the
        revision after the last event seen. Raises WatchCompacted when etcd no longer
        has the revisions needed to resume."""
        key = self._abs(prefix)
        replies = self._watch(prefix, key, prefix_range_end(key), start_revision, max_backoff)
        async with contextlib.aclosing(replies):
            async for events in replies:
                for event in events:
                    yield event

    def watch_span(
        self, first: str, last_prefix: str, start_revision: int
    ) -> AsyncIterator[list[WatchEvent]]:
        """As `watch_prefix`, for the keys from `first` to the last that starts with
        `last_prefix`, one list per etcd watch response: etcd sends all the changes of a
        revision in one response, so between two lists a copy kept from them is etcd's
        state at one revision."""
        end = prefix_range_end(self._abs(last_prefix))
        return self._watch(first, self._abs(first), end, start_revision, 2.0)

    async def _watch(
        self, name: str, key: bytes, range_end: bytes, start_revision: int, max_backoff: float
    ) -> AsyncGenerator[list[WatchEvent], None]:
        next_revision = start_revision
        backoff = Backoff(0.05, max_backoff)
        while not self._closed:
            member = self._members.current
            # The create request is written on the call itself, and the request side is
            # never closed (that would end etcd's watch stream). No request iterator: a
            # cancelled one would take the gRPC library's error path (a traceback
            # formatted) for every watch that ends.
            call = member.watch.Watch(metadata=REQUIRE_LEADER)
            try:
                await call.write(
                    etcdrpc.WatchRequest(
                        create_request=etcdrpc.WatchCreateRequest(
                            key=key,
                            range_end=range_end,
                            start_revision=next_revision,
                            prev_kv=True,
                            progress_notify=True,
                        )
                    )
                )
                async for reply in call:
                    if reply.compact_revision:
                        raise WatchCompacted(int(reply.compact_revision))
                    if reply.canceled:
                        log.warning("etcd cancelled a watch: %s", reply.cancel_reason)
                        if "leader" in reply.cancel_reason:
                            member.failed_at = time.monotonic()
                        break
                    backoff.reset()
                    if reply.events:
                        yield [self._event(event) for event in reply.events]
                        next_revision = int(reply.events[-1].kv.mod_revision) + 1
                    if not reply.events and not reply.created and reply.header.revision:
                        # A progress notification: everything up to this revision was sent.
                        next_revision = max(next_revision, int(reply.header.revision) + 1)
            except grpc.aio.AioRpcError as exc:
                log.warning(
                    "watch on %s broke (%s); resuming from revision %d",
                    name,
                    exc.code().name,
                    next_revision,
                )
                if member_fault(exc):
                    self._members.failed(member, exc)
            except asyncio.InvalidStateError:
                log.warning("watch on %s ended before it started; resuming", name)
            finally:
                call.cancel()
            await asyncio.sleep(backoff.next())

    def _event(self, event: etcdrpc.Event) -> WatchEvent:
        kv = event.kv
        return WatchEvent(
            EventKind.DELETE if event.type == etcdrpc.Event.DELETE else EventKind.PUT,
            self._rel(kv.key),
            kv.value,
            key_meta(kv),
            event.prev_kv.value if event.HasField("prev_kv") else None,
        )


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
