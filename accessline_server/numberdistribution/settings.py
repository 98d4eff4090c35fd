"""Settings of the NumberDistribution service (ACCESSLINE_* variables, see the README)."""

from __future__ import annotations

from pydantic import Field

from accessline_server.numberdistribution.dialled import DEVELOPMENT_SECRET, NumbersSecretSettings

__all__ = ["DEVELOPMENT_SECRET", "NumberDistributionSettings"]


class NumberDistributionSettings(NumbersSecretSettings):
    """NumberDistribution's settings: the shared ones, its ports, the access codes' secret
    and its own."""

    default_ports = (50051, 9451)
    numbers_code_memory_seconds: float = Field(
        default=3600,
        ge=0,
        le=7 * 86400,
        description="How long the access code of an ended reservation is remembered, so a"
        " late caller keying it in is answered STALE_CODE and never counted against the"
        " number's next customer; 0 turns this off.",
    )
    numbers_reserve_attempts: int = Field(
        default=16,
        ge=1,
        le=1000,
        description="Compare-and-swap attempts on one pool before it counts as exhausted.",
    )
