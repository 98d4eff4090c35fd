"""Callback dials streamed to the switches (StreamCallbackDials): each pending dial goes
to exactly one open switch stream, and a dial taken by a stream that ends unreported goes
back to the others."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator

from accessline.routing.storage.v1 import storage_pb2 as rt_store
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline_server.routing import keys
from accessline_server.runtime.errors import AccesslineError
from accessline_server.runtime.sealing import Sealer
from accessline_server.runtime.store import Compare, Entry, EventKind, Op, Store, TxnResult


async def stream(
    store: Store, sealer: Sealer, switch_id: str, stopping: asyncio.Event
) -> AsyncIterator[rt_pb2.StreamCallbackDialsResponse]:
    """Hands each pending dial to exactly one switch stream; dials taken by a stream
    that ends unreported go back to the others."""
    taker = f"{switch_id}/{secrets.token_urlsafe(6)}"
    taken: set[str] = set()
    entries, revision = await store.get_prefix(keys.DIALS, rt_store.PendingDial)
    changes: asyncio.Queue[Entry[rt_store.PendingDial] | None] = asyncio.Queue()
    for entry in entries:
        changes.put_nowait(entry)

    async def follow() -> None:
        async for event in store.watch_prefix(keys.DIALS, revision + 1):
            if event.kind == EventKind.PUT:
                changes.put_nowait(Entry(event.key, event.decode(rt_store.PendingDial), event.meta))

    watcher = asyncio.ensure_future(follow())
    stop = asyncio.ensure_future(stopping.wait())
    step: asyncio.Future[Entry[rt_store.PendingDial] | None] | None = None
    taking: asyncio.Future[TxnResult] | None = None
    try:
        while True:
            step = asyncio.ensure_future(changes.get())
            await asyncio.wait({step, stop, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                if watcher.done():
                    watcher.result()
                return
            found = step.result()
            if found is None or found.value.taken_by:
                continue
            mine = rt_store.PendingDial()
            mine.CopyFrom(found.value)
            mine.taken_by = taker
            # Taken before it is written: a stream ending mid-write undoes it once written.
            taken.add(found.key)
            taking = asyncio.ensure_future(
                store.txn(
                    [Compare.modified_at(found.key, found.meta.mod_revision)],
                    [Op.put(found.key, mine)],
                )
            )
            if (await asyncio.shield(taking)).succeeded:
                yield rt_pb2.StreamCallbackDialsResponse.FromString(
                    sealer.unseal(mine.sealed_dial, found.key.removeprefix(keys.DIALS))
                )
    finally:
        for task in (watcher, stop, step):
            if task is not None:
                task.cancel()
        await asyncio.shield(_release(store, taken, taker, taking))


async def _release(
    store: Store, taken: set[str], taker: str, taking: asyncio.Future[TxnResult] | None
) -> None:
    """Dials a stream took and nobody reported go back to the other switches, once
    the last take is written (or refused)."""
    if taking is not None:
        await asyncio.wait({taking})
    for key in taken:
        with contextlib.suppress(AccesslineError):
            left = await store.get(key, rt_store.PendingDial)
            if left is not None and left.value.taken_by == taker:
                left.value.taken_by = ""
                await store.txn(
                    [Compare.modified_at(key, left.meta.mod_revision)],
                    [Op.put(key, left.value)],
                )
