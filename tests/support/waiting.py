"""Waiting in tests: on a condition, polled with a deadline, never a fixed sleep."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc


async def eventually(
    check: Callable[[], Any], *, timeout: float = 15.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Polls `check` (sync or async) until it returns a truthy value or the deadline
    passes; returns that value. The test's way to wait without fixed sleeps."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return result
        except (grpc.aio.AioRpcError, ConnectionError, OSError) as exc:
            last_error = exc
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not true within {timeout}s: {what or check}"
                + (f" (last error: {last_error})" if last_error else "")
            )
        await asyncio.sleep(interval)
