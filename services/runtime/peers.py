"""Calls to other Accessline services: a deadline on every call, and a failed call
turned into a domain error that keeps the peer's status code and rich details (so a
RESOURCE_EXHAUSTED with RetryInfo from NumberDistribution reaches the app as such)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_status import rpc_status

from services.runtime.errors import AccesslineError

# A peer's failure that says nothing about the request becomes UNAVAILABLE here.
_OPAQUE = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED}


class PeerError(AccesslineError):
    """A call to another service failed; carries that service's status."""

    def __init__(self, peer: str, error: grpc.aio.AioRpcError) -> None:
        code = error.code()
        opaque = code in _OPAQUE
        super().__init__(
            f"{peer}: {error.details() or code.name}",
            reason="PEER_UNAVAILABLE" if opaque else f"PEER_{code.name}",
            retry_after=1.0 if opaque else None,
        )
        self.code = grpc.StatusCode.UNAVAILABLE if opaque else code
        status = None if opaque else rpc_status.from_call(error)  # type: ignore[arg-type]
        self.passed_details = list(status.details) if status is not None else None


class PeerStub:
    """Wraps a generated stub: `await peer.Method(request)`."""

    def __init__(self, stub: Any, peer: str, timeout: float) -> None:
        self._stub = stub
        self._peer = peer
        self._timeout = timeout

    def __getattr__(self, method: str) -> Callable[[Any], Awaitable[Any]]:
        call = getattr(self._stub, method)

        async def invoke(request: Any) -> Any:
            try:
                return await call(request, timeout=self._timeout)
            except grpc.aio.AioRpcError as error:
                raise PeerError(self._peer, error) from None

        return invoke
