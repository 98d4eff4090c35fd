"""Settings of the Routing service (ACCESSLINE_* variables, see the README)."""

from __future__ import annotations

from pydantic import Field

from services.runtime.settings import ServiceSettings


class RoutingSettings(ServiceSettings):
    """Routing's settings: the shared ones, its ports, its peers and its routing rules."""

    port: int = Field(default=50053, ge=0, le=65535, description="gRPC port; 0 picks a free port.")
    metrics_port: int = Field(
        default=9453,
        ge=0,
        le=65535,
        description="Port of the Prometheus scrape endpoint (/metrics); 0 turns it off.",
    )
    callmatching_address: str = Field(
        default="127.0.0.1:50052", min_length=3, description="CallMatching's host:port."
    )
    presence_address: str = Field(
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
