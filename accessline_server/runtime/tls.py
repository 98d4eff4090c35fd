"""TLS of every gRPC link: a server that requires a client certificate of the deployment's
CA and picks up a renewed certificate without a restart, and client credentials that
present this service's certificate to its peers (mutual TLS) and check theirs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc

from accessline_server.runtime.devpki import is_development_ca
from accessline_server.runtime.settings import ServiceSettings, SettingsError

log = logging.getLogger("accessline.tls")


@dataclass
class _Files:
    cert: Path
    key: Path
    ca: Path
    stamp: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def changed(self) -> bool:
        now = (self.cert.stat().st_mtime, self.key.stat().st_mtime, self.ca.stat().st_mtime)
        if now == self.stamp:
            return False
        self.stamp = now
        return True

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.ca.read_bytes(),
        )


def development_cas(settings: ServiceSettings) -> list[str]:
    """The variables naming a CA made by `make up` for development."""
    if settings.insecure:
        return []
    return [
        variable
        for variable, path in (
            ("ACCESSLINE_TLS_CA_FILE", settings.tls_ca_file),
            ("ACCESSLINE_ETCD_CA_FILE", settings.etcd_ca_file),
        )
        if path and is_development_ca(Path(path).read_bytes())
    ]


def check_production(settings: ServiceSettings) -> None:
    """Refuses, in production, a CA made by `make up` for development; elsewhere warns
    of every development CA and secret in use."""
    cas = development_cas(settings)
    if settings.environment == "production":
        for variable in cas:
            raise SettingsError(
                f"{variable} is the development CA; production refuses development keys"
            )
        return
    for variable in settings.development_secrets():
        log.warning(
            "development secret in use",
            extra={"fields": {"variable": variable, "fix": "set a secret of your own"}},
        )
    for variable in cas:
        log.warning(
            "development CA in use",
            extra={"fields": {"variable": variable, "fix": "use your own CA in production"}},
        )


def server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials:
    """Credentials that require a client certificate signed by the CA; the certificate
    files are read again whenever they change (a renewal takes effect on new
    connections)."""
    files = _Files(
        Path(settings.tls_cert_file), Path(settings.tls_key_file), Path(settings.tls_ca_file)
    )
    files.changed()
    initial = files.configuration()

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        try:
            if not files.changed():
                return None
            log.info("TLS certificate files changed; using them for new connections")
            return files.configuration()
        except OSError as exc:
            log.warning("TLS certificate files unreadable; keeping the current ones: %s", exc)
            return None

    # grpc's stubs say the fetcher returns a configuration; None ("no change") is what
    # gRPC documents and does.
    fetcher = cast("Callable[[], grpc.ServerCertificateConfiguration]", fetch)
    return grpc.dynamic_ssl_server_credentials(initial, fetcher, require_client_authentication=True)


def channel_credentials(settings: ServiceSettings) -> grpc.ChannelCredentials:
    """This service's certificate presented to a peer, whose certificate is checked
    against the CA and the name dialled."""
    return grpc.ssl_channel_credentials(
        root_certificates=Path(settings.tls_ca_file).read_bytes(),
        private_key=Path(settings.tls_key_file).read_bytes(),
        certificate_chain=Path(settings.tls_cert_file).read_bytes(),
    )
