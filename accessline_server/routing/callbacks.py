"""Callbacks.

A callback is queued like an inbound call (its entry has no lease and is not dispatched
before its window opens); when an agent accepts it, a dial is written for the switch's
StreamCallbackDials stream. A failed dial is retried within the window up to the
configured number of attempts, and the customer is told the agent tried. A customer has
at most one open callback per group (`rt/callback-owners/{group}/{customer}`).
Notify-when-available requests are notify.py's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from accessline.access.v1 import access_pb2
from accessline.notification.v1 import notification_pb2 as nt_pb2
from accessline.routing.storage.v1 import storage_pb2 as rt_store
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline_server.notification import events
from accessline_server.presence import offers as pr_offers
from accessline_server.routing import dials, hours, journal, keys, private
from accessline_server.routing.queue import Rules, interaction_for
from accessline_server.routing.settle import withdraw_offer
from accessline_server.runtime import identity
from accessline_server.runtime.clock import seconds, timestamp
from accessline_server.runtime.election import Term
from accessline_server.runtime.errors import (
    AccesslineError,
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
)
from accessline_server.runtime.kept import Kept
from accessline_server.runtime.sealing import Sealer
from accessline_server.runtime.store import Compare, Entry, Op, Store

if TYPE_CHECKING:
    from accessline.notification.v1.notification_pb2_grpc import NotificationServiceAsyncStub

log = logging.getLogger("accessline.routing")

QI = rt_store.QueuedInteraction
FINAL = (
    rt_pb2.CALLBACK_STATE_COMPLETED,
    rt_pb2.CALLBACK_STATE_FAILED,
    rt_pb2.CALLBACK_STATE_CANCELLED,
)


class Callbacks:
    """RequestCallback, GetCallback, CancelCallback, StreamCallbackDials and
    ReportCallbackAttempt on top of etcd."""

    def __init__(
        self,
        store: Store,
        notification: NotificationServiceAsyncStub,
        rules: Rules,
        sealer: Sealer,
        wake: Callable[[], None],
    ) -> None:
        self._store = store
        self._notification = notification
        self._rules = rules
        self._sealer = sealer
        self._wake = wake
        self._kept = Kept()  # writes that run to their end when their caller gives up

    def _details(self, stored: rt_store.StoredCallback) -> rt_store.CallbackDetails:
        return rt_store.CallbackDetails.FromString(
            self._sealer.unseal(stored.sealed_details, stored.callback.callback_id)
        )

    async def request(self, request: rt_pb2.RequestCallbackRequest) -> rt_pb2.Callback:
        now = time.time()
        earliest = seconds(request.earliest) if request.HasField("earliest") else now
        earliest, latest = await hours.callback_window(
            self._store, request.resource_group, max(earliest, now), seconds(request.latest)
        )
        callback_id = "cb" + secrets.token_urlsafe(12)
        public = rt_pb2.Callback(
            callback_id=callback_id,
            state=rt_pb2.CALLBACK_STATE_QUEUED,
            resource_group=request.resource_group,
            latest=timestamp(latest),
        )
        public.earliest.CopyFrom(timestamp(earliest))
        stored = rt_store.StoredCallback(
            callback=public,
            session_id=request.session_id,
            customer_id=request.customer_id,
            application_id=request.application_id,
            idempotency_key=request.idempotency_key,
            sealed_details=self._sealer.seal(
                rt_store.CallbackDetails(
                    phone_number=request.phone_number, context=request.context
                ).SerializeToString(),
                callback_id,
            ),
        )
        item = interaction_for(
            interaction_id=callback_id,
            kind=rt_store.INTERACTION_KIND_CALLBACK,
            group=request.resource_group,
            context=request.context,
            rules=self._rules,
            now=now,
            sealer=self._sealer,
        )
        item.not_before.CopyFrom(public.earliest)
        item.deadline.CopyFrom(public.latest)
        item.session_id = request.session_id
        item.customer_id = request.customer_id
        item.application_id = request.application_id
        if item.preferred_agent_id:
            item.preferred_until.CopyFrom(timestamp(max(earliest, now) + self._rules.owner_wait))
        owner_key = keys.callback_owner(self._sealer, request.resource_group, request.customer_id)
        result = await self._store.txn(
            [Compare.absent(owner_key)],
            [
                Op.put(owner_key, rt_store.CallbackOwner(callback_id=callback_id)),
                Op.put(keys.callback(callback_id), stored),
                Op.put(keys.queued(request.resource_group, callback_id), item),
                *await self._told(stored, events.CALLBACK_SCHEDULED),
            ],
            [Op.get(owner_key)],
        )
        if result.succeeded:
            journal.callback(
                stored,
                journal.PENDING,
                topic=request.context.subject,
                transaction_id=request.context.service_request_id,
            )
            self._wake()
            return public
        found = result.first()
        existing_id = rt_store.CallbackOwner.FromString(found.value).callback_id if found else ""
        existing = await self._store.get(keys.callback(existing_id), rt_store.StoredCallback)
        if (
            existing is not None
            and request.idempotency_key
            and existing.value.idempotency_key == request.idempotency_key
        ):
            return existing.value.callback
        raise AlreadyExists(
            "the customer already has an open callback for this group",
            reason="CALLBACK_EXISTS",
            metadata={"callback_id": existing_id},
        )

    async def _get(self, callback_id: str) -> Entry[rt_store.StoredCallback]:
        entry = await self._store.get(keys.callback(callback_id), rt_store.StoredCallback)
        if entry is None:
            raise NotFound(
                f"callback {callback_id} is unknown or finished longer ago than the retention",
                reason="CALLBACK_NOT_FOUND",
            )
        return entry

    async def _yours(self, callback_id: str) -> Entry[rt_store.StoredCallback]:
        """A callback the caller may see: one of its own applications'."""
        entry = await self._get(callback_id)
        identity.require_application(entry.value.application_id, f"callback {callback_id}")
        return entry

    async def get(self, callback_id: str) -> rt_pb2.Callback:
        return (await self._yours(callback_id)).value.callback

    async def _told(
        self,
        stored: rt_store.StoredCallback,
        event: nt_pb2.WebhookEventType.ValueType,
        **more: str,
    ) -> list[Op]:
        """The webhook event of a callback (its application's backend is told), for the
        transaction of what happened."""
        if not stored.application_id:
            return []
        data = {
            "callback_id": stored.callback.callback_id,
            "session_id": stored.session_id,
            "customer_id": stored.customer_id,
            **more,
        }
        return await events.event_ops(
            self._store,
            event,
            stored.application_id,
            data,
            time.time(),
        )

    async def _finish_ops(
        self,
        entry: Entry[rt_store.StoredCallback],
        state: rt_pb2.CallbackState.ValueType,
        reason: str = "",
    ) -> list[Op]:
        """Ends a callback: kept for the retention period, its customer free to ask again;
        its backend told it completed, or failed and why."""
        done = rt_store.StoredCallback()
        done.CopyFrom(entry.value)
        done.callback.state = state
        retention = await self._store.shared_lease(self._rules.callback_retention, window=10.0)
        cb = done.callback
        return [
            Op.put(entry.key, done, retention),
            Op.delete(keys.callback_owner(self._sealer, cb.resource_group, done.customer_id)),
            Op.delete(keys.queued(cb.resource_group, cb.callback_id)),
            Op.delete(keys.dial(cb.callback_id)),
            *(
                await self._told(done, events.CALLBACK_COMPLETED)
                if state == rt_pb2.CALLBACK_STATE_COMPLETED
                else await self._told(done, events.CALLBACK_FAILED, reason=reason)
            ),
        ]

    async def cancel(self, callback_id: str) -> None:
        for _ in range(5):
            entry = await self._yours(callback_id)
            state = entry.value.callback.state
            if state in FINAL:
                raise FailedPrecondition(
                    f"callback {callback_id} is already {rt_pb2.CallbackState.Name(state)}",
                    reason="CALLBACK_FINISHED",
                )
            if state == rt_pb2.CALLBACK_STATE_DIALLING:
                raise FailedPrecondition(
                    f"the switch is dialling callback {callback_id}; report the attempt instead",
                    reason="CALLBACK_DIALLING",
                )
            queued_key = keys.queued(entry.value.callback.resource_group, callback_id)
            queued = await self._store.get(queued_key, QI)
            compares = [Compare.modified_at(entry.key, entry.meta.mod_revision)]
            if queued is not None:
                compares.append(Compare.modified_at(queued_key, queued.meta.mod_revision))
            ops = await self._finish_ops(entry, rt_pb2.CALLBACK_STATE_CANCELLED, "cancelled")
            if queued is not None and queued.value.offer.agent_id:
                # The agent may have accepted already: their interaction ends with it.
                ops.append(
                    pr_offers.interaction_abandoned(queued.value.offer.agent_id, callback_id)
                )
            # To its end even if the caller gives up meanwhile: an offer left out once the
            # callback is cancelled would time out, counted against the agent.
            if await self._kept.run(self._cancelled(compares, ops, entry.value, queued)):
                return
        raise FailedPrecondition(
            f"callback {callback_id} keeps changing; try again", reason="CALLBACK_BUSY"
        )

    async def _reported(
        self,
        compares: list[Compare],
        ops: list[Op],
        stored: rt_store.StoredCallback,
        final_state: rt_pb2.CallbackState.ValueType,
        told: bool,
    ) -> rt_pb2.Callback | None:
        if not (await self._store.txn(compares, ops)).succeeded:
            return None
        journal.callback_attempt(stored, final_state)
        after = rt_pb2.Callback()
        after.CopyFrom(stored.callback)
        after.state = final_state
        if told:
            await self._tell_customer(stored, final=final_state == rt_pb2.CALLBACK_STATE_FAILED)
        self._wake()
        return after

    async def _cancelled(
        self,
        compares: list[Compare],
        ops: list[Op],
        stored: rt_store.StoredCallback,
        queued: Entry[QI] | None,
    ) -> bool:
        if not (await self._store.txn(compares, ops)).succeeded:
            return False
        journal.callback(stored, journal.CLOSED, outcome="CANCELLED")
        if queued is not None:
            await withdraw_offer(self._store, queued.value)
        return True

    async def accepted(self, entry: Entry[QI], target: rt_store.ConnectTarget, term: Term) -> None:
        """The dispatch leader's hook when an agent accepted a callback: the callback is
        dialling and the switch gets the dial. NotLeader when the fence failed."""
        stored = await self._store.get(
            keys.callback(entry.value.interaction_id), rt_store.StoredCallback
        )
        if stored is None or stored.value.callback.state != rt_pb2.CALLBACK_STATE_QUEUED:
            return
        updated = rt_store.StoredCallback()
        updated.CopyFrom(stored.value)
        updated.callback.state = rt_pb2.CALLBACK_STATE_DIALLING
        updated.callback.attempts += 1
        details = self._details(updated)
        dial = rt_store.PendingDial(
            created_at=timestamp(time.time()),
            sealed_dial=self._sealer.seal(
                rt_pb2.StreamCallbackDialsResponse(
                    callback_id=updated.callback.callback_id,
                    phone_number=details.phone_number,
                    agent_id=target.agent_id,
                    agent_address=private.target_address(self._sealer, target),
                    context=details.context,
                ).SerializeToString(),
                updated.callback.callback_id,
            ),
        )
        result = await self._store.txn(
            [
                term.fence(),
                Compare.modified_at(entry.key, entry.meta.mod_revision),
                Compare.modified_at(stored.key, stored.meta.mod_revision),
            ],
            [
                Op.delete(entry.key),
                Op.put(stored.key, updated),
                Op.put(keys.dial(updated.callback.callback_id), dial),
            ],
            [term.read()],
        )
        # Failed otherwise (the call or the callback changed meanwhile): the next pass
        # sees it as it is now.
        term.check(result)

    async def sweep(
        self, queued: list[Entry[QI]], dials: list[Entry[rt_store.PendingDial]], now: float
    ) -> None:
        """Run by the dispatch leader: fails queued callbacks whose window closed, and
        counts a dial no switch reported in time as a failed attempt."""
        for dial in dials:
            if seconds(dial.value.created_at) + self._rules.callback_dial_timeout <= now:
                callback_id = dial.key.removeprefix(keys.DIALS)
                log.warning("callback %s: the dial was not reported in time", callback_id)
                with contextlib.suppress(FailedPrecondition, NotFound):
                    await self.report(callback_id, rt_pb2.CALLBACK_ATTEMPT_OUTCOME_FAILED)
        for item in queued:
            value = item.value
            if (
                value.kind == rt_store.INTERACTION_KIND_CALLBACK
                and value.state == rt_store.INTERACTION_STATE_QUEUED
                and value.HasField("deadline")
                and seconds(value.deadline) <= now
            ):
                entry = await self._store.get(
                    keys.callback(value.interaction_id), rt_store.StoredCallback
                )
                if entry is None:
                    await self._store.txn(
                        [Compare.modified_at(item.key, item.meta.mod_revision)],
                        [Op.delete(item.key)],
                    )
                    continue
                ops = await self._finish_ops(entry, rt_pb2.CALLBACK_STATE_FAILED, "window_closed")
                compares = [
                    Compare.modified_at(item.key, item.meta.mod_revision),
                    Compare.modified_at(entry.key, entry.meta.mod_revision),
                ]
                if (await self._store.txn(compares, ops)).succeeded:
                    journal.callback(entry.value, journal.CLOSED, outcome="WINDOW_CLOSED")
                    await self._tell_customer(entry.value, final=True)

    def stream_dials(
        self, switch_id: str, stopping: asyncio.Event
    ) -> AsyncIterator[rt_pb2.StreamCallbackDialsResponse]:
        return dials.stream(self._store, self._sealer, switch_id, stopping)

    async def report(
        self, callback_id: str, outcome: rt_pb2.CallbackAttemptOutcome.ValueType
    ) -> rt_pb2.Callback:
        caller = identity.current()
        if not caller.trusted:
            # Only the switch that took the dial reports on it.
            dial = await self._store.get(keys.dial(callback_id), rt_store.PendingDial)
            taker = dial.value.taken_by.split("/", 1)[0] if dial is not None else ""
            if not caller.owns(access_pb2.SCOPE_KIND_SWITCH, taker):
                raise PermissionDenied(
                    f"callback {callback_id} is not being dialled by your switch",
                    reason="OUT_OF_SCOPE",
                    metadata={"scope": "switch"},
                )
        for _ in range(5):
            entry = await self._get(callback_id)
            cb = entry.value.callback
            if cb.state != rt_pb2.CALLBACK_STATE_DIALLING:
                raise FailedPrecondition(
                    f"callback {callback_id} is not being dialled "
                    f"({rt_pb2.CallbackState.Name(cb.state)})",
                    reason="CALLBACK_NOT_DIALLING",
                )
            compares = [Compare.modified_at(entry.key, entry.meta.mod_revision)]
            now = time.time()
            retry_at = now + self._rules.callback_retry
            if outcome == rt_pb2.CALLBACK_ATTEMPT_OUTCOME_CONNECTED:
                ops = await self._finish_ops(entry, rt_pb2.CALLBACK_STATE_COMPLETED)
                final_state = rt_pb2.CALLBACK_STATE_COMPLETED
            elif cb.attempts < self._rules.callback_max_attempts and retry_at < seconds(cb.latest):
                again = rt_store.StoredCallback()
                again.CopyFrom(entry.value)
                again.callback.state = rt_pb2.CALLBACK_STATE_QUEUED
                item = interaction_for(
                    interaction_id=callback_id,
                    kind=rt_store.INTERACTION_KIND_CALLBACK,
                    group=cb.resource_group,
                    context=self._details(entry.value).context,
                    rules=self._rules,
                    now=now,
                    sealer=self._sealer,
                )
                item.created_at.CopyFrom(cb.earliest)
                item.not_before.CopyFrom(timestamp(retry_at))
                item.deadline.CopyFrom(cb.latest)
                item.customer_id = entry.value.customer_id
                item.session_id = entry.value.session_id
                item.application_id = entry.value.application_id
                ops = [
                    Op.put(entry.key, again),
                    Op.put(keys.queued(cb.resource_group, callback_id), item),
                    Op.delete(keys.dial(callback_id)),
                ]
                final_state = rt_pb2.CALLBACK_STATE_QUEUED
            else:
                ops = await self._finish_ops(entry, rt_pb2.CALLBACK_STATE_FAILED, "not_reached")
                final_state = rt_pb2.CALLBACK_STATE_FAILED
            attempted = rt_pb2.CallbackAttemptOutcome.Name(outcome).removeprefix(
                "CALLBACK_ATTEMPT_OUTCOME_"
            )
            ops += await self._told(
                entry.value, events.CALLBACK_ATTEMPTED, outcome=attempted.lower()
            )
            # To its end even if the switch gives up meanwhile: the customer is told.
            told = outcome != rt_pb2.CALLBACK_ATTEMPT_OUTCOME_CONNECTED
            after = await self._kept.run(
                self._reported(compares, ops, entry.value, final_state, told)
            )
            if after is not None:
                return after
        raise FailedPrecondition(
            f"callback {callback_id} keeps changing; try again", reason="CALLBACK_BUSY"
        )

    async def _tell_customer(self, stored: rt_store.StoredCallback, *, final: bool) -> None:
        """Tells the customer the agent tried to call (only ids in the payload)."""
        cb = stored.callback
        publish = nt_pb2.PublishRequest(
            customer_id=stored.customer_id,
            event_type=nt_pb2.EVENT_TYPE_CALLBACK_ATTEMPT_FAILED,
            title="We tried to call you",
            body="An agent could not reach you." + ("" if final else " We will try again shortly."),
            data={"callback_id": cb.callback_id},
            idempotency_key=f"callback-{cb.callback_id}-{cb.attempts}",
            priority=nt_pb2.PRIORITY_HIGH,
            collapse_key=f"callback-{cb.callback_id}",
            application_id=stored.application_id,
        )
        try:
            await self._notification.Publish(publish)
        except AccesslineError as exc:
            log.warning("could not tell the customer of callback %s: %s", cb.callback_id, exc)
