"""Applications: the apps that hand customers off, each with its match schema and rules
for the context its sessions carry."""

from __future__ import annotations

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline_server.callmatching import keys
from accessline_server.callmatching.sessions import DEFAULT_MAX_CODE_ATTEMPTS, DEFAULT_SESSION_TTL
from accessline_server.runtime.errors import NotFound
from accessline_server.runtime.store import Store


class Applications:
    """The registered applications, in etcd."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def register(self, app: cm_pb2.Application) -> cm_pb2.Application:
        stored = cm_pb2.Application()
        stored.CopyFrom(app)
        if not stored.HasField("default_session_ttl"):
            stored.default_session_ttl.FromSeconds(int(DEFAULT_SESSION_TTL))
        if not stored.max_code_attempts:
            stored.max_code_attempts = DEFAULT_MAX_CODE_ATTEMPTS
        await self._store.put(keys.app(app.application_id), stored)
        return stored

    async def get(self, application_id: str) -> cm_pb2.Application:
        entry = await self._store.get(keys.app(application_id), cm_pb2.Application)
        if entry is None:
            raise NotFound(
                f"application {application_id} is not registered",
                reason="APPLICATION_NOT_FOUND",
                metadata={"application_id": application_id},
            )
        return entry.value

    async def page(self, page_size: int, page_token: str) -> tuple[list[cm_pb2.Application], str]:
        entries, _ = await self._store.get_prefix(
            keys.APPS,
            cm_pb2.Application,
            limit=page_size + 1,
            start_after=keys.app(page_token) if page_token else None,
        )
        apps = [e.value for e in entries[:page_size]]
        return apps, apps[-1].application_id if len(entries) > page_size else ""
