"""Settings shared by every service, read from ACCESSLINE_* environment variables.

Each service subclasses `ServiceSettings` to set its own default ports and add its
own settings; every setting is read here, in one place, and documented in the README.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AfterValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "ACCESSLINE_"

_ENDPOINT = re.compile(r"^[A-Za-z0-9.\-]+:(\d{1,5})$|^\[[0-9A-Fa-f:]+\]:(\d{1,5})$")
_PREFIX = re.compile(r"^(/[A-Za-z0-9_.\-]+)+$")


def _peer_address(value: str) -> str:
    from accessline_server.runtime.peers import peer_target

    for part in value.split(","):
        if not _ENDPOINT.match(part.strip().removeprefix("dns:///")):
            raise ValueError(f"{part.strip()!r} must be host:port")
    peer_target(value)
    return value


# Where a peer service's replicas answer: `host:port` (a name that resolves to all of
# them), `dns:///host:port`, or several `ip:port` separated by commas.
PeerAddress = Annotated[str, AfterValidator(_peer_address)]


class SettingsError(Exception):
    """Settings could not be loaded; the message names each bad variable and why."""


class ServiceSettings(BaseSettings):
    """Settings every service has. Field names map to ACCESSLINE_<NAME> variables."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)
    # Each service's default (gRPC port, metrics port); the fields are declared once here.
    default_ports: ClassVar[tuple[int, int]] = (0, 0)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        grpc_port, metrics_port = cls.default_ports
        cls.model_fields["port"].default = grpc_port
        cls.model_fields["metrics_port"].default = metrics_port
        cls.model_rebuild(force=True)

    host: str = Field(
        default="127.0.0.1",
        description="Address the gRPC server listens on (0.0.0.0 in a container).",
        min_length=1,
    )
    port: int = Field(default=0, ge=0, le=65535, description="gRPC port; 0 picks a free port.")
    metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of the Prometheus scrape endpoint (/metrics); 0 turns it off.",
    )
    etcd_endpoints: str = Field(
        default="127.0.0.1:2379",
        description="etcd members' client endpoints, host:port, separated by commas.",
    )
    etcd_prefix: str = Field(
        default="/accessline",
        description="Key prefix under which every Accessline key lives.",
    )
    etcd_timeout_seconds: float = Field(
        default=5.0, gt=0, le=60, description="Deadline of one etcd request."
    )
    etcd_group_commit: int = Field(
        default=2,
        ge=0,
        le=64,
        description="Group commit: while this many etcd transactions (or batches) of a"
        " process are under way, the next ones are sent together as one etcd transaction"
        " (nested, each with its own compares; only those touching none of each other's"
        " keys); 0 sends each alone.",
    )
    etcd_reconnect_backoff_max_seconds: float = Field(
        default=2.0,
        ge=0.1,
        le=60,
        description="Longest wait between two attempts to reconnect to an etcd member.",
    )
    etcd_ca_file: str = Field(
        default="", description="CA certificate (PEM) of etcd's members; set to use TLS."
    )
    etcd_cert_file: str = Field(
        default="", description="Client certificate (PEM) for etcd's client-cert-auth."
    )
    etcd_key_file: str = Field(default="", description="Key (PEM) of the etcd client certificate.")
    etcd_server_name: str = Field(
        default="", description="Name checked in the members' certificates instead of the host."
    )
    etcd_health_interval_seconds: float = Field(
        default=2.0,
        gt=0,
        le=60,
        description="How often etcd reachability is checked for the health service.",
    )
    shutdown_drain_delay_seconds: float = Field(
        default=0.0,
        ge=0,
        le=120,
        description="On SIGTERM, how long the server goes on serving while it reports"
        " NOT_SERVING, so load balancers move new calls away first.",
    )
    shutdown_grace_seconds: float = Field(
        default=10.0,
        ge=0,
        le=300,
        description="After the drain delay, how long in-flight calls and streams may take to"
        " finish.",
    )
    environment: Literal["production", "development"] = Field(
        default="production",
        description="production refuses development keys, certificates and secrets;"
        " development (`make up`, the tests) accepts them with a warning.",
    )
    insecure: bool = Field(
        default=False,
        description="Plain-text gRPC and no authentication at all: only behind something"
        " that does both (a service mesh), or for measurements. Logged as a warning.",
    )
    tls_cert_file: str = Field(
        default="", description="This service's certificate (PEM), server and client."
    )
    tls_key_file: str = Field(default="", description="Its private key (PEM).")
    tls_ca_file: str = Field(
        default="",
        description="CA bundle (PEM) that signs the certificates of every client and peer.",
    )
    auth_issuer: str = Field(default="", description="The OIDC issuer of bearer tokens (iss).")
    auth_audience: str = Field(
        default="accessline", min_length=1, description="The audience tokens must name (aud)."
    )
    auth_jwks_url: str = Field(default="", description="Where the issuer publishes its keys.")
    auth_jwks_ca_file: str = Field(
        default="", description="CA bundle for the JWKS URL's TLS; empty: the system's."
    )
    auth_clock_skew_seconds: float = Field(
        default=30, ge=0, le=600, description="Leeway on token expiry and not-before."
    )
    auth_algorithms: str = Field(
        default="ES256,RS256", description="Token signature algorithms accepted."
    )
    health_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="A plain-text port serving only the health service, for probes that"
        " cannot do mutual TLS (Kubernetes'); 0: none.",
    )
    web_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port serving the same RPCs over Connect and gRPC-Web (HTTP/1.1 and"
        " HTTP/2), for browsers and HTTP clients; TLS with the service's certificate unless"
        " insecure; 0: none.",
    )
    web_cors_origins: str = Field(
        default="",
        description="Origins (scheme://host[:port], separated by commas) whose pages may"
        " call the web port from a browser; empty: none.",
    )
    web_tls_cert_file: str = Field(
        default="",
        description="Certificate (PEM) the web port presents; empty: the service's own.",
    )
    web_tls_key_file: str = Field(
        default="", description="Its private key (PEM); empty: the service's own."
    )
    audit_dsn: SecretStr = Field(
        default=SecretStr(""),
        description="SQLAlchemy URL of the database the audit trail is written to (the match"
        " history's PostgreSQL in a deployment; `accessline history migrate` creates its"
        " table); empty: audit events are logged only. Required in production.",
    )
    max_streams: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description="Streams (agent sessions, watchers, calls in progress...) one replica"
        " holds at most; more are refused RESOURCE_EXHAUSTED with a retry delay.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Least severe level written to the JSON log."
    )
    access_log: bool = Field(
        default=True,
        description="One log line per call (method, status, duration, caller, trace id).",
    )
    trace_sample_ratio: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="Share of the traces that start here (a call with no sampled parent) that"
        " are recorded; a call whose caller's trace is sampled is always recorded (parent"
        "-based). Ignored when OTEL_TRACES_SAMPLER is set.",
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Worker processes of this service on this host, sharing its ports"
        " (SO_REUSEPORT; worker N's metrics on the metrics port + N): one per core for a"
        " host with more cores; each is a replica of its own.",
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        default="uvloop",
        description="The event loop the service runs on: uvloop (libuv, faster) or the"
        " standard library's.",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("etcd_endpoints")
    @classmethod
    def _endpoints(cls, value: str) -> str:
        items = [item.strip() for item in value.split(",")]
        if not items or any(not item for item in items):
            raise ValueError("must be host:port endpoints separated by commas")
        for item in items:
            match = _ENDPOINT.match(item)
            if match is None:
                raise ValueError(f"{item!r} must be host:port, for example 127.0.0.1:2379")
            port = int(match.group(1) or match.group(2))
            if not 1 <= port <= 65535:
                raise ValueError(f"{item!r}: port must be between 1 and 65535")
        return ",".join(items)

    @model_validator(mode="after")
    def _workers(self) -> ServiceSettings:
        if self.workers > 1 and self.port == 0:
            raise ValueError("ACCESSLINE_WORKERS above 1 needs a fixed ACCESSLINE_PORT")
        return self

    @model_validator(mode="after")
    def _etcd_tls(self) -> ServiceSettings:
        if (self.etcd_cert_file or self.etcd_key_file) and not self.etcd_ca_file:
            raise ValueError("ACCESSLINE_ETCD_CA_FILE is needed with a client certificate")
        if bool(self.etcd_cert_file) != bool(self.etcd_key_file):
            raise ValueError("ACCESSLINE_ETCD_CERT_FILE and ACCESSLINE_ETCD_KEY_FILE go together")
        return self

    @model_validator(mode="after")
    def _security(self) -> ServiceSettings:
        if self.insecure:
            return self
        missing = [
            ENV_PREFIX + name.upper()
            for name in (
                "tls_cert_file",
                "tls_key_file",
                "tls_ca_file",
                "auth_issuer",
                "auth_jwks_url",
            )
            if not getattr(self, name)
        ]
        if missing:
            raise ValueError(
                f"{', '.join(missing)} must be set (TLS and token checks are on unless"
                " ACCESSLINE_INSECURE=true)"
            )
        if self.environment == "production":
            if not self.auth_jwks_url.startswith("https://"):
                raise ValueError("ACCESSLINE_AUTH_JWKS_URL must be https:// in production")
            if not (self.etcd_ca_file and self.etcd_cert_file):
                raise ValueError(
                    "ACCESSLINE_ETCD_CA_FILE and ACCESSLINE_ETCD_CERT_FILE must be set in"
                    " production: etcd is reached over TLS with a client certificate"
                )
        return self

    @model_validator(mode="after")
    def _no_development_secrets(self) -> ServiceSettings:
        if self.environment != "production":
            return self
        if not self.audit_dsn.get_secret_value():
            raise ValueError(
                "ACCESSLINE_AUDIT_DSN must be set in production: every change and every"
                " refused call is written to the audit trail"
            )
        found = self.development_secrets()
        if found:
            raise ValueError(
                f"{found[0]} is the development default; set a secret of"
                " your own (production refuses development secrets)"
            )
        return self

    def development_secrets(self) -> list[str]:
        """The variables whose secret is still its development default (refused in
        production, warned about at start otherwise)."""
        return [
            f"{ENV_PREFIX}{name.upper()}"
            for name, info in type(self).model_fields.items()
            if isinstance(info.default, SecretStr)
            and info.default.get_secret_value()
            and getattr(self, name) == info.default
        ]

    @field_validator("etcd_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not _PREFIX.match(value):
            raise ValueError(
                "must start with '/', not end with '/', and use only letters, digits, '_', '.', '-'"
            )
        return value

    @property
    def etcd_endpoint_list(self) -> list[str]:
        return self.etcd_endpoints.split(",")


S = TypeVar("S", bound=ServiceSettings)


def load_settings(cls: type[S]) -> S:
    """Reads settings from the environment, or raises SettingsError naming each bad
    variable, the value given and what is expected."""
    try:
        return cls()
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            if not error["loc"]:
                # A rule across several settings: its message names them.
                lines.append(message)
                continue
            name = ENV_PREFIX + "_".join(str(part) for part in error["loc"]).upper()
            given = error.get("input")
            shown = f" (got {given!r})" if isinstance(given, str | int | float) else ""
            lines.append(f"{name}: {message}{shown}")
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None


# Only for the embedded run on one machine: a deployment sets its own secret.
DEVELOPMENT_HISTORY_SECRET = "accessline-development-history-secret-not-for-production"  # noqa: S105


class HistorySettings(ServiceSettings):
    """Settings of the services that write the history database: CallMatching (which
    owns it and serves the customer's journey from it), Routing and Notification (which
    record what they do in the journey through CallMatching's published module)."""

    history_dsn: str = Field(
        default="sqlite+aiosqlite:///.accessline/match-history.db",
        min_length=1,
        description="SQLAlchemy URL of the history database (match attempts, the customers'"
        " journeys): SQLite (default) or postgresql+asyncpg://user:password@host/db shared"
        " by every replica; the same in CallMatching, Routing and Notification.",
    )
    history_migrate: bool = Field(
        default=True,
        description="Create or upgrade the history's tables at start (the embedded run);"
        " false where `accessline history migrate` runs once per deploy.",
    )
    history_secret: SecretStr = Field(
        default=SecretStr(DEVELOPMENT_HISTORY_SECRET),
        min_length=32,
        description="Secret of the keyed hashes that stand for customer ids, phone numbers"
        " and e-mail addresses in the journey; the same in every service writing it.",
    )
    history_retention_days: float = Field(
        default=400,
        gt=0,
        le=10 * 366,
        description="Age after which a journey's records are purged.",
    )
    history_purge_interval_seconds: float = Field(
        default=3600,
        ge=0.1,
        le=24 * 3600,
        description="How often CallMatching purges the journey's records older than the retention.",
    )
