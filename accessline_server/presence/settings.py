"""Settings of the Presence service (ACCESSLINE_* variables, see the README)."""

from __future__ import annotations

from pydantic import Field, SecretStr

from accessline_server.presence.roster import DEVELOPMENT_SECRET
from accessline_server.runtime.settings import ServiceSettings


class PresenceSettings(ServiceSettings):
    """Presence's settings: the shared ones, its ports and its own."""

    default_ports = (50054, 9454)
    presence_lease_seconds: int = Field(
        default=10,
        ge=2,
        le=300,
        description="TTL of an agent session's lease: how long a session outlives a crashed"
        " Presence replica.",
    )
    presence_heartbeat_timeout_seconds: float = Field(
        default=30,
        ge=1,
        le=3600,
        description="An agent app silent for this long (no message, not even a heartbeat)"
        " is logged out.",
    )
    presence_max_interaction_hours: float = Field(
        default=12,
        gt=0,
        le=168,
        description="An accepted interaction the agent app never ends stops counting against"
        " the agent's channel after this long.",
    )
    presence_login_timeout_seconds: float = Field(
        default=10,
        ge=1,
        le=300,
        description="A Connect stream that has not logged in within this time is closed.",
    )
    presence_max_watchers: int = Field(
        default=500,
        ge=1,
        le=100_000,
        description="WatchPresence streams one replica serves at most; more are refused"
        " RESOURCE_EXHAUSTED.",
    )
    presence_resume_revisions: int = Field(
        default=100_000,
        ge=100,
        le=100_000_000,
        description="A WatchPresence resume token further back than this many etcd"
        " revisions gets a fresh snapshot instead of a replay.",
    )
    presence_not_ready_reasons: str = Field(
        default="break,lunch,meeting,training,after-call-work",
        pattern=r"^\s*[a-z0-9][a-z0-9_-]{0,31}(\s*,\s*[a-z0-9][a-z0-9_-]{0,31})*\s*$",
        description="The not-ready reason codes an agent may give (separated by commas,"
        " each 1 to 32 of [a-z0-9_-]); `no-answer` is Presence's own, given when it sets an"
        " agent not ready after unanswered offers.",
    )
    presence_console_notification_url: str = Field(
        default="",
        pattern=r"^(https?://[^/\s]+)?$",
        description="Where the agent console reaches Notification's web port (to send"
        " links), as scheme://host[:port]; empty: the console's own origin (a gateway that"
        " routes by service path). Notification's ACCESSLINE_WEB_CORS_ORIGINS must then"
        " allow the console's origin.",
    )
    presence_secret: SecretStr = Field(
        default=SecretStr(DEVELOPMENT_SECRET),
        min_length=32,
        description="Secret from which the key sealing agents' addresses and offers' previews"
        " in etcd is derived; the same on every Presence and Routing replica.",
    )


def reason_codes(setting: str) -> tuple[str, ...]:
    """The configured not-ready reasons, in order, once each."""
    return tuple(dict.fromkeys(code.strip() for code in setting.split(",") if code.strip()))
