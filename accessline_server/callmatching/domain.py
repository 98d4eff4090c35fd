"""The rules of call matching, put together: applications and their schemas
(`applications`), the handoff session that waits for the call under its number's
reservation lease (`handoffs`), the match of a voice call to it — exactly once, in one
etcd transaction that consumes the session, ends the reservation and starts the
number's quarantine (`matching`) — and the session's lifecycle both share (`sessions`).
No gRPC here but the NumberDistribution client handoffs reserve numbers with."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from opentelemetry import metrics

from accessline_server.callmatching.applications import Applications
from accessline_server.callmatching.crypto import SessionCrypto
from accessline_server.callmatching.handoffs import Handoff, Handoffs
from accessline_server.callmatching.hints import NumberHints
from accessline_server.callmatching.history import MatchHistory
from accessline_server.callmatching.journey.reads import Journey
from accessline_server.callmatching.matching import Call, Matcher
from accessline_server.callmatching.sessions import Limits, Sessions
from accessline_server.numberdistribution.dialled import DialledReader
from accessline_server.runtime.store import Store

if TYPE_CHECKING:
    from accessline.numberdistribution.v1.number_distribution_pb2_grpc import (
        NumberDistributionServiceAsyncStub,
    )


def guess_success_probability(code_length: int, max_attempts: int) -> float:
    """Chance that someone guessing codes on one reservation hits it before it locks:
    at most `max_attempts` distinct guesses among 10**code_length codes."""
    return float(min(1.0, max_attempts / 10**code_length))


class CallMatching:
    """Handoff sessions and call matching on one etcd, safe to run as several replicas."""

    def __init__(
        self,
        store: Store,
        numbers: NumberDistributionServiceAsyncStub,
        dialled: DialledReader,
        crypto: SessionCrypto,
        history: MatchHistory,
        limits: Limits,
        *,
        meter: metrics.Meter | None = None,
        clock: Callable[[], float] = time.time,
        journey: Journey | None = None,
    ) -> None:
        self.applications = Applications(store)
        self.sessions = Sessions(store, limits, clock)
        hints = NumberHints()
        self.handoffs = Handoffs(
            store, numbers, crypto, limits, self.applications, self.sessions, clock, journey, hints
        )
        self.matcher = Matcher(
            store,
            dialled,
            crypto,
            history,
            limits,
            self.sessions,
            meter=meter,
            clock=clock,
            journey=journey,
            hints=hints,
        )
        self.history = history


__all__ = ["Call", "CallMatching", "Handoff", "Limits", "guess_success_probability"]
