"""The one way Accessline waits between attempts: exponential from a first step, with
jitter, capped, back to the first step after progress."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from accessline_server.runtime.backoff import Backoff, delay


@given(
    first=st.floats(min_value=0.01, max_value=5.0),
    cap=st.floats(min_value=0.01, max_value=600.0),
    failures=st.integers(min_value=1, max_value=40),
)
def test_a_wait_doubles_per_failure_with_jitter_of_the_first_step_and_never_passes_the_cap(
    first: float, cap: float, failures: int
) -> None:
    base = first * 2 ** (failures - 1)
    wait = delay(failures, first, cap)
    assert wait <= cap + 1e-9
    assert min(base, cap) - 1e-9 <= wait <= min(base + first, cap) + 1e-9


def test_a_loop_that_makes_progress_waits_the_first_step_again() -> None:
    backoff = Backoff(0.1, 2.0)
    waits = [backoff.next() for _ in range(6)]
    assert 0.1 <= waits[0] <= 0.2
    assert 1.6 <= waits[4] <= 1.7
    assert waits[5] == 2.0
    backoff.reset()
    assert 0.1 <= backoff.next() <= 0.2
