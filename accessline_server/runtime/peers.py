"""Calls to other Accessline services: a peer is a group of replicas (a DNS name that
resolves to all of them, or several addresses) balanced round-robin; every call has a
deadline; calls the contract declares free of side effects or idempotent are retried on
another replica when one is unavailable; and a failed call turns into a domain error that
keeps the peer's status code and rich details (so a RESOURCE_EXHAUSTED with RetryInfo from
NumberDistribution reaches the app as such)."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2, descriptor_pb2
from google.protobuf.descriptor import ServiceDescriptor
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from accessline_server.runtime.errors import AccesslineError

RETRYABLE = {
    descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS,
    descriptor_pb2.MethodOptions.IDEMPOTENT,
}
RETRY_ATTEMPTS = 3


def peer_name(service: ServiceDescriptor) -> str:
    """The name a peer's certificate must hold: its package's service part
    (`accessline.numberdistribution.v1.NumberDistributionService`: numberdistribution)."""
    return service.full_name.split(".")[1]


def peer_target(address: str) -> str:
    """The gRPC target of a peer setting: `host:port` (a name that resolves to every
    replica, as a headless Kubernetes Service does), `dns:///host:port`, or several
    `ip:port` separated by commas."""
    parts = [part.strip() for part in address.split(",") if part.strip()]
    if len(parts) == 1:
        return parts[0]
    hosts = [part.rsplit(":", 1)[0].strip("[]") for part in parts]
    try:
        kinds = {ipaddress.ip_address(host).version for host in hosts}
    except ValueError:
        raise ValueError(
            "several addresses must be IP addresses; give one DNS name that resolves to"
            " every replica instead"
        ) from None
    if len(kinds) != 1:
        raise ValueError("several addresses must all be IPv4 or all IPv6")
    return ("ipv4:" if kinds == {4} else "ipv6:") + ",".join(parts)


def service_config(service: ServiceDescriptor, timeout: float) -> str:
    """The gRPC service config of a peer channel: round-robin over the replicas, a
    deadline on every unary method, and retries on UNAVAILABLE for the methods whose
    contract declares them free of side effects or idempotent."""
    unary = [m for m in service.methods if not (m.client_streaming or m.server_streaming)]
    retried = [m for m in unary if m.GetOptions().idempotency_level in RETRYABLE]
    plain = [m for m in unary if m not in retried]
    deadline = f"{timeout:.3f}s"

    def names(methods: list[Any]) -> list[dict[str, str]]:
        return [{"service": service.full_name, "method": m.name} for m in methods]

    configs: list[dict[str, Any]] = []
    if plain:
        configs.append({"name": names(plain), "timeout": deadline})
    if retried:
        configs.append(
            {
                "name": names(retried),
                "timeout": deadline,
                "retryPolicy": {
                    "maxAttempts": RETRY_ATTEMPTS,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        )
    return json.dumps({"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": configs})


def peer_channel(
    address: str,
    service: ServiceDescriptor,
    timeout: float,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    credentials: grpc.ChannelCredentials | None = None,
) -> grpc.aio.Channel:
    """A channel to a peer service's replicas, balanced and retried as its contract
    allows; over mutual TLS when given this service's credentials, each replica's
    certificate checked for the peer's name (`numberdistribution`, say) whatever address
    it is reached at. Unary calls on it go through `PeerCalls` first (outermost, so that
    the interceptors given, tracing among them, still see the transport's error)."""
    chain = [PeerCalls(peer_name(service), timeout), *interceptors]
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", service_config(service, timeout)),
        ("grpc.enable_retries", 1),
    ]
    if credentials is None:
        return grpc.aio.insecure_channel(peer_target(address), options=options, interceptors=chain)
    options.append(("grpc.ssl_target_name_override", peer_name(service)))
    return grpc.aio.secure_channel(
        peer_target(address), credentials, options=options, interceptors=chain
    )


# A peer's failure that says nothing about the request becomes UNAVAILABLE here.
_OPAQUE = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED}
# A caller refused with these may try again; it is told when, if the peer did not say.
_RETRIED_LATER = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
PEER_RETRY_AFTER_SECONDS = 1.0


def _says_when(details: list[any_pb2.Any]) -> bool:
    return any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in details)


class PeerError(AccesslineError):
    """A call to another service failed; carries that service's status."""

    def __init__(self, peer: str, error: grpc.aio.AioRpcError) -> None:
        code = error.code()
        opaque = code in _OPAQUE
        self.code = grpc.StatusCode.UNAVAILABLE if opaque else code
        later = self.code in _RETRIED_LATER
        super().__init__(
            f"{peer}: {error.details() or code.name}",
            reason="PEER_UNAVAILABLE" if opaque else f"PEER_{code.name}",
            retry_after=PEER_RETRY_AFTER_SECONDS if later else None,
        )
        status = None if opaque else rpc_status.from_call(error)  # type: ignore[arg-type]
        self.passed_details = list(status.details) if status is not None else None
        if self.passed_details is not None and later and not _says_when(self.passed_details):
            # The peer (or the transport, for a deadline) did not say when: this does.
            own = super().packed_details()
            self.passed_details += [d for d in own if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]

    def packed_details(self) -> list[any_pb2.Any]:
        if self.passed_details is None:
            return super().packed_details()
        return self.passed_details


class PeerCalls(grpc.aio.UnaryUnaryClientInterceptor):
    """The client side of every unary call to a peer, installed where the runtime makes
    the channel: the call gets the peer deadline when its caller set none, and a failed
    call raises `PeerError` (keeping the peer's status and rich details) instead of the
    transport's `AioRpcError`. Callers use the generated typed stubs directly."""

    def __init__(self, peer: str, timeout: float) -> None:
        self._peer = peer
        self._timeout = timeout

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        if client_call_details.timeout is None:
            client_call_details = client_call_details._replace(timeout=self._timeout)  # type: ignore[attr-defined]
        call = await continuation(client_call_details, request)
        try:
            await call
        except grpc.aio.AioRpcError as error:
            raise PeerError(self._peer, error) from None
        return call
