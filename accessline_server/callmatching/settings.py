"""Settings of the CallMatching service (ACCESSLINE_* variables, see the README)."""

from __future__ import annotations

from pydantic import Field, SecretStr

from accessline_server.numberdistribution.dialled import NumbersSecretSettings
from accessline_server.runtime.settings import HistorySettings, PeerAddress

# Only for the embedded run on one machine: a deployment sets its own secret.
DEVELOPMENT_SECRET = "accessline-development-callmatching-secret-not-for-production"  # noqa: S105


class CallMatchingSettings(HistorySettings, NumbersSecretSettings):
    """CallMatching's settings: the shared ones, its ports, the history's, the access codes'
    secret (it checks the codes callers key in) and its own."""

    default_ports = (50052, 9452)
    callmatching_secret: SecretStr = Field(
        default=SecretStr(DEVELOPMENT_SECRET),
        min_length=32,
        description="Secret from which the context encryption key and the ANI hashing key"
        " are derived; the same on every replica.",
    )
    numberdistribution_address: PeerAddress = Field(
        default="127.0.0.1:50051", min_length=3, description="NumberDistribution's host:port."
    )
    session_retention_seconds: float = Field(
        default=3600,
        ge=60,
        le=30 * 24 * 3600,
        description="How long GetSession still knows a matched, locked or cancelled session.",
    )
    ani_failure_limit: int = Field(
        default=10,
        ge=1,
        le=10_000,
        description="Failed match attempts counted from one caller number before its calls"
        " are answered RATE_LIMITED, until a window after the last one counted.",
    )
    withheld_failure_limit: int = Field(
        default=50,
        ge=1,
        le=100_000,
        description="Failed match attempts counted from all callers whose number is withheld"
        " (one shared bucket) before such calls are answered RATE_LIMITED.",
    )
    number_failure_limit: int = Field(
        default=100,
        ge=1,
        le=100_000,
        description="Failed match attempts counted on one dialled access number, from any"
        " caller, before calls to it are answered RATE_LIMITED: the bound on guessing the"
        " codes of a shared number's sessions.",
    )
    late_call_window_seconds: float = Field(
        default=60,
        ge=0,
        le=24 * 3600,
        description="How long after a session ends its late caller must still not reach the"
        " number's next customer: an application matching by the number alone gets numbers"
        " only from pools whose quarantine is at least this.",
    )
    ani_failure_window_seconds: float = Field(
        default=600,
        ge=1,
        le=24 * 3600,
        description="Window of the failure limits: a bucket ends this long after the"
        " last failure counted in it.",
    )
    default_region: str = Field(
        default="",
        pattern=r"^([A-Z]{2})?$",
        description="Region assumed for DNIS and ANI without"
        " a country code, when a request gives none.",
    )
