"""gRPC methods of JourneyService: validate, check the customer's own scope, call the
journey."""

from __future__ import annotations

import phonenumbers

from accessline.access.v1 import access_pb2
from accessline.journey.v1 import journey_pb2 as jn_pb2
from accessline.journey.v1 import journey_pb2_grpc as jn_grpc
from accessline_server.callmatching.journey import records, surveys
from accessline_server.callmatching.journey.reads import Journey, Query
from accessline_server.runtime import identity
from accessline_server.runtime.errors import PermissionDenied
from accessline_server.runtime.server import ServicerContext
from accessline_server.runtime.validation import Violations

OUTSIDE_CHANNELS = {
    jn_pb2.INTERACTION_CHANNEL_VOICE,
    jn_pb2.INTERACTION_CHANNEL_EMAIL,
    jn_pb2.INTERACTION_CHANNEL_TEXT,
    jn_pb2.INTERACTION_CHANNEL_CHAT,
}
STATUSES = set(jn_pb2.InteractionStatus.values()) - {0}
CHANNELS = set(jn_pb2.InteractionChannel.values()) - {0}


def _us(ts: object) -> int:
    return int(ts.ToNanoseconds() // 1000)  # type: ignore[attr-defined]


def _check_interaction(i: jn_pb2.Interaction, v: Violations) -> None:
    v.id("interaction.interaction_id", i.interaction_id, long=True)
    v.id("interaction.application_id", i.application_id)
    v.id("interaction.transaction_id", i.transaction_id, required=False, long=True)
    if i.channel not in OUTSIDE_CHANNELS:
        v.add(
            "interaction.channel", "must be VOICE, EMAIL, TEXT or CHAT (Accessline records its own)"
        )
    v.text("interaction.topic", i.topic, 128)
    if i.status not in STATUSES:
        v.add("interaction.status", "must be one of the INTERACTION_STATUS_ values")
    v.id("interaction.agent_id", i.agent_id, required=False)
    v.id("interaction.resource_group", i.resource_group, required=False)
    v.text("interaction.outcome", i.outcome, 128)


class JourneyServicer(jn_grpc.JourneyServiceServicer):
    """The JourneyService contract on top of the journey."""

    def __init__(self, journey: Journey) -> None:
        self._journey = journey

    @staticmethod
    def _only_own_application(application_id: str) -> None:
        """A customer's token must name the application (`accessline_applications`): a
        customer id is an application's own."""
        caller = identity.current()
        customer = caller.has(access_pb2.ROLE_CUSTOMER) and not caller.trusted
        if customer and not caller.owns_application(application_id):
            raise PermissionDenied(
                "a customer reaches only their own application's journey",
                reason="OUT_OF_SCOPE",
                metadata={"scope": "application"},
            )

    def _keys(
        self, c: jn_pb2.Correlation, application_id: str, v: Violations
    ) -> tuple[str | None, str | None]:
        v.text("correlation.customer_id", c.customer_id, 128)
        v.text("correlation.email", c.email, 128)
        v.text("correlation.phone_number", c.phone_number, 32)
        v.region("correlation.default_region", c.default_region)
        if c.email and "@" not in c.email:
            v.add("correlation.email", "must be an e-mail address")
        phone = None
        try:
            if len(c.phone_number) <= 32:
                phone = self._journey.correlator.phone(c.phone_number, c.default_region)
        except phonenumbers.NumberParseException:
            v.add(
                "correlation.phone_number",
                "must be a phone number (E.164, or national with default_region)",
            )
        email = self._journey.correlator.email(c.email) if len(c.email) <= 128 else None
        return phone, email

    async def RecordInteraction(
        self, request: jn_pb2.RecordInteractionRequest, context: ServicerContext
    ) -> jn_pb2.RecordInteractionResponse:
        v = Violations()
        i = request.interaction
        _check_interaction(i, v)
        phone, email = self._keys(request.correlation, i.application_id, v)
        c = request.correlation
        if not (c.customer_id or phone or email or i.transaction_id):
            v.add(
                "correlation",
                "name the customer (customer_id, phone_number or email) or a transaction",
            )
        v.raise_if_any()
        record = records.Record(
            application_id=i.application_id,
            interaction_id=i.interaction_id,
            channel=i.channel,
            status=i.status,
            customer_id=c.customer_id or None,
            phone_key=phone,
            email_key=email,
            transaction_id=i.transaction_id,
            topic=i.topic,
            agent_id=i.agent_id,
            resource_group=i.resource_group,
            outcome=i.outcome,
            source=jn_pb2.INTERACTION_SOURCE_OUTSIDE,
            at=_us(i.occurred_at) / 1e6 if i.HasField("occurred_at") else None,
        )
        return jn_pb2.RecordInteractionResponse(interaction=await self._journey.record_now(record))

    async def UpdateInteractionStatus(
        self, request: jn_pb2.UpdateInteractionStatusRequest, context: ServicerContext
    ) -> jn_pb2.UpdateInteractionStatusResponse:
        v = Violations()
        v.id("application_id", request.application_id)
        v.id("interaction_id", request.interaction_id, long=True)
        if request.status not in STATUSES:
            v.add("status", "must be one of the INTERACTION_STATUS_ values")
        v.raise_if_any()
        found = await self._journey.set_status(
            request.application_id, request.interaction_id, request.status
        )
        return jn_pb2.UpdateInteractionStatusResponse(interaction=found)

    async def ListInteractions(
        self, request: jn_pb2.ListInteractionsRequest, context: ServicerContext
    ) -> jn_pb2.ListInteractionsResponse:
        v = Violations()
        v.id("application_id", request.application_id)
        v.text("customer_id", request.customer_id, 128)
        v.id("transaction_id", request.transaction_id, required=False, long=True)
        if not (request.customer_id or request.transaction_id):
            v.add("customer_id", "is required unless transaction_id is given")
        if len(request.channels) > len(CHANNELS) or set(request.channels) - CHANNELS:
            v.add("channels", "must be INTERACTION_CHANNEL_ values, each once")
        if len(request.statuses) > len(STATUSES) or set(request.statuses) - STATUSES:
            v.add("statuses", "must be INTERACTION_STATUS_ values, each once")
        size = v.page("page_size", request.page_size, 100, 20)
        v.text("page_token", request.page_token, 512)
        v.raise_if_any()
        self._only_own_application(request.application_id)
        # The customer's own records only, a transaction's included: the scope holds
        # customer_id to the token's subject.
        key = self._journey.correlator.customer(request.application_id, request.customer_id)
        found, token = await self._journey.listing(
            Query(
                application_id=request.application_id,
                customer_key=key,
                transaction_id=request.transaction_id,
                channels=list(request.channels),
                statuses=list(request.statuses),
                start_us=_us(request.start_time) if request.HasField("start_time") else None,
                end_us=_us(request.end_time) if request.HasField("end_time") else None,
            ),
            size,
            request.page_token,
        )
        return jn_pb2.ListInteractionsResponse(interactions=found, next_page_token=token)

    async def SubmitSurvey(
        self, request: jn_pb2.SubmitSurveyRequest, context: ServicerContext
    ) -> jn_pb2.SubmitSurveyResponse:
        v = Violations()
        v.id("application_id", request.application_id)
        v.text("customer_id", request.customer_id, 128, required=True)
        v.id("interaction_id", request.interaction_id, long=True)
        if not 1 <= request.rating <= 5:
            v.add("rating", "must be 1 to 5")
        v.raise_if_any()
        self._only_own_application(request.application_id)
        rated = await surveys.submit(
            self._journey,
            request.application_id,
            request.customer_id,
            request.interaction_id,
            request.rating,
        )
        return jn_pb2.SubmitSurveyResponse(interaction=rated)

    async def GetSurveySummary(
        self, request: jn_pb2.GetSurveySummaryRequest, context: ServicerContext
    ) -> jn_pb2.GetSurveySummaryResponse:
        v = Violations()
        v.id("application_id", request.application_id)
        if request.group_by not in surveys.GROUPED_BY:
            v.add("group_by", "must be AGENT, RESOURCE_GROUP or TOPIC")
        v.raise_if_any()
        rows = await surveys.summary(
            self._journey,
            request.application_id,
            request.group_by,
            _us(request.start_time) if request.HasField("start_time") else None,
            _us(request.end_time) if request.HasField("end_time") else None,
        )
        return jn_pb2.GetSurveySummaryResponse(rows=rows)
