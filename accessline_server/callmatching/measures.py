"""What CallMatching measures and tells of each match decision: outcomes counted (by
application), decision time and the wait from handoff to call (histograms by outcome
alone), the decision's span attributes and its log line (no personal data)."""

from __future__ import annotations

import logging

from opentelemetry import metrics, trace

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.common.v1 import common_pb2
from accessline_server.runtime.clock import seconds

log = logging.getLogger("accessline.callmatching")

# Histogram buckets in seconds, from the measured ranges: a decision takes milliseconds
# (p50 about 20 ms on the 2-core machine), a customer dials within a fraction of a second
# (an app that dials by itself) to minutes.
DECISION_BUCKETS = [
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
    0.25, 0.5, 1.0, 2.5, 5.0,
]  # fmt: skip
HANDOFF_BUCKETS = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
    90.0, 120.0, 180.0, 300.0, 600.0, 1800.0,
]  # fmt: skip


class MatchMeasures:
    def __init__(self, meter: metrics.Meter) -> None:
        self._outcomes = meter.create_counter(
            "accessline.match.outcomes", unit="{call}", description="Match decisions by outcome"
        )
        self._decision = meter.create_histogram(
            "accessline.match.decision.duration",
            unit="s",
            description="CallMatching's decision time: from the call's arrival (as the"
            " switch stamped it, or MatchCall's start) to the decision",
            explicit_bucket_boundaries_advisory=DECISION_BUCKETS,
        )
        self._waited = meter.create_histogram(
            "accessline.match.handoff_to_call.duration",
            unit="s",
            description="From the handoff request to the call's arrival, for matched calls",
            explicit_bucket_boundaries_advisory=HANDOFF_BUCKETS,
        )

    def decided(
        self,
        call_id: str,
        response: cm_pb2.MatchCallResponse,
        attempt: cm_pb2.MatchAttempt,
        arrived: float,
        now: float,
    ) -> None:
        """A decision taken at `now` about a call that arrived at `arrived`."""
        outcome = {"accessline.match.outcome": cm_pb2.MatchOutcome.Name(response.outcome)}
        labels = outcome
        if attempt.application_id:
            labels = {**outcome, "accessline.application": attempt.application_id}
        self._outcomes.add(1, labels)
        # The histograms by outcome alone: a series of buckets per application would
        # multiply them by the applications, for no panel or alert that reads it.
        self._decision.record(max(0.0, now - arrived), outcome)
        if response.outcome == cm_pb2.MATCH_OUTCOME_MATCHED and attempt.HasField(
            "handoff_requested_at"
        ):
            self._waited.record(max(0.0, arrived - seconds(attempt.handoff_requested_at)), outcome)
        span = trace.get_current_span()
        span.set_attribute("accessline.match.outcome", labels["accessline.match.outcome"])
        span.set_attribute(
            "accessline.match.schema", common_pb2.MatchSchema.Name(attempt.match_schema)
        )
        if attempt.application_id:
            span.set_attribute("accessline.application", attempt.application_id)
        if attempt.pool_id:
            span.set_attribute("accessline.pool", attempt.pool_id)
        log.info(
            "call match decided",
            extra={
                "fields": {
                    "call_id": call_id,
                    "outcome": labels["accessline.match.outcome"],
                    "session_id": attempt.session_id,
                }
            },
        )
