"""Leases the store keeps alive: one LeaseKeepAlive stream per store, shared by every
kept lease, that notices when a lease is lost (etcd says it is gone, or no refresh
succeeded for a whole TTL) so that whatever was held under it is given up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import aetcd.rpc as etcdrpc
import grpc

from accessline_server.runtime.backoff import Backoff
from accessline_server.runtime.etcdlink import REQUIRE_LEADER, Members, member_fault

log = logging.getLogger("accessline.store")


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


class LeaseKeeper:
    """One LeaseKeepAlive stream shared by every kept lease of a store."""

    TICK = 0.1

    def __init__(self, members: Members) -> None:
        self._members = members
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
        backoff = Backoff(0.1, 2.0)
        while self._leases:
            member = self._members.current
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
                backoff.reset()
            except grpc.aio.AioRpcError as exc:
                log.warning("lease keep-alive stream failed: %s", exc.code().name)
                if member_fault(exc):
                    self._members.failed(member, exc)
            except asyncio.InvalidStateError:
                log.warning("lease keep-alive stream ended")
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                call.cancel()
            await self._expire_overdue()
            await asyncio.sleep(backoff.next())
