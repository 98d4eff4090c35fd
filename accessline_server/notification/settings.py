"""Settings of the Notification service (ACCESSLINE_* variables, see the README)."""

from __future__ import annotations

from pydantic import Field, SecretStr

from accessline_server.runtime.settings import HistorySettings

# Only for the embedded run on one machine: a deployment sets its own secret.
DEVELOPMENT_SECRET = "accessline-development-notification-secret-not-for-production"  # noqa: S105


class NotificationSettings(HistorySettings):
    """Notification's settings: the shared ones, its ports, its providers and delivery policy."""

    default_ports = (50055, 9455)
    apns_url: str = Field(default="https://api.push.apple.com", description="APNs endpoint.")
    apns_key_file: str = Field(
        default="", description="APNs signing key (.p8, PEM); empty: APNs off."
    )
    apns_key_id: str = Field(default="", description="Key id of the APNs signing key.")
    apns_team_id: str = Field(default="", description="Apple developer team id.")
    apns_topic: str = Field(default="", description="The app's bundle id (apns-topic).")
    fcm_url: str = Field(default="https://fcm.googleapis.com", description="FCM endpoint.")
    fcm_service_account_file: str = Field(
        default="", description="FCM service account JSON; empty: FCM off."
    )
    push_ca_file: str = Field(
        default="", description="CA bundle for the providers' TLS; empty: the system's."
    )
    notification_retention_seconds: float = Field(
        default=86400,
        ge=60,
        le=30 * 86400,
        description="How long delivery status stays queryable after a notification's TTL.",
    )
    delivery_max_attempts: int = Field(
        default=8, ge=1, le=100, description="Attempts per device before a delivery fails."
    )
    delivery_backoff_seconds: float = Field(
        default=1.0,
        gt=0,
        le=600,
        description="First retry delay; doubled per attempt, with jitter, up to 5 minutes.",
    )
    delivery_worker_lease_seconds: int = Field(
        default=10,
        ge=2,
        le=300,
        description="Lease of a worker's claims: how long a dead worker's items wait.",
    )
    notification_streams_per_device: int = Field(
        default=2,
        ge=1,
        le=100,
        description="In-app streams one device may hold open at once, over all replicas;"
        " more are refused RESOURCE_EXHAUSTED.",
    )
    webhook_allow_http: bool = Field(
        default=False,
        description="Webhook endpoints may be plain http:// (for a receiver on the same"
        " host or network); otherwise https only.",
    )
    webhook_allow_private_networks: bool = Field(
        default=False,
        description="Webhook endpoints may resolve to loopback, private or link-local"
        " addresses (otherwise refused: a webhook is not a way into the network).",
    )
    webhook_ca_file: str = Field(
        default="", description="CA bundle for webhook endpoints' TLS; empty: the system's."
    )
    webhook_timeout_seconds: float = Field(
        default=10.0, gt=0, le=60, description="Time an endpoint has to answer a delivery."
    )
    webhook_max_attempts: int = Field(
        default=12, ge=1, le=100, description="Attempts per delivery before it fails."
    )
    webhook_backoff_seconds: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="First retry delay of a delivery; doubled per attempt, with jitter, up"
        " to an hour (or the endpoint's Retry-After, when longer).",
    )
    webhook_retention_seconds: float = Field(
        default=7 * 86400,
        ge=3600,
        le=90 * 86400,
        description="How long a webhook's deliveries stay listed.",
    )
    notification_link_origins: str = Field(
        default="",
        description="Origins (https://host[:port], separated by commas) of the links agents"
        " may send customers (SendLink); empty: none, every link is refused.",
    )
    notification_links_per_interaction: int = Field(
        default=10, ge=1, le=1000, description="Links an agent may send per interaction."
    )
    notification_secret: SecretStr = Field(
        default=SecretStr(DEVELOPMENT_SECRET),
        min_length=32,
        description="Secret from which the keys sealing push tokens and hashing ids in key"
        " names are derived; the same on every replica.",
    )
