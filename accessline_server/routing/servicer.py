"""gRPC methods of RoutingService: validate the request, call the domain, map the answer.
Domain errors become statuses in the runtime's error interceptor."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from accessline.common.v1 import common_pb2
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline.routing.v1 import routing_pb2_grpc as rt_grpc
from accessline_server.routing import contact, hours
from accessline_server.routing.callbacks import Callbacks
from accessline_server.routing.domain import Router
from accessline_server.routing.notify import NotifyRequests
from accessline_server.runtime.clock import seconds
from accessline_server.runtime.contextdata import check_context
from accessline_server.runtime.phone import NumberFormatError, normalize_number
from accessline_server.runtime.server import ServicerContext
from accessline_server.runtime.streams import until
from accessline_server.runtime.validation import Violations

MAX_WINDOW = 7 * 24 * 3600.0


def check_channel(v: Violations, field: str, channel: int) -> None:
    if channel and channel not in common_pb2.Channel.values():
        v.add(field, "is not a known channel")


class RoutingServicer(rt_grpc.RoutingServiceServicer):
    """The RoutingService contract on top of the domain."""

    def __init__(
        self,
        router: Router,
        callbacks: Callbacks,
        notify: NotifyRequests,
        stopping: asyncio.Event,
    ) -> None:
        self._router = router
        self._callbacks = callbacks
        self._notify = notify
        self._stopping = stopping

    async def RouteInboundCall(
        self, request: rt_pb2.RouteInboundCallRequest, context: ServicerContext
    ) -> AsyncIterator[rt_pb2.RouteInboundCallResponse]:
        v = Violations()
        v.id("call_id", request.call_id, long=True)
        v.text("resume_token", request.resume_token, 512)
        v.text("dnis", request.dnis, 256, required=not request.resume_token)
        v.text("ani", request.ani, 256)
        v.dtmf("dtmf_digits", request.dtmf_digits)
        v.raise_if_any()
        events = (
            self._router.resume(request) if request.resume_token else self._router.route(request)
        )
        async for event in events:
            yield event

    async def EstimateWait(
        self, request: rt_pb2.EstimateWaitRequest, context: ServicerContext
    ) -> rt_pb2.EstimateWaitResponse:
        v = Violations()
        v.id("resource_group", request.resource_group)
        check_channel(v, "channel", request.channel)
        v.raise_if_any()
        return await self._router.estimates.estimate_wait(request.resource_group, request.channel)

    async def RequestNotifyWhenAvailable(
        self, request: rt_pb2.RequestNotifyWhenAvailableRequest, context: ServicerContext
    ) -> rt_pb2.RequestNotifyWhenAvailableResponse:
        v = Violations()
        v.id("session_id", request.session_id, required=False)
        v.id("customer_id", request.customer_id)
        v.id("resource_group", request.resource_group)
        check_channel(v, "channel", request.channel)
        handoff = request.handoff
        v.id("handoff.application_id", handoff.application_id)
        if handoff.customer_id and handoff.customer_id != request.customer_id:
            v.add("handoff.customer_id", "must be empty or the request's customer_id")
        if handoff.idempotency_key:
            v.add("handoff.idempotency_key", "is set by Routing (the request id); leave it empty")
        v.text("handoff.ani_hint", handoff.ani_hint, 256)
        v.region("handoff.default_region", handoff.default_region)
        check_context(handoff.context, v, "handoff.context")
        v.raise_if_any()
        return await self._notify.request(request)

    async def SnoozeNotifyWhenAvailable(
        self, request: rt_pb2.SnoozeNotifyWhenAvailableRequest, context: ServicerContext
    ) -> rt_pb2.SnoozeNotifyWhenAvailableResponse:
        v = Violations()
        v.id("request_id", request.request_id)
        snooze = v.duration("snooze", request.snooze, 60, 86_400)
        v.raise_if_any()
        return await self._notify.snooze(request.request_id, snooze)

    async def CancelNotifyWhenAvailable(
        self, request: rt_pb2.CancelNotifyWhenAvailableRequest, context: ServicerContext
    ) -> rt_pb2.CancelNotifyWhenAvailableResponse:
        v = Violations()
        v.id("request_id", request.request_id)
        v.raise_if_any()
        await self._notify.cancel(request.request_id)
        return rt_pb2.CancelNotifyWhenAvailableResponse()

    async def RequestCallback(
        self, request: rt_pb2.RequestCallbackRequest, context: ServicerContext
    ) -> rt_pb2.RequestCallbackResponse:
        v = Violations()
        v.id("session_id", request.session_id, required=False)
        v.id("customer_id", request.customer_id)
        v.id("application_id", request.application_id)
        v.id("resource_group", request.resource_group)
        v.id("idempotency_key", request.idempotency_key, required=False, long=True)
        phone = ""
        try:
            phone = normalize_number(request.phone_number)
        except NumberFormatError as exc:
            v.add("phone_number", f"must be an E.164 number: {exc}")
        now = time.time()
        earliest = seconds(request.earliest) if request.HasField("earliest") else now
        if not request.HasField("latest"):
            v.add("latest", "is required")
        else:
            latest = seconds(request.latest)
            if latest <= max(now, earliest):
                v.add("latest", "must be after now and after earliest")
            elif latest - max(now, earliest) > MAX_WINDOW:
                v.add("latest", "the window must be at most 7 days")
            if earliest - now > MAX_WINDOW:
                v.add("earliest", "must be within 7 days from now")
        check_context(request.context, v)
        v.raise_if_any()
        checked = rt_pb2.RequestCallbackRequest()
        checked.CopyFrom(request)
        checked.phone_number = phone
        return rt_pb2.RequestCallbackResponse(callback=await self._callbacks.request(checked))

    async def GetCallback(
        self, request: rt_pb2.GetCallbackRequest, context: ServicerContext
    ) -> rt_pb2.GetCallbackResponse:
        v = Violations()
        v.id("callback_id", request.callback_id)
        v.raise_if_any()
        return rt_pb2.GetCallbackResponse(callback=await self._callbacks.get(request.callback_id))

    async def CancelCallback(
        self, request: rt_pb2.CancelCallbackRequest, context: ServicerContext
    ) -> rt_pb2.CancelCallbackResponse:
        v = Violations()
        v.id("callback_id", request.callback_id)
        v.raise_if_any()
        await self._callbacks.cancel(request.callback_id)
        return rt_pb2.CancelCallbackResponse()

    async def StreamCallbackDials(
        self, request: rt_pb2.StreamCallbackDialsRequest, context: ServicerContext
    ) -> AsyncIterator[rt_pb2.StreamCallbackDialsResponse]:
        v = Violations()
        v.id("switch_id", request.switch_id)
        v.raise_if_any()
        async for dial in until(
            self._callbacks.stream_dials(request.switch_id, self._stopping), self._stopping
        ):
            yield dial

    async def ReportCallbackAttempt(
        self, request: rt_pb2.ReportCallbackAttemptRequest, context: ServicerContext
    ) -> rt_pb2.ReportCallbackAttemptResponse:
        v = Violations()
        v.id("callback_id", request.callback_id)
        if request.outcome not in rt_pb2.CallbackAttemptOutcome.values() or not request.outcome:
            v.add("outcome", "must be CONNECTED, NO_ANSWER, BUSY or FAILED")
        v.raise_if_any()
        return rt_pb2.ReportCallbackAttemptResponse(
            callback=await self._callbacks.report(request.callback_id, request.outcome)
        )

    async def SetBusinessHours(
        self, request: rt_pb2.SetBusinessHoursRequest, context: ServicerContext
    ) -> rt_pb2.SetBusinessHoursResponse:
        v = Violations()
        v.id("resource_group", request.resource_group)
        if request.HasField("hours"):
            hours.check_hours(v, "hours", request.hours)
        v.raise_if_any()
        given = request.hours if request.HasField("hours") else None
        await hours.put(self._router.store, request.resource_group, given)
        return rt_pb2.SetBusinessHoursResponse()

    async def GetBusinessHours(
        self, request: rt_pb2.GetBusinessHoursRequest, context: ServicerContext
    ) -> rt_pb2.GetBusinessHoursResponse:
        v = Violations()
        v.id("resource_group", request.resource_group)
        v.raise_if_any()
        return await contact.business_hours(self._router.store, request.resource_group)

    async def GetContactOptions(
        self, request: rt_pb2.GetContactOptionsRequest, context: ServicerContext
    ) -> rt_pb2.GetContactOptionsResponse:
        v = Violations()
        v.id("application_id", request.application_id)
        v.text("customer_id", request.customer_id, 128, required=True)
        v.id("resource_group", request.resource_group)
        v.raise_if_any()
        return await contact.contact_options(
            self._router.store, self._router.estimates, request.resource_group
        )
