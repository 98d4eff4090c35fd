"""Static pages on a service's web port: the files of a folder under a path prefix (the
agent console on Presence's), answered to GET and HEAD with headers that keep the page to
its own origin; every other request goes on to the Connect application."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}

# The page runs only its own script and style and talks only to its own origin (the
# web port that served it) and the site's other origins; nothing may frame it.
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'{connect}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
]

NOT_BUILT = "This page is not built on this server: run `make console` (or `make setup`).\n"


@dataclass
class Site:
    """A folder of static files, and files made by the service at start (settings the
    page reads, say), by name."""

    folder: Path
    made: dict[str, bytes] = field(default_factory=dict)
    # Origins the page may call besides its own (another service's web port).
    connects_to: tuple[str, ...] = ()


class Pages:
    """The files of a site under `prefix` (which ends with "/"; "index.html" for the
    prefix itself), in front of `app`."""

    def __init__(self, app: Any, prefix: str, site: Site) -> None:
        self._app = app
        self._prefix = prefix
        self._folder = site.folder.resolve()
        self._made = site.made
        extra = "".join(f" {origin}" for origin in site.connects_to)
        self._headers = [
            (b"content-security-policy", POLICY.format(connect=extra).encode()),
            *HEADERS,
        ]

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
        made = self._made.get(path[len(self._prefix) :])
        if made is not None:
            headers = [(b"content-type", TYPES[".json"].encode()), *self._headers]
            await _answer(send, 200, made, headers)
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
            [(b"content-type", TYPES[found.suffix].encode()), *self._headers],
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
