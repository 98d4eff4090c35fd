"""Applications: the apps that hand customers off, each with its match schema and rules
for the context its sessions carry."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline_server.callmatching import keys
from accessline_server.callmatching.sessions import DEFAULT_MAX_CODE_ATTEMPTS, DEFAULT_SESSION_TTL
from accessline_server.runtime.errors import NotFound
from accessline_server.runtime.masks import (
    check_etag,
    check_whole,
    merged,
    put_if_unchanged,
    with_etag,
)
from accessline_server.runtime.store import Entry, Store
from accessline_server.runtime.validation import Violations

# The applications a replica keeps as it last read them (more are read afresh).
MAX_RECENT = 10_000


class Applications:
    """The registered applications, in etcd; each replica keeps the versions it last
    read for StartHandoff, whose transaction holds only while the application is still
    the version it used (see `recent`)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._recent: dict[str, Entry[cm_pb2.Application]] = {}

    async def register(self, app: cm_pb2.Application) -> cm_pb2.Application:
        stored = _completed(app)
        self._recent.pop(app.application_id, None)
        revision = await self._store.put(keys.app(app.application_id), stored)
        return with_etag(stored, revision)

    async def update(
        self,
        app: cm_pb2.Application,
        mask: Sequence[str],
        check: Callable[[cm_pb2.Application, Violations], None],
    ) -> cm_pb2.Application:
        """The application with the fields of `mask` taken from `app`, if it is still the
        version of `app.etag` (when given) and valid as a whole."""
        current = await self._entry(app.application_id)
        revision = current.meta.mod_revision
        check_etag(
            app.etag,
            revision,
            f"application {app.application_id}",
            {"application_id": app.application_id},
        )
        updated = merged(current.value, app, mask)
        check_whole(check, updated)
        stored = _completed(updated)
        self._recent.pop(app.application_id, None)
        written = await put_if_unchanged(
            self._store, keys.app(app.application_id), revision, stored, "the application"
        )
        return with_etag(stored, written)

    async def _entry(self, application_id: str) -> Entry[cm_pb2.Application]:
        entry = await self._store.get(keys.app(application_id), cm_pb2.Application)
        if entry is None:
            raise NotFound(
                f"application {application_id} is not registered",
                reason="APPLICATION_NOT_FOUND",
                metadata={"application_id": application_id},
            )
        return entry

    async def recent(self, application_id: str) -> Entry[cm_pb2.Application]:
        """The application as this replica last read it (read now if it has not): its
        user compares its mod revision in the transaction it writes with it, and takes
        a refusal the application's rules made only once `changed` says no."""
        entry = self._recent.get(application_id)
        return entry if entry is not None else await self.fresh(application_id)

    async def fresh(self, application_id: str) -> Entry[cm_pb2.Application]:
        """The application as it is now (NOT_FOUND when it is not registered), kept."""
        self._recent.pop(application_id, None)
        entry = await self._entry(application_id)
        if len(self._recent) >= MAX_RECENT:
            self._recent.clear()
        self._recent[application_id] = entry
        return entry

    async def changed(self, used: Entry[cm_pb2.Application]) -> bool:
        """Whether the application changed since the version `used` (read afresh)."""
        current = await self.fresh(used.value.application_id)
        return current.meta.mod_revision != used.meta.mod_revision

    async def answered(self, application_id: str) -> cm_pb2.Application:
        """The application with its version, as GetApplication answers it."""
        entry = await self._entry(application_id)
        return with_etag(entry.value, entry.meta.mod_revision)

    async def page(self, page_size: int, page_token: str) -> tuple[list[cm_pb2.Application], str]:
        entries, _ = await self._store.get_prefix(
            keys.APPS,
            cm_pb2.Application,
            limit=page_size + 1,
            start_after=keys.app(page_token) if page_token else None,
        )
        apps = [with_etag(e.value, e.meta.mod_revision) for e in entries[:page_size]]
        return apps, apps[-1].application_id if len(entries) > page_size else ""


def _completed(app: cm_pb2.Application) -> cm_pb2.Application:
    """The application as stored: its defaults filled in, no etag."""
    stored = cm_pb2.Application()
    stored.CopyFrom(app)
    stored.ClearField("etag")
    if not stored.HasField("default_session_ttl"):
        stored.default_session_ttl.FromSeconds(int(DEFAULT_SESSION_TTL))
    if not stored.max_code_attempts:
        stored.max_code_attempts = DEFAULT_MAX_CODE_ATTEMPTS
    return stored
