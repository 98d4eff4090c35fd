"""Settings of the Routing service (ACCESSLINE_* variables, see the README)."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator

from accessline_server.presence.roster import DEVELOPMENT_SECRET as PRESENCE_DEVELOPMENT_SECRET
from accessline_server.runtime.settings import HistorySettings, PeerAddress

# Only for the embedded run on one machine: a deployment sets its own secret.
DEVELOPMENT_SECRET = "accessline-development-routing-secret-not-for-production"  # noqa: S105


class RoutingSettings(HistorySettings):
    """Routing's settings: the shared ones, its ports, its peers and its routing rules."""

    default_ports = (50053, 9453)
    routing_secret: SecretStr = Field(
        default=SecretStr(DEVELOPMENT_SECRET),
        min_length=32,
        description="Secret from which the key sealing callbacks' numbers and contexts and"
        " notify requests' handoffs in etcd is derived; the same on every replica.",
    )
    presence_secret: SecretStr = Field(
        default=SecretStr(PRESENCE_DEVELOPMENT_SECRET),
        min_length=32,
        description="Presence's sealing secret (the same value as Presence's): Routing"
        " writes offers to agents and reads the addresses they are connected at.",
    )
    callmatching_address: PeerAddress = Field(
        default="127.0.0.1:50052", min_length=3, description="CallMatching's host:port."
    )
    presence_address: PeerAddress = Field(
        default="127.0.0.1:50054", min_length=3, description="Presence's host:port."
    )
    routing_offer_timeout_seconds: float = Field(
        default=15, ge=1, le=300, description="How long an agent has to answer an offer."
    )
    routing_default_group: str = Field(
        default="",
        description="Resource group for calls to numbers in no pool; empty: such calls fail.",
    )
    routing_skill_weight: float = Field(
        default=10, ge=0, le=1000, description="Weight of the subject's skill level."
    )
    routing_language_weight: float = Field(
        default=5, ge=0, le=1000, description="Weight of speaking the customer's language."
    )
    notification_address: PeerAddress = Field(
        default="127.0.0.1:50055", min_length=3, description="Notification's host:port."
    )
    routing_proximity_weight: float = Field(
        default=2,
        ge=0,
        le=1000,
        description="Weight of the agent's site being near the customer (full weight at "
        "0 km, half at 500 km).",
    )
    routing_owner_wait_seconds: float = Field(
        default=20,
        ge=0,
        le=600,
        description="How long a call waits for the owner of its service request before any "
        "agent may take it.",
    )
    routing_no_answer_limit: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Offers in a row an agent may let time out before being set not ready "
        "(0: never).",
    )
    routing_value_rules: str = Field(
        default="[]",
        description="Business value rules, a JSON list tried in order; the first whose "
        "fields all match sets the value and SLA, e.g. "
        '[{"segment": "gold", "subject": "mortgage", "value": 50, "sla_seconds": 20}]. '
        "Match fields: channel (DESK_VOICE, ...), segment, subject, kind (CALL, CALLBACK).",
    )
    routing_default_value: float = Field(
        default=10, ge=0, le=1_000_000, description="Business value when no rule matches."
    )
    routing_default_sla_seconds: float = Field(
        default=60, gt=0, le=86_400, description="SLA target when no rule matches."
    )
    routing_priority_per_second: float = Field(
        default=1,
        ge=0,
        le=1_000_000,
        description="How fast priority rises per second waited past the SLA target.",
    )
    routing_max_queue_seconds: float = Field(
        default=1800,
        ge=1,
        le=86_400,
        description="A call waiting longer fails with QUEUE_TIMEOUT.",
    )
    routing_average_handle_seconds: float = Field(
        default=240,
        gt=0,
        le=86_400,
        description="Average handle time used by wait estimates.",
    )
    routing_queue_update_seconds: float = Field(
        default=2,
        gt=0,
        le=60,
        description="How often a waiting call's position and estimate are refreshed.",
    )
    routing_dispatch_interval_seconds: float = Field(
        default=1,
        gt=0,
        le=60,
        description="The dispatch loop runs at least this often (priorities rise with time).",
    )
    routing_max_queue_length: int = Field(
        default=1000,
        ge=1,
        le=100_000,
        description="Calls one group's queue holds at most, over all replicas; more get a"
        " failed event QUEUE_FULL with a retry delay.",
    )
    routing_resume_seconds: float = Field(
        default=30,
        ge=5,
        le=600,
        description="How long a call handed over by a stopping replica keeps its place in the"
        " queue for the switch to resume it on another replica.",
    )
    routing_redirect_seconds: float = Field(
        default=60,
        ge=5,
        le=600,
        description="How long after `connect` the switch may send a call whose agent's"
        " phone did not take it back to the queue (the connect's redirect_token).",
    )
    routing_leader_lease_seconds: int = Field(
        default=5,
        ge=2,
        le=60,
        description="TTL of the dispatch leader's lease: another replica takes over within "
        "about this long after the leader dies.",
    )
    routing_hold_seconds: float = Field(
        default=120,
        ge=1,
        le=3600,
        description="How long an agent is held for a customer told an agent is available.",
    )
    routing_notify_max_hours: float = Field(
        default=4,
        gt=0,
        le=72,
        description="A notify-when-available request ends by itself after this long.",
    )
    routing_callback_max_attempts: int = Field(
        default=3, ge=1, le=20, description="Dial attempts of a callback."
    )
    routing_callback_retry_seconds: float = Field(
        default=300,
        ge=0,
        le=86_400,
        description="Wait between a failed callback dial and the next attempt.",
    )
    routing_callback_dial_timeout_seconds: float = Field(
        default=600,
        ge=1,
        le=86_400,
        description="A dial the switch has not reported after this long counts as a failed "
        "attempt.",
    )
    routing_callback_retention_hours: float = Field(
        default=24,
        gt=0,
        le=720,
        description="How long a finished callback can still be read.",
    )

    @field_validator("routing_value_rules")
    @classmethod
    def _value_rules(cls, value: str) -> str:
        from accessline_server.routing.queue import parse_value_rules

        parse_value_rules(value)
        return value
