"""Development identity: a CA, a certificate for each service (server and client, with its
service identity), client certificates for tools and tests, etcd's certificate, and a JWT
signing key with its JWKS, all made on this machine so `make up` runs with TLS and
authentication on. Everything made here says it is for development (the CA's name, the
keys' ids); a production service refuses it.

    ca.pem                         the development CA
    <service>.pem / <service>.key  a service's certificate (DNS: name, name-peers,
                                   localhost; IP 127.0.0.1; URI spiffe://accessline/service/<name>)
    client-<name>.pem / .key       a client's certificate (URI spiffe://accessline/client/<name>)
    etcd.pem / etcd.key            etcd's server certificate
    signing.key, jwks.json         the token signing key and its public JWKS
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from accessline_server.runtime.store import EtcdTls

DEV_CA_NAME = "Accessline development CA"
DEV_KEY_PREFIX = "accessline-dev-"
DEV_ISSUER = "https://accessline.invalid/development"
DEV_AUDIENCE = "accessline"
SERVICE_URI = "spiffe://accessline/service/"
CLIENT_URI = "spiffe://accessline/client/"
SERVICE_NAMES = ("numberdistribution", "callmatching", "routing", "presence", "notification")
VALIDITY = datetime.timedelta(days=365)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


@dataclass(frozen=True)
class DevIdentity:
    """The files of a development identity in `folder`."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    def cert(self, name: str) -> Path:
        return self.folder / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.folder / f"{name}.key"

    def client_cert(self, name: str) -> Path:
        return self.folder / f"client-{name}.pem"

    def client_key(self, name: str) -> Path:
        return self.folder / f"client-{name}.key"

    @property
    def jwks(self) -> Path:
        return self.folder / "jwks.json"

    @property
    def signing_key(self) -> Path:
        return self.folder / "signing.key"

    def exists(self) -> bool:
        return self.ca.exists() and self.signing_key.exists() and self.jwks.exists()

    def credentials(self, token: str = "", *, client: str = "admin") -> grpc.ChannelCredentials:
        """A client certificate of this identity's CA and, when given, a bearer token on
        every call of the channel."""
        tls = grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.client_key(client).read_bytes(),
            certificate_chain=self.client_cert(client).read_bytes(),
        )
        if not token:
            return tls
        return grpc.composite_channel_credentials(tls, grpc.access_token_call_credentials(token))

    def channel(self, address: str, token: str = "", *, client: str = "admin") -> grpc.aio.Channel:
        return grpc.aio.secure_channel(address, self.credentials(token, client=client))

    def etcd_client(self, service: str) -> EtcdTls:
        """TLS to the development etcd, with a service's certificate as the client's."""
        return EtcdTls(
            ca=self.ca.read_bytes(),
            cert=self.cert(service).read_bytes(),
            key=self.key(service).read_bytes(),
        )

    def etcd_server_args(self) -> tuple[str, ...]:
        """The flags that make an etcd member serve its clients over TLS, requiring a
        client certificate of this identity's CA."""
        return (
            "--cert-file",
            str(self.cert("etcd")),
            "--key-file",
            str(self.key("etcd")),
            "--trusted-ca-file",
            str(self.ca),
            "--client-cert-auth",
        )

    def service_env(self, service: str, jwks_url: str) -> dict[str, str]:
        """The settings a service of the embedded run gets: TLS, tokens, TLS to etcd."""
        return {
            "ACCESSLINE_ENVIRONMENT": "development",
            "ACCESSLINE_TLS_CERT_FILE": str(self.cert(service)),
            "ACCESSLINE_TLS_KEY_FILE": str(self.key(service)),
            "ACCESSLINE_TLS_CA_FILE": str(self.ca),
            "ACCESSLINE_AUTH_ISSUER": DEV_ISSUER,
            "ACCESSLINE_AUTH_AUDIENCE": DEV_AUDIENCE,
            "ACCESSLINE_AUTH_JWKS_URL": jwks_url,
            "ACCESSLINE_ETCD_CA_FILE": str(self.ca),
            "ACCESSLINE_ETCD_CERT_FILE": str(self.cert(service)),
            "ACCESSLINE_ETCD_KEY_FILE": str(self.key(service)),
        }

    def token(
        self,
        subject: str,
        roles: Iterable[str],
        *,
        applications: Sequence[str] = (),
        switch: str = "",
        ttl: float = 3600.0,
        audience: str = DEV_AUDIENCE,
        issuer: str = DEV_ISSUER,
        extra: dict[str, object] | None = None,
    ) -> str:
        """A bearer token signed with the development key."""
        return mint_token(
            self.signing_key.read_bytes(),
            json.loads(self.jwks.read_text())["keys"][0]["kid"],
            subject,
            roles,
            applications=applications,
            switch=switch,
            ttl=ttl,
            audience=audience,
            issuer=issuer,
            extra=extra,
        )


def mint_token(
    key_pem: bytes,
    kid: str,
    subject: str,
    roles: Iterable[str],
    *,
    applications: Sequence[str] = (),
    switch: str = "",
    ttl: float = 3600.0,
    audience: str = DEV_AUDIENCE,
    issuer: str = DEV_ISSUER,
    extra: dict[str, object] | None = None,
) -> str:
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "iat": now,
        "nbf": now - 5,
        "exp": now + int(ttl),
        "roles": sorted(roles),
    }
    if applications:
        claims["accessline_applications"] = list(applications)
    if switch:
        claims["accessline_switch"] = switch
    claims.update(extra or {})
    return jwt.encode(claims, key_pem, algorithm="ES256", headers={"kid": kid})


class _Ca:
    def __init__(self, name: str = DEV_CA_NAME) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue(self, common_name: str, names: Sequence[x509.GeneralName]) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return _pem_key(key), cert.public_bytes(serialization.Encoding.PEM)


def _local(*dns: str) -> list[x509.GeneralName]:
    return [
        *(x509.DNSName(d) for d in dns),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]


def create(
    folder: Path,
    *,
    services: Sequence[str] = SERVICE_NAMES,
    clients: Sequence[str] = ("admin",),
    ca_name: str = DEV_CA_NAME,
) -> DevIdentity:
    """Makes a development identity in `folder` (replacing what was there)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = _Ca(ca_name)
    identity = DevIdentity(folder)
    identity.ca.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    for name in services:
        key, cert = ca.issue(
            name,
            [*_local(name, f"{name}-peers"), x509.UniformResourceIdentifier(SERVICE_URI + name)],
        )
        _write_private(identity.key(name), key)
        identity.cert(name).write_bytes(cert)
    for name in clients:
        key, cert = ca.issue(name, [x509.UniformResourceIdentifier(CLIENT_URI + name)])
        _write_private(identity.client_key(name), key)
        identity.client_cert(name).write_bytes(cert)
    key, cert = ca.issue("etcd", _local("etcd"))
    _write_private(identity.key("etcd"), key)
    identity.cert("etcd").write_bytes(cert)
    signing = ec.generate_private_key(ec.SECP256R1())
    _write_private(identity.signing_key, _pem_key(signing))
    kid = DEV_KEY_PREFIX + secrets.token_hex(6)
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(signing.public_key()))
    public.update({"kid": kid, "use": "sig", "alg": "ES256"})
    identity.jwks.write_text(json.dumps({"keys": [public]}, indent=2))
    return identity


def ensure(folder: Path) -> DevIdentity:
    """The development identity in `folder`, made the first time."""
    identity = DevIdentity(folder)
    if not identity.exists():
        create(folder)
    return identity


def is_development_ca(ca_pem: bytes) -> bool:
    """Whether a CA bundle holds a development CA made here."""
    for cert in x509.load_pem_x509_certificates(ca_pem):
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if any(n.value == DEV_CA_NAME for n in names):
            return True
    return False


class JwksServer:
    """Serves an identity's JWKS over HTTP on loopback, as an OIDC issuer publishes its
    keys (for the embedded run and the tests)."""

    def __init__(self, jwks: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = jwks.read_bytes()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.url = f"http://{host}:{self._server.server_address[1]}/jwks.json"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
