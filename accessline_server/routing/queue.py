"""The pure rules of the queue: business value from the configured rules, priority that
rises past the SLA target, the order of a group's queue, wait estimates, and the ranking
of agents for one interaction. Nothing here touches etcd or the network."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

from accessline.common.v1 import common_pb2
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.routing.storage.v1 import storage_pb2 as rt_store
from accessline_server.routing.private import seal_interaction
from accessline_server.runtime.clock import seconds, timestamp
from accessline_server.runtime.sealing import Sealer

C = common_pb2
VOICE = (C.CHANNEL_DESK_VOICE, C.CHANNEL_MOBILE_VOICE, C.CHANNEL_EXTERNAL_PHONE)
QI = rt_store.QueuedInteraction
RULE_FIELDS = {"channel", "segment", "subject", "kind"}
MAX_RULES = 200


@dataclass(frozen=True)
class ValueRule:
    """Sets the business value and SLA target of interactions whose fields all match."""

    value: float
    sla_seconds: float
    channel: int = 0
    segment: str = ""
    subject: str = ""
    kind: int = 0

    def matches(self, channel: int, segment: str, subject: str, kind: int) -> bool:
        return (
            (not self.channel or self.channel == channel)
            and (not self.segment or self.segment == segment)
            and (not self.subject or self.subject == subject)
            and (not self.kind or self.kind == kind)
        )


def parse_value_rules(text: str) -> list[ValueRule]:
    """Reads ACCESSLINE_ROUTING_VALUE_RULES; raises ValueError naming what is wrong."""
    try:
        raw = json.loads(text or "[]")
    except json.JSONDecodeError as exc:
        raise ValueError(f"is not JSON: {exc}") from None
    if not isinstance(raw, list) or len(raw) > MAX_RULES:
        raise ValueError(f"must be a JSON list of at most {MAX_RULES} rules")
    rules = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ValueError(f"rule {i} must be an object")
        unknown = set(item) - RULE_FIELDS - {"value", "sla_seconds"}
        if unknown:
            raise ValueError(f"rule {i} has unknown fields {sorted(unknown)}")
        value, sla = item.get("value"), item.get("sla_seconds")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not 0 <= value <= 1_000_000
        ):
            raise ValueError(f"rule {i}: value must be a number from 0 to 1000000")
        if isinstance(sla, bool) or not isinstance(sla, int | float) or not 0 < sla <= 86_400:
            raise ValueError(f"rule {i}: sla_seconds must be a number above 0, at most 86400")
        channel = 0
        if "channel" in item:
            name = f"CHANNEL_{item['channel']}"
            if name not in set(C.Channel.keys()) or name == "CHANNEL_UNSPECIFIED":
                raise ValueError(f"rule {i}: unknown channel {item['channel']!r}")
            channel = C.Channel.Value(name)
        kind = 0
        if "kind" in item:
            name = f"INTERACTION_KIND_{item['kind']}"
            if name not in set(rt_store.InteractionKind.keys()) or item["kind"] == "UNSPECIFIED":
                raise ValueError(f"rule {i}: kind must be CALL or CALLBACK")
            kind = rt_store.InteractionKind.Value(name)
        for text_field in ("segment", "subject"):
            if text_field in item and not isinstance(item[text_field], str):
                raise ValueError(f"rule {i}: {text_field} must be a string")
        rules.append(
            ValueRule(
                value=float(value),
                sla_seconds=float(sla),
                channel=channel,
                segment=item.get("segment", ""),
                subject=item.get("subject", ""),
                kind=kind,
            )
        )
    return rules


@dataclass
class Rules:
    """Every tunable of routing (see the README's Routing settings)."""

    offer_timeout: float = 15.0
    default_group: str = ""
    skill_weight: float = 10.0
    language_weight: float = 5.0
    proximity_weight: float = 2.0
    owner_wait: float = 20.0
    no_answer_limit: int = 3
    value_rules: list[ValueRule] = field(default_factory=list)
    default_value: float = 10.0
    default_sla: float = 60.0
    priority_per_second: float = 1.0
    max_queue: float = 1800.0
    average_handle: float = 240.0
    queue_update: float = 2.0
    dispatch_interval: float = 1.0
    leader_lease: int = 5
    hold: float = 120.0
    notify_max: float = 4 * 3600.0
    callback_max_attempts: int = 3
    callback_retry: float = 300.0
    callback_dial_timeout: float = 600.0
    callback_retention: float = 24 * 3600.0
    resume_window: float = 30.0
    redirect_window: float = 60.0
    max_queue_length: int = 1000

    def value_of(self, channel: int, segment: str, subject: str, kind: int) -> tuple[float, float]:
        """The business value and SLA target (seconds) of a new interaction."""
        for rule in self.value_rules:
            if rule.matches(channel, segment, subject, kind):
                return rule.value, rule.sla_seconds
        return self.default_value, self.default_sla


def priority(item: QI, rules: Rules, now: float) -> float:
    """Business value, plus `priority_per_second` for every second waited past the SLA."""
    waited = now - seconds(item.created_at)
    late = max(0.0, waited - item.sla_target_seconds)
    return item.business_value + rules.priority_per_second * late


def order(
    items: list[rt_store.QueuedInteraction], rules: Rules, now: float
) -> list[rt_store.QueuedInteraction]:
    """A group's queue as it is served: highest priority first, then oldest."""
    return sorted(
        items, key=lambda i: (-priority(i, rules, now), seconds(i.created_at), i.interaction_id)
    )


def waiting(item: rt_store.QueuedInteraction, now: float) -> bool:
    return item.state == rt_store.INTERACTION_STATE_QUEUED and seconds(item.not_before) <= now


def estimate(position: int, available: int, staffed: int, rules: Rules) -> float:
    """Seconds until the interaction at `position` (1 is next) reaches an agent: nothing
    while free agents outnumber those ahead; otherwise one average handle time for every
    round of the staffed agents ahead of it."""
    if position <= available:
        return 0.0
    rounds = math.ceil((position - available) / max(1, staffed))
    return rounds * rules.average_handle


def distance_km(a: common_pb2.GeoPoint, b: common_pb2.GeoPoint) -> float:
    la1, lo1, la2, lo2 = map(math.radians, (a.latitude, a.longitude, b.latitude, b.longitude))
    h = (
        math.sin((la2 - la1) / 2) ** 2
        + math.cos(la1) * math.cos(la2) * math.sin((lo2 - lo1) / 2) ** 2
    )
    return 2 * 6371.0 * math.asin(min(1.0, math.sqrt(h)))


@dataclass
class Candidate:
    agent: pr_pb2.Agent
    channel: common_pb2.Channel.ValueType
    score: float
    idle_since: float
    tried: bool


def free_channel(
    agent: pr_pb2.Agent, shown: pr_pb2.AgentPresence, wanted: int
) -> common_pb2.Channel.ValueType | None:
    """The channel an offer goes to: the wanted one when free, else the first free voice
    channel (desk, then mobile, then external phone)."""
    free = [
        c.channel
        for c in shown.channels
        if c.channel in VOICE and c.presence == C.CHANNEL_PRESENCE_AVAILABLE
    ]
    if not free:
        return None
    if wanted in free:
        return wanted  # type: ignore[return-value]
    return min(free, key=VOICE.index)


def rank(
    agents: list[pr_pb2.Agent],
    presence: dict[str, pr_pb2.AgentPresence],
    item: rt_store.QueuedInteraction,
    rules: Rules,
    location: common_pb2.GeoPoint | None = None,
) -> list[Candidate]:
    """Available agents with a free voice channel, best first: agents not yet tried,
    then the score (skill level for the subject, the customer's language, the site's
    proximity to the customer, each weighted), then who has been idle longest."""
    out = []
    tried = set(item.tried_agent_ids)
    for agent in agents:
        shown = presence.get(agent.agent_id)
        if shown is None:
            continue
        channel = free_channel(agent, shown, item.channel)
        if channel is None:
            continue
        level = max((s.level for s in agent.skills if s.name == item.subject), default=0)
        speaks = bool(item.language) and any(
            lang.split("-")[0].lower() == item.language.split("-")[0].lower()
            for lang in agent.languages
        )
        near = 0.0
        if location is not None and agent.site.HasField("location"):
            near = 1.0 / (1.0 + distance_km(location, agent.site.location) / 500.0)
        score = (
            rules.skill_weight * level
            + rules.language_weight * speaks
            + rules.proximity_weight * near
        )
        idle = seconds(shown.idle_since) if shown.HasField("idle_since") else time.time()
        out.append(Candidate(agent, channel, score, idle, agent.agent_id in tried))
    return sorted(out, key=lambda c: (c.tried, -c.score, c.idle_since, c.agent.agent_id))


def interaction_for(
    *,
    interaction_id: str,
    kind: rt_store.InteractionKind.ValueType,
    group: str,
    context: common_pb2.ContextData,
    rules: Rules,
    now: float,
    sealer: Sealer,
    match_outcome: int = 0,
) -> QI:
    """A new queue entry: value and SLA from the rules, agent-selection fields from the
    context, the customer's location and the summary shown to the agent sealed, the
    service request's owner preferred."""
    channel = common_pb2.CHANNEL_DESK_VOICE
    value, sla = rules.value_of(channel, context.customer_segment, context.subject, kind)
    item = QI(
        interaction_id=interaction_id,
        kind=kind,
        resource_group=group,
        channel=channel,
        subject=context.subject,
        language=context.language,
        customer_segment=context.customer_segment,
        business_value=value,
        sla_target_seconds=sla,
        state=rt_store.INTERACTION_STATE_QUEUED,
    )
    private = rt_store.InteractionPrivate(
        summary=pr_pb2.ContextSummary(
            customer_display_name=context.attributes.get("display_name", ""),
            subject=context.subject,
            language=context.language,
            service_request_id=context.service_request_id,
            customer_segment=context.customer_segment,
            waiting_since=timestamp(now),
            match_outcome=match_outcome,  # type: ignore[arg-type]
        ),
        context=context,
    )
    if context.HasField("location"):
        private.location.CopyFrom(context.location)
        private.summary.location.CopyFrom(context.location)
    seal_interaction(sealer, item, private)
    item.created_at.CopyFrom(timestamp(now))
    item.not_before.CopyFrom(timestamp(now))
    if context.service_request_owner:
        item.preferred_agent_id = context.service_request_owner
        item.preferred_until.CopyFrom(timestamp(now + rules.owner_wait))
    return item
