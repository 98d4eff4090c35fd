"""Helpers for server streams that must end when the server shuts down."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

T = TypeVar("T")


async def until(source: AsyncIterator[T], stopping: asyncio.Event) -> AsyncIterator[T]:
    """Items from `source` until `stopping` is set."""
    iterator = source.__aiter__()
    stop = asyncio.ensure_future(stopping.wait())
    step: asyncio.Future[T] | None = None
    try:
        while True:
            step = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({step, stop}, return_when=asyncio.FIRST_COMPLETED)
            if step not in done:
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await step
                return
            try:
                yield step.result()
            except StopAsyncIteration:
                return
    finally:
        stop.cancel()
        if step is not None and not step.done():
            # The caller went away (a cancelled RPC) while the source was producing: stop
            # the source too, so its own cleanup runs now rather than never.
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(asyncio.wait({step}))
            if step.done() and not step.cancelled():
                step.exception()  # retrieved: the caller is gone, nobody else will
        with contextlib.suppress(AttributeError, RuntimeError):
            await iterator.aclose()  # type: ignore[attr-defined]
