"""Leadership of one etcd key among replicas, in the manner of etcd's own `concurrency`
package: a replica campaigns with a lease of its own, holds the key while the lease is
kept alive, and resigns by deleting the key (so another replica takes over at once,
without waiting for the lease to run out). The key's create revision is the fencing
token: every write the leader makes carries `fence()` in its transaction, so a leader
that lost the key (its lease ran out while it was paused) can change nothing.

    election = Election(store, "rt/leader", lease_seconds=5)
    term = await election.campaign(lambda: Leader(replica_id=me), stopping)
    try:
        ... await store.txn([term.fence(), ...], ops, [term.read()]) ...
    finally:
        await term.resign()
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.message import Message

from accessline_server.runtime.errors import AccesslineError
from accessline_server.runtime.store import Compare, EventKind, KeptLease, Op, Store, TxnResult


class NotLeader(Exception):
    """The leader's fencing token no longer holds: stop acting as leader."""


@dataclass
class Term:
    """One replica's hold on the key, from election to resignation."""

    election: Election
    # The create revision of the key: the fencing token of this term.
    revision: int
    lease_id: int
    kept: KeptLease

    @property
    def lost(self) -> asyncio.Event:
        """Set when the term's lease could not be kept alive (the key is gone with it)."""
        return self.kept.lost

    def fence(self) -> Compare:
        """The compare that holds while this term still holds the key."""
        return Compare.created_at(self.election.key, self.revision)

    def read(self) -> Op:
        """A get of the key, for a transaction's failure ops, so that `check` can tell
        a failed fence from other failed compares."""
        return Op.get(self.election.key)

    def check(self, result: TxnResult, index: int = 0) -> None:
        """Raises NotLeader when a transaction failed because the fence did: the key's
        holder, read by the `index`-th get op (`read()`), is not this term."""
        if result.succeeded:
            return
        holder = result.first(index)
        if holder is None or holder.meta.create_revision != self.revision:
            raise NotLeader(f"{self.election.key} is held by another replica")

    async def resign(self) -> None:
        """Gives the key up (if still held), stops keeping the lease and revokes it."""
        try:
            with contextlib.suppress(AccesslineError):
                await self.election.store.txn([self.fence()], [Op.delete(self.election.key)])
        finally:
            self.election.store.stop_keep_alive(self.kept)
            with contextlib.suppress(AccesslineError):
                await self.election.store.revoke_lease(self.lease_id)


class Election:
    """Campaigns for `key` with leases of `lease_seconds`."""

    def __init__(self, store: Store, key: str, lease_seconds: int) -> None:
        self.store = store
        self.key = key
        self.lease_seconds = lease_seconds

    async def campaign(self, value: Callable[[], Message], stopping: asyncio.Event) -> Term | None:
        """Waits until this replica holds the key (written as `value()` under a lease of
        its own) and returns the term; None when `stopping` is set or the lease was lost
        meanwhile. Store errors propagate (the lease is revoked first)."""
        lease_id = await self.store.grant_lease(self.lease_seconds)
        kept = await self.store.keep_alive(lease_id, self.lease_seconds)
        try:
            while not kept.lost.is_set() and not stopping.is_set():
                revision = await self.store.create(self.key, value(), lease_id)
                if revision is not None:
                    return Term(self, revision, lease_id, kept)
                await self._vacancy(kept.lost, stopping)
        except BaseException:
            await self._abandon(lease_id, kept)
            raise
        await self._abandon(lease_id, kept)
        return None

    async def _abandon(self, lease_id: int, kept: KeptLease) -> None:
        self.store.stop_keep_alive(kept)
        with contextlib.suppress(AccesslineError):
            await self.store.revoke_lease(lease_id)

    async def _vacancy(self, lost: asyncio.Event, stopping: asyncio.Event) -> None:
        """Returns once the key is gone (or the lease is lost, or stopping)."""
        entry = (await self.store.txn([], [Op.get(self.key)])).first()
        if entry is None:
            return

        async def deleted() -> None:
            async for event in self.store.watch_key(self.key, entry.meta.mod_revision + 1):
                if event.kind == EventKind.DELETE:
                    return

        watch = asyncio.ensure_future(deleted())
        others = [asyncio.ensure_future(e.wait()) for e in (lost, stopping)]
        try:
            await asyncio.wait({watch, *others}, return_when=asyncio.FIRST_COMPLETED)
            if watch.done():
                watch.result()
        finally:
            for task in (watch, *others):
                task.cancel()
            await asyncio.gather(watch, *others, return_exceptions=True)
