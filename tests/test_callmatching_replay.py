"""A switch asking CallMatching again about a call it already asked about (the first
answer lost to a stopped replica or a deadline): the same match, and nothing for any
other call."""

from __future__ import annotations

import pytest

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from tests.support.callmatching import (
    CODE_POLICY,
    S,
    System,
    call,
    fresh_numbers,
    handoff,
    make_pool,
    register,
)


@pytest.fixture
def system(callmatching_system: System) -> System:
    """The session's CallMatching system (tests/support/callmatching.py)."""
    return callmatching_system


async def test_a_switch_asking_again_for_the_same_call_gets_the_same_match(
    system: System,
) -> None:
    """The switch lost the answer (a replica stopped, its deadline passed after the match
    was made) and asks again for the same call: the same match, on any replica; another
    call, or the same call id on another number, gets nothing of it."""
    subject, _ = await make_pool(system, 1, access_code_policy=CODE_POLICY)
    app_id = await register(system, S.MATCH_SCHEMA_NUMBER_CODE)
    started = await handoff(system, app_id, subject)
    number, code = started.access_number, started.access_code
    first = await call(system.cm, number, dtmf=code, call_id="call-retried")
    assert first.outcome == cm_pb2.MATCH_OUTCOME_MATCHED
    again = await call(system.cm2, number, dtmf=code, call_id="call-retried")
    assert again == first
    other = await call(system.cm, number, dtmf=code, call_id="call-other")
    assert other.outcome == cm_pb2.MATCH_OUTCOME_NO_RESERVATION
    elsewhere = await call(system.cm, fresh_numbers(1)[0], dtmf=code, call_id="call-retried")
    assert elsewhere.outcome == cm_pb2.MATCH_OUTCOME_NO_RESERVATION
    state = await system.cm.GetSession(cm_pb2.GetSessionRequest(session_id=started.session_id))
    assert (state.state, state.call_id) == (cm_pb2.SESSION_STATE_MATCHED, "call-retried")
