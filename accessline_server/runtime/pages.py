"""Static pages on a service's web port: the files of a folder under a path prefix (the
agent console on Presence's), answered to GET and HEAD with headers that keep the page to
its own origin; every other request goes on to the Connect application."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}

# The page runs only its own script and style and talks only to its own origin (the
# web port that served it); nothing may frame it.
HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        b" connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
]

NOT_BUILT = "This page is not built on this server: run `make console` (or `make setup`).\n"


class Pages:
    """The files of `folder` under `prefix` (which ends with "/"; "index.html" for the
    prefix itself), in front of `app`."""

    def __init__(self, app: Any, prefix: str, folder: Path) -> None:
        self._app = app
        self._prefix = prefix
        self._folder = folder.resolve()

    def _file(self, path: str) -> Path | None:
        relative = path[len(self._prefix) :] or "index.html"
        found = (self._folder / relative).resolve()
        if not found.is_relative_to(self._folder) or not found.is_file():
            return None
        return found if found.suffix in TYPES else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] != "http"
            or scope["method"] not in ("GET", "HEAD")
            or not (path + "/").startswith(self._prefix)
        ):
            await self._app(scope, receive, send)
            return
        if path + "/" == self._prefix:
            await _answer(send, 308, b"", [(b"location", self._prefix.encode())])
            return
        found = self._file(path)
        if found is None:
            text = NOT_BUILT if not self._folder.is_dir() else "Not found.\n"
            await _answer(send, 404, text.encode(), [(b"content-type", TYPES[".txt"].encode())])
            return
        body = found.read_bytes()
        await _answer(
            send,
            200,
            b"" if scope["method"] == "HEAD" else body,
            [(b"content-type", TYPES[found.suffix].encode()), *HEADERS],
            length=len(body),
        )


async def _answer(
    send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]], length: int = -1
) -> None:
    size = str(len(body) if length < 0 else length).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", size)],
        }
    )
    await send({"type": "http.response.body", "body": body})
