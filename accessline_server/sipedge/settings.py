"""The SIP adapter's settings, read from ACCESSLINE_* environment variables."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from accessline_server.runtime.settings import ENV_PREFIX, PeerAddress


class SipEdgeSettings(BaseSettings):
    """How the adapter reaches Kamailio's event socket and Routing, and how it treats
    calls. Field names map to ACCESSLINE_<NAME> variables."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    sipedge_evapi_address: str = Field(
        default="127.0.0.1:8448",
        pattern=r"^[A-Za-z0-9.\-]+:\d{1,5}$",
        description="Kamailio's event socket (its evapi bind_addr), host:port.",
    )
    routing_address: PeerAddress = Field(
        default="127.0.0.1:50053", description="Routing's host:port."
    )
    sipedge_token: SecretStr = Field(
        default=SecretStr(""),
        description="The bearer token the adapter presents to Routing: role `switch`.",
    )
    sipedge_token_file: str = Field(
        default="", description="A file holding that token instead (read at start)."
    )
    trace_sample_ratio: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="Share of the calls whose trace is recorded (the trace starts here).",
    )
    tls_ca_file: str = Field(default="", description="The CA that signs Routing's certificate.")
    tls_cert_file: str = Field(default="", description="The adapter's client certificate.")
    tls_key_file: str = Field(default="", description="Its private key.")
    sipedge_code_digits: int = Field(
        default=4,
        ge=0,
        le=32,
        description="Access code length: the call is routed once the caller keyed in this"
        " many digits (or `#`); 0: no code is collected.",
    )
    sipedge_dtmf_timeout_seconds: float = Field(
        default=8.0,
        gt=0,
        le=120,
        description="How long the caller has to key in the code; then the call is routed"
        " with the digits it has (none: Routing sends it to the IVR route).",
    )
    sipedge_ivr_uri: str = Field(
        default="",
        pattern=r"^$|^sips?:\S+$",
        description="Where calls that Routing sends through the IVR go (a SIP URI); empty:"
        " they stay with Routing and reach an agent of the number's group.",
    )
    sipedge_agent_domain: str = Field(
        default="",
        pattern=r"^$|^[A-Za-z0-9.\-]+(:\d{1,5})?$",
        description="The domain of agents' addresses that are not SIP URIs (an extension"
        " `1234` becomes sip:1234@domain); empty: such calls are refused with 480.",
    )
    sipedge_metrics_host: str = Field(
        default="127.0.0.1", description="Address the Prometheus scrape endpoint listens on."
    )
    sipedge_metrics_port: int = Field(
        default=9460, ge=0, le=65535, description="Prometheus scrape port; 0 turns it off."
    )
    sipedge_health_host: str = Field(
        default="127.0.0.1", description="Address the health endpoint listens on."
    )
    sipedge_health_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of the health endpoint for probes: GET /ready is 200 while the"
        " adapter is connected to Kamailio's event socket (else 503), GET /live 200;"
        " 0 turns it off.",
    )
    log_level: str = Field(default="INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")

    def token(self) -> str:
        if self.sipedge_token_file:
            with open(self.sipedge_token_file, encoding="utf-8") as handle:
                return handle.read().strip()
        return self.sipedge_token.get_secret_value()
