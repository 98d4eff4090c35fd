"""The SIP adapter's health endpoint, for an orchestrator's probes (plain HTTP/1.1):
GET /ready answers 200 while the adapter is connected to Kamailio's event socket (calls
reach Accessline through this pod) and 503 otherwise; GET /live answers 200 while the
adapter's event loop runs. Nothing else is served (404)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

# A request is one line and its headers, read within this long and at most this many
# lines: a probe's request, nothing to hold a connection open with.
READ_SECONDS = 5.0
MAX_LINES = 64


async def serve_health(host: str, port: int, connected: Callable[[], bool]) -> asyncio.Server:
    """Listens on host:port until the server is closed."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(_request_path(reader), READ_SECONDS)
            if request == "/live":
                status, body = "200 OK", b"live\n"
            elif request == "/ready":
                ready = connected()
                status = "200 OK" if ready else "503 Service Unavailable"
                body = b"ready\n" if ready else b"not connected to Kamailio's event socket\n"
            else:
                status, body = "404 Not Found", b"not found\n"
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, OSError, ValueError, asyncio.LimitOverrunError):
            pass  # a client that sent no request in time, or too much: closed
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    return await asyncio.start_server(answer, host, port)


async def _request_path(reader: asyncio.StreamReader) -> str:
    """The path of a GET request (its headers read and dropped)."""
    first = (await reader.readline()).decode("latin-1").split()
    for _ in range(MAX_LINES):
        if (await reader.readline()) in (b"\r\n", b"\n", b""):
            break
    else:
        raise ValueError("too many header lines")
    if len(first) < 2 or first[0] != "GET":
        return ""
    return first[1]
