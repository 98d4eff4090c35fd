"""Who is calling, and whether they may: the caller of every RPC is an Accessline service
(the client certificate it presented, mutual TLS) or a person or application (a bearer
JWT of the configured OIDC issuer, verified against its JWKS), and the RPC's access option
in the contract (`accessline.access.v1.access`) says which of them may call it and which
request fields must be theirs. The runtime's interceptor admits each call through
`Authorizer.admit`; the caller is then `current()` for the service's own checks (a
session that must belong to one of the caller's applications, a device to the caller)."""

from __future__ import annotations

import contextvars
import hashlib
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from accessline.access.v1 import access_pb2
from accessline_server.runtime.devpki import DEV_KEY_PREFIX
from accessline_server.runtime.errors import PermissionDenied, Unauthenticated, Unavailable

log = logging.getLogger("accessline.identity")

SERVICE_URI = "spiffe://accessline/service/"
ROLE_NAMES: dict[int, str] = {
    access_pb2.ROLE_APP_BACKEND: "app_backend",
    access_pb2.ROLE_SWITCH: "switch",
    access_pb2.ROLE_AGENT: "agent",
    access_pb2.ROLE_SUPERVISOR: "supervisor",
    access_pb2.ROLE_ADMIN: "admin",
    access_pb2.ROLE_CUSTOMER: "customer",
}
ROLES_BY_NAME = {name: role for role, name in ROLE_NAMES.items()}
SERVICES_BY_NAME: dict[str, int] = {
    "numberdistribution": access_pb2.SERVICE_NUMBERDISTRIBUTION,
    "callmatching": access_pb2.SERVICE_CALLMATCHING,
    "routing": access_pb2.SERVICE_ROUTING,
    "presence": access_pb2.SERVICE_PRESENCE,
    "notification": access_pb2.SERVICE_NOTIFICATION,
}
# The role whose holders a scope of each kind applies to.
SCOPED_ROLE: dict[int, int] = {
    access_pb2.SCOPE_KIND_APPLICATION: access_pb2.ROLE_APP_BACKEND,
    access_pb2.SCOPE_KIND_SWITCH: access_pb2.ROLE_SWITCH,
    access_pb2.SCOPE_KIND_AGENT: access_pb2.ROLE_AGENT,
    access_pb2.SCOPE_KIND_CUSTOMER: access_pb2.ROLE_CUSTOMER,
}
UNSCOPED_ROLES = {access_pb2.ROLE_ADMIN, access_pb2.ROLE_SUPERVISOR}
# An application scope of `*`: an operator's own backend, for every application.
EVERY = "*"


@dataclass(frozen=True)
class Caller:
    """Who is calling: a service (by its certificate) or a token's subject and roles."""

    subject: str
    roles: frozenset[int] = frozenset()
    service: int = 0
    applications: frozenset[str] = frozenset()
    switch: str = ""
    # Calls admitted without checks (ACCESSLINE_INSECURE, or open methods).
    unchecked: bool = False

    @property
    def is_service(self) -> bool:
        return bool(self.service)

    @property
    def trusted(self) -> bool:
        """A caller not limited to a scope: a service, an admin, a supervisor."""
        return self.unchecked or self.is_service or bool(self.roles & UNSCOPED_ROLES)

    def has(self, role: int) -> bool:
        return role in self.roles

    def owns_application(self, application_id: str) -> bool:
        return bool(application_id) and (
            EVERY in self.applications or application_id in self.applications
        )

    def owns(self, kind: int, value: str) -> bool:
        if not value:
            return False
        if kind == access_pb2.SCOPE_KIND_APPLICATION:
            return self.owns_application(value)
        if kind == access_pb2.SCOPE_KIND_SWITCH:
            return self.switch in (EVERY, value)
        return self.subject == value  # an agent or a customer: their own id

    def may_act_for_application(self, application_id: str) -> bool:
        """Whether the caller may see or change what belongs to this application."""
        return self.trusted or (
            self.has(access_pb2.ROLE_APP_BACKEND) and self.owns_application(application_id)
        )

    def describe(self) -> str:
        if self.unchecked:
            return "unchecked"
        if self.is_service:
            return f"service:{access_pb2.Service.Name(self.service)}"  # type: ignore[arg-type]
        return f"{self.subject} ({','.join(sorted(ROLE_NAMES[r] for r in self.roles))})"


UNCHECKED = Caller(subject="", unchecked=True)
_CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("caller", default=UNCHECKED)


def current() -> Caller:
    """The caller of the RPC being handled (UNCHECKED outside one)."""
    return _CALLER.get()


def acting_as(caller: Caller) -> contextvars.Token[Caller]:
    return _CALLER.set(caller)


def require_application(application_id: str, what: str) -> None:
    """Refuses unless the caller may act for the application that `what` belongs to."""
    if not current().may_act_for_application(application_id):
        raise PermissionDenied(
            f"{what} belongs to an application that is not yours",
            reason="OUT_OF_SCOPE",
            metadata={"scope": "application"},
        )


@dataclass(frozen=True)
class MethodPolicy:
    """One RPC's access option."""

    roles: frozenset[int]
    services: frozenset[int]
    scopes: tuple[tuple[int, str], ...]
    # (action, target field) when every call is audited.
    audit: tuple[str, str] | None = None


def method_policy(method: MethodDescriptor) -> MethodPolicy:
    options = method.GetOptions()
    access = options.Extensions[access_pb2.access]
    return MethodPolicy(
        frozenset(access.roles),
        frozenset(access.services),
        tuple((s.kind, s.field) for s in access.scopes),
        (access.audit.action, access.audit.target) if access.HasField("audit") else None,
    )


def policies(services: Iterable[ServiceDescriptor]) -> dict[str, MethodPolicy]:
    """The policy of every method of the services, by gRPC path."""
    return {
        f"/{service.full_name}/{method.name}": method_policy(method)
        for service in services
        for method in service.methods
    }


def field_value(request: Message, path: str) -> str:
    value: Any = request
    for part in path.split("."):
        value = getattr(value, part)
    return str(value)


class JwksKeys:
    """The issuer's signing keys, fetched from its JWKS URL, cached, refreshed every
    `refresh` seconds and at once (at most every `min_refresh` seconds) when a token
    names a key id not seen yet, so a rotated key is picked up without a restart."""

    def __init__(
        self,
        url: str,
        *,
        ca_file: str = "",
        refresh: float = 300.0,
        min_refresh: float = 10.0,
        refuse_development: bool = False,
    ) -> None:
        self._url = url
        self._refuse_development = refuse_development
        self._client = httpx.AsyncClient(verify=ca_file or True, timeout=5.0)
        self._refresh = refresh
        self._min_refresh = min_refresh
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched = -float("inf")

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    async def close(self) -> None:
        await self._client.aclose()

    async def load(self) -> None:
        try:
            response = await self._client.get(self._url)
            response.raise_for_status()
            found = jwt.PyJWKSet.from_dict(response.json())
        except (httpx.HTTPError, ValueError, jwt.PyJWTError) as exc:
            raise Unavailable(
                f"the token issuer's keys cannot be read: {type(exc).__name__}",
                reason="JWKS_UNAVAILABLE",
                retry_after=2.0,
            ) from None
        keys = {k.key_id: k for k in found.keys if k.key_id}
        if self._refuse_development:
            development = [kid for kid in keys if kid.startswith(DEV_KEY_PREFIX)]
            for kid in development:
                log.error("the issuer publishes a development key (%s); it is not trusted", kid)
                del keys[kid]
        self._keys = keys
        self._fetched = time.monotonic()

    async def key(self, kid: str) -> jwt.PyJWK | None:
        age = time.monotonic() - self._fetched
        if age > self._refresh or (kid not in self._keys and age > self._min_refresh):
            await self.load()
        return self._keys.get(kid)


@dataclass
class TokenVerifier:
    """Verifies bearer JWTs: signature by a key of the issuer's JWKS, issuer, audience,
    expiry and not-before with a clock skew, and an allowed algorithm. Verified tokens
    are remembered until they expire (a bounded cache)."""

    keys: JwksKeys
    issuer: str
    audience: str
    algorithms: Sequence[str] = ("ES256", "RS256")
    leeway: float = 30.0
    cache_size: int = 10_000
    _cache: dict[bytes, tuple[Caller, float]] = field(default_factory=dict)

    async def verify(self, token: str) -> Caller:
        digest = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > time.time():
            return cached[0]
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("the bearer token is not a JWT", reason="BAD_TOKEN") from None
        if header.get("alg") not in self.algorithms:
            raise Unauthenticated(
                f"tokens signed with {header.get('alg')!r} are not accepted", reason="BAD_TOKEN"
            )
        key = await self.keys.key(str(header.get("kid", "")))
        if key is None:
            raise Unauthenticated(
                "the token's signing key is not one of the issuer's", reason="UNKNOWN_KEY"
            )
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=list(self.algorithms),
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the bearer token has expired", reason="TOKEN_EXPIRED") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(
                "the bearer token is for another audience", reason="WRONG_AUDIENCE"
            ) from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated(
                "the bearer token is from another issuer", reason="WRONG_ISSUER"
            ) from None
        except jwt.PyJWTError:
            raise Unauthenticated("the bearer token is not valid", reason="BAD_TOKEN") from None
        caller = caller_from_claims(claims)
        if len(self._cache) >= self.cache_size:
            self._cache.clear()
        self._cache[digest] = (caller, float(claims["exp"]) + self.leeway)
        return caller


def caller_from_claims(claims: Mapping[str, Any]) -> Caller:
    raw_roles = claims.get("roles", [])
    names = [raw_roles] if isinstance(raw_roles, str) else list(raw_roles)
    applications = claims.get("accessline_applications", [])
    if isinstance(applications, str):
        applications = [applications]
    return Caller(
        subject=str(claims["sub"]),
        roles=frozenset(ROLES_BY_NAME[n] for n in names if n in ROLES_BY_NAME),
        applications=frozenset(str(a) for a in applications),
        switch=str(claims.get("accessline_switch", "")),
    )


def _bearer(metadata: Sequence[tuple[str, Any]] | None) -> str:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token:
                return token.strip()
    return ""


def service_of(auth_context: Mapping[str, Sequence[bytes]]) -> int:
    """The Accessline service a verified client certificate belongs to, or 0."""
    for uri in auth_context.get("peer_spiffe_id", []) or auth_context.get("peer_uri", []):
        text = uri.decode() if isinstance(uri, bytes) else str(uri)
        if text.startswith(SERVICE_URI):
            return SERVICES_BY_NAME.get(text[len(SERVICE_URI) :], 0)
    return 0


class Authorizer:
    """Admits a call as its RPC's access option allows."""

    def __init__(
        self,
        verifier: TokenVerifier | None,
        registered: dict[str, MethodPolicy],
        *,
        insecure: bool = False,
    ) -> None:
        self._verifier = verifier
        self._policies = registered
        self._insecure = insecure

    def register(self, services: Iterable[ServiceDescriptor]) -> None:
        self._policies.update(policies(services))

    def guarded(self, method: str) -> bool:
        return method in self._policies

    def policy(self, method: str) -> MethodPolicy | None:
        return self._policies.get(method)

    async def admit(self, method: str, context: Any, request: Message | None) -> Caller:
        policy = self._policies.get(method)
        if policy is None or self._insecure:
            return UNCHECKED  # health, reflection; or checks turned off
        service = service_of(context.auth_context())
        if service:
            peer = Caller(subject=access_pb2.Service.Name(service), service=service)  # type: ignore[arg-type]
            if service in policy.services:
                return peer
            acting_as(peer)  # so that a refusal is audited as this service's
            if not policy.roles:
                raise self._missing(policy, service_caller=True)
        token = _bearer(context.invocation_metadata())
        if not token:
            raise Unauthenticated(
                "a bearer token is needed (authorization: Bearer <jwt>)", reason="NO_TOKEN"
            )
        if self._verifier is None:
            raise Unauthenticated("no token issuer is configured", reason="NO_ISSUER")
        caller = await self._verifier.verify(token)
        acting_as(caller)
        allowed = caller.roles & policy.roles
        if not allowed:
            raise self._missing(policy)
        if not allowed & UNSCOPED_ROLES and request is not None:
            for kind, path in policy.scopes:
                if SCOPED_ROLE.get(int(kind), 0) in allowed and not caller.owns(
                    kind, field_value(request, path)
                ):
                    raise PermissionDenied(
                        f"{path} is not yours", reason="OUT_OF_SCOPE", metadata={"field": path}
                    )
        return caller

    @staticmethod
    def _missing(policy: MethodPolicy, *, service_caller: bool = False) -> PermissionDenied:
        needs = sorted(ROLE_NAMES[r] for r in policy.roles) + sorted(
            access_pb2.Service.Name(s).removeprefix("SERVICE_").lower()  # type: ignore[arg-type]
            for s in policy.services
        )
        return PermissionDenied(
            "this call needs one of: " + ", ".join(needs),
            reason="SERVICE_NOT_ALLOWED" if service_caller else "MISSING_ROLE",
            metadata={"needs": ",".join(needs)},
        )
