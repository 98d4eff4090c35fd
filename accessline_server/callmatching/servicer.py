"""gRPC methods of CallMatchingService: validate the request, call the domain, map the
answer. Domain errors become statuses in the runtime's error interceptor."""

from __future__ import annotations

from typing import Any

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.callmatching.v1 import call_matching_pb2_grpc as cm_grpc
from accessline.common.v1 import common_pb2
from accessline_server.callmatching.domain import Call, CallMatching, Handoff
from accessline_server.callmatching.history import AttemptFilter
from accessline_server.runtime.contextdata import KEY, check_context
from accessline_server.runtime.masks import check_given, check_mask, updatable
from accessline_server.runtime.server import ServicerContext
from accessline_server.runtime.validation import Violations

MAX_DAY = 24 * 3600.0


def _us(ts: Any, present: bool) -> int | None:
    return int(ts.ToNanoseconds() // 1000) if present else None


def _check_application(app: cm_pb2.Application, v: Violations) -> None:
    v.id("application.application_id", app.application_id)
    v.text("application.display_name", app.display_name, 128)
    v.text("application.etag", app.etag, 64)
    if app.match_schema not in common_pb2.MatchSchema.values() or not app.match_schema:
        v.add("application.match_schema", "must be one of the MATCH_SCHEMA_ values")
    if app.HasField("default_session_ttl"):
        v.duration("application.default_session_ttl", app.default_session_ttl, 1, MAX_DAY)
    if len(app.required_context_keys) > 32:
        v.add("application.required_context_keys", "must have at most 32 entries")
    for i, key in enumerate(app.required_context_keys):
        if not KEY.match(key):
            v.add(
                f"application.required_context_keys[{i}]",
                "must be 1 to 64 characters of [A-Za-z0-9_.-]",
            )
    if not 0 <= app.max_code_attempts <= 20:
        v.add("application.max_code_attempts", "must be between 0 (default 3) and 20")


APPLICATION_UPDATABLE = updatable(cm_pb2.Application.DESCRIPTOR, ("application_id", "etag"))


class CallMatchingServicer(cm_grpc.CallMatchingServiceServicer):
    """The CallMatchingService contract on top of the domain."""

    def __init__(self, domain: CallMatching) -> None:
        self._domain = domain

    async def RegisterApplication(
        self, request: cm_pb2.RegisterApplicationRequest, context: ServicerContext
    ) -> cm_pb2.RegisterApplicationResponse:
        v = Violations()
        _check_application(request.application, v)
        v.raise_if_any()
        return cm_pb2.RegisterApplicationResponse(
            application=await self._domain.applications.register(request.application)
        )

    async def UpdateApplication(
        self, request: cm_pb2.UpdateApplicationRequest, context: ServicerContext
    ) -> cm_pb2.UpdateApplicationResponse:
        v = Violations()
        paths = list(request.update_mask.paths)
        check_mask(paths, cm_pb2.Application.DESCRIPTOR, APPLICATION_UPDATABLE, v)
        check_given(
            _check_application,
            request.application,
            paths,
            "application",
            v,
            ("application_id", "etag"),
        )
        v.raise_if_any()
        updated = await self._domain.applications.update(
            request.application, paths, _check_application
        )
        return cm_pb2.UpdateApplicationResponse(application=updated)

    async def GetApplication(
        self, request: cm_pb2.GetApplicationRequest, context: ServicerContext
    ) -> cm_pb2.GetApplicationResponse:
        v = Violations()
        v.id("application_id", request.application_id)
        v.raise_if_any()
        return cm_pb2.GetApplicationResponse(
            application=await self._domain.applications.answered(request.application_id)
        )

    async def ListApplications(
        self, request: cm_pb2.ListApplicationsRequest, context: ServicerContext
    ) -> cm_pb2.ListApplicationsResponse:
        v = Violations()
        size = v.page("page_size", request.page_size, 500, 100)
        v.id("page_token", request.page_token, required=False)
        v.raise_if_any()
        apps, token = await self._domain.applications.page(size, request.page_token)
        return cm_pb2.ListApplicationsResponse(applications=apps, next_page_token=token)

    async def StartHandoff(
        self, request: cm_pb2.StartHandoffRequest, context: ServicerContext
    ) -> cm_pb2.StartHandoffResponse:
        v = Violations()
        v.id("application_id", request.application_id)
        v.text("customer_id", request.customer_id, 128, required=True)
        check_context(request.context, v)
        v.text("ani_hint", request.ani_hint, 64)
        v.region("default_region", request.default_region)
        ttl = v.duration("ttl", request.ttl, 1, MAX_DAY) if request.HasField("ttl") else None
        v.text("idempotency_key", request.idempotency_key, 128)
        v.raise_if_any()
        return await self._domain.handoffs.start(
            Handoff(
                application_id=request.application_id,
                customer_id=request.customer_id,
                context=request.context,
                device_can_dial=request.device_can_dial,
                device_can_send_dtmf=request.device_can_send_dtmf,
                ani_hint=request.ani_hint,
                default_region=request.default_region,
                ttl=ttl,
                idempotency_key=request.idempotency_key,
            )
        )

    async def CancelHandoff(
        self, request: cm_pb2.CancelHandoffRequest, context: ServicerContext
    ) -> cm_pb2.CancelHandoffResponse:
        v = Violations()
        v.id("session_id", request.session_id)
        v.raise_if_any()
        await self._domain.handoffs.cancel(request.session_id)
        return cm_pb2.CancelHandoffResponse()

    async def MatchCall(
        self, request: cm_pb2.MatchCallRequest, context: ServicerContext
    ) -> cm_pb2.MatchCallResponse:
        v = Violations()
        v.id("call_id", request.call_id, long=True)
        v.text("dnis", request.dnis, 256, required=True)
        v.text("ani", request.ani, 256)
        v.dtmf("dtmf_digits", request.dtmf_digits)
        v.region("default_region", request.default_region)
        v.raise_if_any()
        arrived = (
            request.call_arrived_at.ToNanoseconds() / 1e9
            if request.HasField("call_arrived_at")
            else None
        )
        return await self._domain.matcher.match_call(
            Call(
                call_id=request.call_id,
                dnis=request.dnis,
                ani=request.ani,
                dtmf=request.dtmf_digits,
                arrived_at=arrived,
                default_region=request.default_region,
            )
        )

    async def GetSession(
        self, request: cm_pb2.GetSessionRequest, context: ServicerContext
    ) -> cm_pb2.GetSessionResponse:
        v = Violations()
        v.id("session_id", request.session_id)
        v.raise_if_any()
        return await self._domain.sessions.get(request.session_id)

    async def ListMatchAttempts(
        self, request: cm_pb2.ListMatchAttemptsRequest, context: ServicerContext
    ) -> cm_pb2.ListMatchAttemptsResponse:
        v = Violations()
        v.id("application_id", request.application_id, required=False)
        v.text("access_number", request.access_number, 256)
        if request.outcome not in cm_pb2.MatchOutcome.values():
            v.add("outcome", "unknown outcome")
        size = v.page("page_size", request.page_size, 1000, 100)
        v.text("page_token", request.page_token, 512)
        v.raise_if_any()
        found, token = await self._domain.history.list(
            AttemptFilter(
                start_us=_us(request.start_time, request.HasField("start_time")),
                end_us=_us(request.end_time, request.HasField("end_time")),
                application_id=request.application_id,
                access_number=request.access_number,
                outcome=request.outcome,
            ),
            size,
            request.page_token,
        )
        return cm_pb2.ListMatchAttemptsResponse(attempts=found, next_page_token=token)

    async def GetMatchStats(
        self, request: cm_pb2.GetMatchStatsRequest, context: ServicerContext
    ) -> cm_pb2.GetMatchStatsResponse:
        v = Violations()
        v.id("application_id", request.application_id)
        v.raise_if_any()
        return await self._domain.history.stats(
            request.application_id,
            _us(request.start_time, request.HasField("start_time")),
            _us(request.end_time, request.HasField("end_time")),
        )
