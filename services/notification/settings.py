"""Settings of the Notification service (ACCESSLINE_* variables, see the README)."""

from __future__ import annotations

from pydantic import Field

from services.runtime.settings import ServiceSettings


class NotificationSettings(ServiceSettings):
    """Notification's settings: the shared ones with this service's default ports."""

    port: int = Field(default=50055, ge=0, le=65535, description="gRPC port; 0 picks a free port.")
    metrics_port: int = Field(
        default=9455,
        ge=0,
        le=65535,
        description="Port of the Prometheus scrape endpoint (/metrics); 0 turns it off.",
    )
