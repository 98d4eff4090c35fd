"""Settings shared by every service, read from ACCESSLINE_* environment variables.

Each service subclasses `ServiceSettings` to set its own default ports and add its
own settings; every setting is read here, in one place, and documented in the README.
"""

from __future__ import annotations

import re
from typing import Literal, TypeVar

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "ACCESSLINE_"

_ENDPOINT = re.compile(r"^[A-Za-z0-9.\-]+:(\d{1,5})$|^\[[0-9A-Fa-f:]+\]:(\d{1,5})$")
_PREFIX = re.compile(r"^(/[A-Za-z0-9_.\-]+)+$")


class SettingsError(Exception):
    """Settings could not be loaded; the message names each bad variable and why."""


class ServiceSettings(BaseSettings):
    """Settings every service has. Field names map to ACCESSLINE_<NAME> variables."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

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
    etcd_endpoint: str = Field(
        default="127.0.0.1:2379", description="etcd client endpoint, host:port."
    )
    etcd_prefix: str = Field(
        default="/accessline",
        description="Key prefix under which every Accessline key lives.",
    )
    etcd_timeout_seconds: float = Field(
        default=5.0, gt=0, le=60, description="Deadline of one etcd request."
    )
    etcd_health_interval_seconds: float = Field(
        default=2.0,
        gt=0,
        le=60,
        description="How often etcd reachability is checked for the health service.",
    )
    shutdown_grace_seconds: float = Field(
        default=10.0,
        ge=0,
        le=300,
        description="On SIGTERM, how long in-flight calls and streams may take to finish.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Least severe level written to the JSON log."
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("etcd_endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        match = _ENDPOINT.match(value)
        if match is None:
            raise ValueError("must be host:port, for example 127.0.0.1:2379")
        port = int(match.group(1) or match.group(2))
        if not 1 <= port <= 65535:
            raise ValueError("port must be between 1 and 65535")
        return value

    @field_validator("etcd_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not _PREFIX.match(value):
            raise ValueError(
                "must start with '/', not end with '/', and use only letters, digits, '_', '.', '-'"
            )
        return value

    @property
    def etcd_host(self) -> str:
        return self.etcd_endpoint.rsplit(":", 1)[0].strip("[]")

    @property
    def etcd_port(self) -> int:
        return int(self.etcd_endpoint.rsplit(":", 1)[1])


S = TypeVar("S", bound=ServiceSettings)


def load_settings(cls: type[S]) -> S:
    """Reads settings from the environment, or raises SettingsError naming each bad
    variable, the value given and what is expected."""
    try:
        return cls()
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            name = ENV_PREFIX + "_".join(str(part) for part in error["loc"]).upper()
            given = error.get("input")
            shown = f" (got {given!r})" if isinstance(given, str | int | float) else ""
            message = error["msg"].removeprefix("Value error, ")
            lines.append(f"{name}: {message}{shown}")
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None
