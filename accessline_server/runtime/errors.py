"""Domain errors and their translation to gRPC status with rich details.

Domain code raises these; the server interceptor (interceptor.py) turns them into a
status carrying google.rpc ErrorInfo, BadRequest and RetryInfo, so servicers never build
statuses by hand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "accessline"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: its path (for example `pool.city.name`) and why."""

    field: str
    description: str


class AccesslineError(Exception):
    """Base of every error a service reports to its callers on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    default_reason = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})
        self.retry_after = retry_after

    def details(self) -> list[Any]:
        """The rich error details sent with the status."""
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
        )
        out: list[Any] = [info]
        if self.retry_after is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(max(0, int(self.retry_after * 1e9)))
            out.append(error_details_pb2.RetryInfo(retry_delay=delay))
        return out

    def packed_details(self) -> list[any_pb2.Any]:
        """The details as they travel in the status (a peer's error passes its own on)."""
        packed = []
        for detail in self.details():
            one = any_pb2.Any()
            one.Pack(detail)
            packed.append(one)
        return packed


# A refusal names at most this many fields (its details travel in a trailer of bounded
# size); the message says how many more there were.
MAX_VIOLATIONS = 50


class InvalidArgument(AccesslineError):
    """The request is malformed; nothing was changed."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        violations: Sequence[FieldViolation],
        *,
        reason: str | None = None,
    ) -> None:
        if not violations:
            raise ValueError("InvalidArgument needs at least one field violation")
        shown = list(violations[:MAX_VIOLATIONS])
        summary = "; ".join(f"{v.field}: {v.description[:200]}" for v in shown[:10])
        if len(violations) > 10:
            summary += f"; and {len(violations) - 10} more"
        super().__init__(f"invalid request: {summary}", reason=reason)
        self.violations = shown

    def details(self) -> list[Any]:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in self.violations
            ]
        )
        return [*super().details(), bad]


class NotFound(AccesslineError):
    """The named thing does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(AccesslineError):
    """The thing to create exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(AccesslineError):
    """The system is not in a state that allows the operation."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Aborted(AccesslineError):
    """A concurrent change won; the caller may retry the whole operation."""

    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class PermissionDenied(AccesslineError):
    """The caller may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(AccesslineError):
    """The caller presented no valid credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class ResourceExhausted(AccesslineError):
    """Out of a resource (numbers, attempts); `retry_after` says when to try again."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(AccesslineError):
    """A dependency (etcd, a peer service) cannot be reached; retry later."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class DeadlineExceeded(AccesslineError):
    """A dependency did not answer in time; the outcome of a write is unknown."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Unimplemented(AccesslineError):
    """The RPC is part of the contract but not served yet."""

    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


def to_status(error: AccesslineError) -> grpc.Status:
    """The gRPC status (with packed rich details) for a domain error."""
    proto = status_pb2.Status(
        code=code_pb2.Code.Value(error.code.name),
        message=error.message,
        details=error.packed_details(),
    )
    status: grpc.Status = rpc_status.to_status(proto)
    return status
