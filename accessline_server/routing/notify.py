"""Notify-when-available requests: a customer asks to be told when an agent of a group
is free. The request waits in etcd (under a lease ending at its expiry) until the
dispatch leader holds an agent for the customer (holds.py); the customer may snooze it
or cancel it."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from accessline.common.v1 import common_pb2
from accessline.routing.storage.v1 import storage_pb2 as rt_store
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline_server.routing import hours, journal, keys
from accessline_server.routing.queue import Rules
from accessline_server.runtime import identity
from accessline_server.runtime.clock import seconds, timestamp
from accessline_server.runtime.errors import (
    FailedPrecondition,
    NotFound,
)
from accessline_server.runtime.sealing import Sealer
from accessline_server.runtime.store import Compare, Entry, Op, Store

if TYPE_CHECKING:
    pass

log = logging.getLogger("accessline.routing")


class NotifyRequests:
    """RequestNotifyWhenAvailable, Snooze and Cancel: records the dispatch leader reads."""

    def __init__(
        self, store: Store, rules: Rules, sealer: Sealer, wake: Callable[[], None]
    ) -> None:
        self._store = store
        self._rules = rules
        self._sealer = sealer
        self._wake = wake

    async def request(
        self, request: rt_pb2.RequestNotifyWhenAvailableRequest
    ) -> rt_pb2.RequestNotifyWhenAvailableResponse:
        now = time.time()
        request_id = "nw" + secrets.token_urlsafe(12)
        expires = now + self._rules.notify_max
        record = rt_store.NotifyRequest(
            request_id=request_id,
            request=request,
            sealed_handoff=self._sealer.seal(request.handoff.SerializeToString(), request_id),
            application_id=request.handoff.application_id,
        )
        record.request.ClearField("handoff")
        if not record.request.channel:
            record.request.channel = common_pb2.CHANNEL_DESK_VOICE
        record.created_at.CopyFrom(timestamp(now))
        record.active_at.CopyFrom(timestamp(now))
        record.expires_at.CopyFrom(timestamp(expires))
        lease = await self._store.shared_lease(self._rules.notify_max, window=10.0)
        await self._store.put(keys.notify(request_id), record, lease)
        journal.notify_request(
            record.application_id,
            request_id,
            journal.PENDING,
            customer_id=request.customer_id,
            resource_group=request.resource_group,
            topic=request.handoff.context.subject,
        )
        self._wake()
        return rt_pb2.RequestNotifyWhenAvailableResponse(
            request_id=request_id, expires_at=record.expires_at
        )

    async def _get(self, request_id: str) -> Entry[rt_store.NotifyRequest]:
        entry = await self._store.get(keys.notify(request_id), rt_store.NotifyRequest)
        if entry is None:
            raise NotFound(
                f"notify request {request_id} is unknown, answered, cancelled or expired",
                reason="NOTIFY_REQUEST_NOT_FOUND",
            )
        identity.require_application(entry.value.application_id, f"notify request {request_id}")
        return entry

    async def snooze(
        self, request_id: str, snooze: float
    ) -> rt_pb2.SnoozeNotifyWhenAvailableResponse:
        entry = await self._get(request_id)
        updated = rt_store.NotifyRequest()
        updated.CopyFrom(entry.value)
        updated.active_at.CopyFrom(
            timestamp(await self._next_open(entry.value.request.resource_group, snooze))
        )
        if seconds(updated.active_at) >= seconds(updated.expires_at):
            raise FailedPrecondition(
                "the request expires before the snooze ends", reason="SNOOZE_PAST_EXPIRY"
            )
        result = await self._store.txn(
            [Compare.modified_at(entry.key, entry.meta.mod_revision)],
            [Op.put(entry.key, updated, entry.meta.lease)],
        )
        if not result.succeeded:
            raise FailedPrecondition(
                f"notify request {request_id} was answered meanwhile",
                reason="NOTIFY_REQUEST_ANSWERED",
            )
        return rt_pb2.SnoozeNotifyWhenAvailableResponse(active_again_at=updated.active_at)

    async def _next_open(self, group: str, snooze: float) -> float:
        """When a snooze ends: after `snooze`, at the group's next opening if it is
        closed then (past the request's expiry when none is near)."""
        wakes = time.time() + snooze
        calendar = await hours.calendar(self._store, group)
        if calendar is None:
            return wakes
        open_then, opens, _ = calendar.state(wakes)
        if open_then:
            return wakes
        if opens is None:
            raise FailedPrecondition(
                f"group {group} does not open again before the request expires",
                reason="SNOOZE_PAST_EXPIRY",
            )
        return opens

    async def cancel(self, request_id: str) -> None:
        entry = await self._get(request_id)
        result = await self._store.txn(
            [Compare.modified_at(entry.key, entry.meta.mod_revision)], [Op.delete(entry.key)]
        )
        if result.succeeded:
            journal.notify_request(
                entry.value.application_id, request_id, journal.CLOSED, outcome="CANCELLED"
            )
