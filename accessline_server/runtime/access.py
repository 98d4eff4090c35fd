"""What every call leaves behind for operators: its duration in the per-RPC histogram
(OpenTelemetry's RPC conventions: `rpc.server.call.duration` by method and status code)
and, when the access log is on, one log line (method, status, duration, caller, trace
id; never a request's content)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc
from opentelemetry import metrics

from accessline_server.runtime.identity import ROLE_NAMES, Caller, current
from accessline_server.runtime.interceptor import Finished

log = logging.getLogger("accessline.access")

# Unary calls take milliseconds; streams (a switch's call, an agent's session) last up
# to hours, so the top buckets are wide.
CALL_BUCKETS = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 300.0, 1800.0, 7200.0,
]  # fmt: skip


def caller_label(caller: Caller) -> str:
    """Who called, for the access log: a service by name, a person or an application by
    subject and roles; a customer by role alone (a customer's id is personal data)."""
    if caller.unchecked or caller.is_service:
        return caller.describe()
    roles = ",".join(sorted(ROLE_NAMES[r] for r in caller.roles))
    if roles == "customer":
        return "(customer)"
    return caller.describe()


class Access:
    """Records each finished call; one per server."""

    def __init__(self, meter: metrics.Meter, *, log_calls: bool) -> None:
        self._duration = meter.create_histogram(
            "rpc.server.call.duration",
            unit="s",
            description="Duration of the calls this server handled, by method and status code",
            explicit_bucket_boundaries_advisory=CALL_BUCKETS,
        )
        self._log_calls = log_calls
        # The attributes of each (method, code), made once: recording allocates nothing.
        self._attributes: dict[tuple[str, grpc.StatusCode], dict[str, str]] = {}

    def _labels(self, method: str, code: grpc.StatusCode) -> dict[str, str]:
        key = (method, code)
        found = self._attributes.get(key)
        if found is None:
            found = self._attributes[key] = {
                "rpc.system.name": "grpc",
                "rpc.method": method.lstrip("/"),
                "rpc.response.status_code": code.name,
            }
        return found

    def __call__(self, call: Finished) -> None:
        self._duration.record(call.duration, self._labels(call.method, call.code))
        if self._log_calls:
            fields = {
                "method": call.method,
                "status": call.code.name,
                "duration_ms": round(call.duration * 1000, 3),
                "caller": caller_label(current()),
                "trace_id": call.trace_id,
            }
            if call.reason:
                fields["reason"] = call.reason
            log.info("call", extra={"fields": fields})


def observers(*each: Callable[[Finished], None]) -> Callable[[Finished], None]:
    """One observer telling every one given, in order."""

    def observe(call: Finished) -> None:
        for one in each:
            one(call)

    return observe
