"""Waiting between attempts, the same way everywhere: exponential from a first step, with
jitter so that replicas do not retry in step, and a cap, computed by tenacity's
`wait_exponential_jitter`. `Backoff` serves the loops that keep something alive (a
watch, the lease keep-alive stream, the dispatch campaign): they start over at the first
step once they make progress again."""

from __future__ import annotations

import tenacity


class Backoff:
    """The waits of one loop's failed attempts in a row."""

    def __init__(self, first: float, cap: float) -> None:
        self._wait = tenacity.wait_exponential_jitter(initial=first, max=cap, jitter=first)
        self._state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
        self._state.attempt_number = 0

    def reset(self) -> None:
        """The loop made progress: the next failure waits the first step again."""
        self._state.attempt_number = 0

    def next(self) -> float:
        """Seconds to wait after one more failed attempt: `first` to `2 * first` after the
        first, doubling after each next one, at most `cap`."""
        self._state.attempt_number += 1
        return float(self._wait(self._state))


def delay(failures: int, first: float, cap: float) -> float:
    """Seconds to wait after `failures` failed attempts in a row (at least 1), as
    `Backoff` would: for attempts whose count is kept elsewhere (in etcd)."""
    backoff = Backoff(first, cap)
    backoff._state.attempt_number = max(0, failures - 1)
    return backoff.next()
