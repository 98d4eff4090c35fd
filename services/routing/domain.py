"""The rules of routing an inbound call: have it matched, choose the treatment by the
outcome, pick the best available agent of the right group (skills for the subject, the
customer's language, longest idle), claim the agent's channel in etcd, offer the call
through the agent's app and wait for the answer; a decline or a timeout moves on to the
next agent. Whatever was claimed is released when the switch hangs up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics, trace

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.common.v1 import common_pb2
from accessline.presence.storage.v1 import storage_pb2 as pr_store
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.routing.storage.v1 import storage_pb2 as rt_store
from accessline.routing.v1 import routing_pb2 as rt_pb2
from services.presence import keys as pr_keys
from services.routing import keys
from services.runtime.errors import AccesslineError
from services.runtime.store import EventKind, Store

log = logging.getLogger("accessline.routing")
tracer = trace.get_tracer("accessline.routing")

C = common_pb2
VOICE = (C.CHANNEL_DESK_VOICE, C.CHANNEL_MOBILE_VOICE, C.CHANNEL_EXTERNAL_PHONE)


@dataclass
class Rules:
    offer_timeout: float
    default_group: str
    skill_weight: float
    language_weight: float


@dataclass
class Candidate:
    agent: pr_pb2.Agent
    channel: common_pb2.Channel.ValueType
    score: float
    idle_since: float


def rank(
    agents: list[pr_pb2.Agent],
    presence: dict[str, pr_pb2.AgentPresence],
    context: common_pb2.ContextData,
    rules: Rules,
) -> list[Candidate]:
    """Available agents with a free voice channel, best first: the subject's skill level,
    then the customer's language (weighted), then who has been idle longest."""
    out = []
    for agent in agents:
        shown = presence.get(agent.agent_id)
        if shown is None:
            continue
        free = [
            c.channel
            for c in shown.channels
            if c.channel in VOICE and c.presence == C.CHANNEL_PRESENCE_AVAILABLE
        ]
        if not free:
            continue
        channel = min(free, key=VOICE.index)
        level = max((s.level for s in agent.skills if s.name == context.subject), default=0)
        speaks = (
            any(
                lang.split("-")[0].lower() == context.language.split("-")[0].lower()
                for lang in agent.languages
            )
            if context.language
            else False
        )
        score = rules.skill_weight * level + rules.language_weight * speaks
        idle = (
            shown.idle_since.ToNanoseconds() / 1e9 if shown.HasField("idle_since") else time.time()
        )
        out.append(Candidate(agent, channel, score, idle))
    return sorted(out, key=lambda c: (-c.score, c.idle_since, c.agent.agent_id))


class Router:
    """Routes inbound calls; safe to run as several replicas."""

    def __init__(
        self,
        store: Store,
        matching: Any,
        presence: Any,
        rules: Rules,
        meter: metrics.Meter | None = None,
    ) -> None:
        self._store = store
        self._matching = matching
        self._presence = presence
        self._rules = rules
        meter = meter or metrics.get_meter("accessline.routing")
        self._offers = meter.create_counter(
            "accessline.routing.offers", unit="{offer}", description="Offers to agents by result"
        )
        self._to_accept = meter.create_histogram(
            "accessline.routing.call_to_accept.duration",
            unit="s",
            description="From the call's arrival to the agent's accept",
            explicit_bucket_boundaries_advisory=[
                0.05,
                0.1,
                0.25,
                0.5,
                1.0,
                2.5,
                5.0,
                10.0,
                20.0,
                30.0,
                60.0,
                120.0,
            ],
        )

    async def route(
        self, request: rt_pb2.RouteInboundCallRequest
    ) -> AsyncIterator[rt_pb2.RouteInboundCallResponse]:
        interaction_id = "i" + secrets.token_urlsafe(12)
        arrived = (
            request.call_arrived_at.ToNanoseconds() / 1e9
            if request.HasField("call_arrived_at")
            else time.time()
        )

        def event(**fields: Any) -> rt_pb2.RouteInboundCallResponse:
            return rt_pb2.RouteInboundCallResponse(interaction_id=interaction_id, **fields)

        match = cm_pb2.MatchCallRequest(
            call_id=request.call_id,
            dnis=request.dnis,
            ani=request.ani,
            dtmf_digits=request.dtmf_digits,
        )
        if request.HasField("call_arrived_at"):
            match.call_arrived_at.CopyFrom(request.call_arrived_at)
        matched = await self._matching.MatchCall(match)
        is_match = matched.outcome == cm_pb2.MATCH_OUTCOME_MATCHED
        span = trace.get_current_span()
        span.set_attribute("accessline.match.outcome", cm_pb2.MatchOutcome.Name(matched.outcome))
        span.set_attribute("accessline.interaction", interaction_id)
        if is_match:
            treatment = (
                rt_pb2.TREATMENT_SKIP_IVR if matched.skip_ivr else rt_pb2.TREATMENT_IVR_STANDARD
            )
        else:
            treatment = rt_pb2.TREATMENT_IVR_AUTHENTICATE
        group = matched.resource_group or self._rules.default_group
        yield event(
            match_decided=rt_pb2.MatchDecided(
                outcome=matched.outcome,
                treatment=treatment,
                session_id=matched.session_id,
                resource_group=group,
            )
        )
        if not group:
            yield event(
                failed=rt_pb2.Failed(
                    reason=rt_pb2.FAILURE_REASON_UNKNOWN_NUMBER,
                    message="the dialled number routes to no group",
                )
            )
            return
        context = matched.context if is_match else common_pb2.ContextData()
        tried: set[str] = set()
        while True:
            listed = await self._presence.ListAgents(
                pr_pb2.ListAgentsRequest(resource_group=group, page_size=500)
            )
            agents = [a for a in listed.agents if a.agent_id not in tried]
            if not agents:
                yield event(
                    failed=rt_pb2.Failed(
                        reason=rt_pb2.FAILURE_REASON_NO_AGENTS,
                        message="no agent of the group is available",
                    )
                )
                return
            shown = await self._presence.GetPresence(
                pr_pb2.GetPresenceRequest(agent_ids=[a.agent_id for a in agents])
            )
            candidates = rank(agents, {p.agent_id: p for p in shown.agents}, context, self._rules)
            if not candidates:
                yield event(
                    failed=rt_pb2.Failed(
                        reason=rt_pb2.FAILURE_REASON_NO_AGENTS,
                        message="no agent of the group is available",
                    )
                )
                return
            for candidate in candidates:
                tried.add(candidate.agent.agent_id)
                with tracer.start_as_current_span(
                    "accessline.agent.claim",
                    attributes={"accessline.agent": candidate.agent.agent_id},
                ):
                    claim = await self._claim(candidate, interaction_id, request.call_id)
                if claim is None:
                    continue
                lease = claim
                try:
                    offer = await pr_keys.make_offer(
                        self._store,
                        candidate.agent.agent_id,
                        interaction_id,
                        candidate.channel,
                        pr_pb2.ContextSummary(
                            customer_display_name=context.attributes.get("display_name", ""),
                            subject=context.subject,
                            language=context.language,
                            service_request_id=context.service_request_id,
                        ),
                        self._rules.offer_timeout,
                    )
                    yield event(
                        offered=rt_pb2.Offered(
                            agent_id=candidate.agent.agent_id,
                            channel=candidate.channel,
                            deadline=offer.offer.deadline,
                        )
                    )
                    with tracer.start_as_current_span(
                        "accessline.offer.wait",
                        attributes={"accessline.agent": candidate.agent.agent_id},
                    ) as waiting:
                        answer = await self._answer(candidate.agent.agent_id, offer.offer.offer_id)
                        result = (
                            pr_store.OfferState.Name(answer.state)
                            if answer is not None
                            else "TIMED_OUT"
                        )
                        waiting.set_attribute("accessline.offer.result", result)
                        self._offers.add(1, {"accessline.offer.result": result})
                    if answer is not None and answer.state == pr_store.OFFER_STATE_ACCEPTED:
                        self._to_accept.record(max(0.0, time.time() - arrived))
                        channel = answer.accepted_channel or candidate.channel
                        address = next(
                            (c.address for c in candidate.agent.channels if c.channel == channel),
                            "",
                        )
                        yield event(
                            connect=rt_pb2.Connect(
                                agent_id=candidate.agent.agent_id,
                                channel=channel,
                                address=address,
                                context=context,
                                session_id=matched.session_id,
                            )
                        )
                        return
                    if answer is None or answer.state == pr_store.OFFER_STATE_OPEN:
                        await pr_keys.cancel_offer(
                            self._store,
                            candidate.agent.agent_id,
                            offer.offer.offer_id,
                            pr_pb2.OFFER_CANCEL_REASON_TIMED_OUT,
                        )
                finally:
                    # Accepted: Presence marked the channel busy in the same transaction,
                    # so the claim has done its job. Otherwise (hang-up, decline,
                    # timeout) the agent is free again at once.
                    with contextlib.suppress(AccesslineError):
                        await self._store.revoke_lease(lease)

    async def _claim(self, candidate: Candidate, interaction_id: str, call_id: str) -> int | None:
        """Holds a slot of the agent's channel for the time of the offer; returns the
        claim's lease. After an accept the agent's presence shows the channel busy."""
        capacity = next(
            (c.capacity or 1 for c in candidate.agent.channels if c.channel == candidate.channel), 1
        )
        lease = await self._store.grant_lease(max(1, math.ceil(self._rules.offer_timeout * 2 + 30)))
        record = rt_store.AgentClaim(interaction_id=interaction_id, call_id=call_id)
        for slot in range(capacity):
            key = keys.claim(candidate.agent.agent_id, candidate.channel, slot)
            if await self._store.create(key, record, lease) is not None:
                return lease
        await self._store.revoke_lease(lease)
        return None

    async def _answer(self, agent_id: str, offer_id: str) -> pr_store.StoredOffer | None:
        """The offer once it is no longer open, or None when it timed out or vanished."""
        key = pr_keys.offer(agent_id, offer_id)
        entry = await self._store.get(key, pr_store.StoredOffer)
        if entry is None:
            return None
        if entry.value.state != pr_store.OFFER_STATE_OPEN:
            return entry.value
        deadline = entry.value.offer.deadline.ToNanoseconds() / 1e9

        async def follow() -> pr_store.StoredOffer | None:
            async for change in self._store.watch_prefix(key, entry.meta.mod_revision + 1):
                if change.key != key:
                    continue
                if change.kind == EventKind.DELETE:
                    return None
                value = change.decode(pr_store.StoredOffer)
                if value.state != pr_store.OFFER_STATE_OPEN:
                    return value
            return None

        try:
            return await asyncio.wait_for(follow(), max(0.1, deadline - time.time()))
        except TimeoutError:
            return None
