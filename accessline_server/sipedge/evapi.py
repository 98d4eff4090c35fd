"""Kamailio's event socket (the evapi module): JSON messages framed as netstrings
(`<length>:<bytes>,`) on one TCP connection, opened by the adapter."""

from __future__ import annotations

import asyncio
import json
from typing import Any

# A message larger than this is a broken peer, not an event.
MAX_MESSAGE = 64 * 1024


class FramingError(Exception):
    """The peer sent something that is not a netstring of a JSON object."""


def encode(message: dict[str, Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode()
    return str(len(data)).encode() + b":" + data + b","


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None when the connection ended cleanly between messages."""
    try:
        head = await reader.readuntil(b":")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise FramingError("connection ended inside a message") from None
        return None
    except asyncio.LimitOverrunError:
        raise FramingError("no netstring length") from None
    length_text = head[:-1].strip()
    if not length_text.isdigit() or int(length_text) > MAX_MESSAGE:
        raise FramingError("bad netstring length")
    body = await reader.readexactly(int(length_text) + 1)
    if body[-1:] != b",":
        raise FramingError("netstring without its comma")
    try:
        message = json.loads(body[:-1])
    except ValueError:
        raise FramingError("message is not JSON") from None
    if not isinstance(message, dict):
        raise FramingError("message is not a JSON object")
    return message
