"""What the Router tells operators of the calls on its switches' streams: the caller's
match latency, the wait until an agent accepts, the calls waiting on this replica, and a
log line for each routing decision (ids and outcomes only, never a caller's number or
context)."""

from __future__ import annotations

import logging
import time

from opentelemetry import metrics

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.routing.v1 import routing_pb2 as rt_pb2

log = logging.getLogger("accessline.routing")

# Buckets from the measured ranges: a match decision takes tens of milliseconds; an
# agent answers within seconds (finer from 10 to 20 s, where offers are usually taken).
MATCH_BUCKETS = [
    0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0,
    2.5, 5.0,
]  # fmt: skip
ACCEPT_BUCKETS = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 12.5, 15.0, 17.5, 20.0, 25.0,
    30.0, 45.0, 60.0, 90.0, 120.0, 300.0,
]  # fmt: skip
# The caller's wait counts from the switch's stamp, or else RouteInboundCall's start.
_FROM_STAMP = {"accessline.measured_from": "call_arrived_at"}
_FROM_RPC_START = {"accessline.measured_from": "rpc_start"}


class RouteMeasures:
    """The Router's instruments, made once per replica."""

    def __init__(self, meter: metrics.Meter) -> None:
        self._to_accept = meter.create_histogram(
            "accessline.routing.call_to_accept.duration",
            unit="s",
            description="From the call's arrival to the agent's accept",
            explicit_bucket_boundaries_advisory=ACCEPT_BUCKETS,
        )
        self._to_decision = meter.create_histogram(
            "accessline.routing.match.duration",
            unit="s",
            description="Match latency as the caller waits: from the call's arrival (as the"
            " switch stamped it, or RouteInboundCall's start) to the match decision on the"
            " switch's stream",
            explicit_bucket_boundaries_advisory=MATCH_BUCKETS,
        )
        self._queued = meter.create_up_down_counter(
            "accessline.routing.calls_waiting",
            unit="{call}",
            description="Calls held by this replica's streams that wait for an agent",
        )
        self._queued.add(0)  # a series (at 0) from the start, not "no data"

    def decided(
        self, interaction_id: str, decided: rt_pb2.MatchDecided, arrived: float, stamped: bool
    ) -> None:
        """A match decision about to go to the switch, `arrived` seconds since the epoch
        (the switch's stamp when `stamped`)."""
        self._to_decision.record(
            max(0.0, time.time() - arrived), _FROM_STAMP if stamped else _FROM_RPC_START
        )
        log.info(
            "routing decision",
            extra={
                "fields": {
                    "interaction_id": interaction_id,
                    "outcome": cm_pb2.MatchOutcome.Name(decided.outcome),
                    "treatment": rt_pb2.Treatment.Name(decided.treatment),
                    "group": decided.resource_group,
                }
            },
        )

    def waiting(self, change: int) -> None:
        self._queued.add(change)

    def accepted(self, arrived: float) -> None:
        self._to_accept.record(max(0.0, time.time() - arrived))
