"""MatchCall reads what the dialled number holds itself, through NumberDistribution's
published `dialled` module, in the etcd read of its own keys: no gRPC hop to
NumberDistribution on a call. Real NumberDistribution and CallMatching processes on a
real etcd."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from tests.conftest import error_details, spawn_service, wait_serving
from tests.support.callmatching import (
    CODE_POLICY,
    S,
    System,
    as_system,
    call,
    fresh_ani,
    handoff,
    make_pool,
    register,
)

OTHER_SECRET = "a-numbers-secret-that-is-not-numberdistributions-0123"


@pytest.fixture
async def system(etcd: EmbeddedEtcd, prefix: str, tmp_path: Path) -> AsyncIterator[System]:
    """NumberDistribution, a CallMatching sharing its secret (`cm`) and one whose
    ACCESSLINE_NUMBERS_SECRET differs (`cm2`), as Routing sees them."""
    nd = spawn_service("accessline_server.numberdistribution", etcd.endpoint, prefix)
    await wait_serving(nd)
    processes = [nd]
    for name, secret in (("same", {}), ("other", {"ACCESSLINE_NUMBERS_SECRET": OTHER_SECRET})):
        processes.append(
            spawn_service(
                "accessline_server.callmatching",
                etcd.endpoint,
                prefix,
                ACCESSLINE_NUMBERDISTRIBUTION_ADDRESS=nd.address,
                ACCESSLINE_HISTORY_DSN=f"sqlite+aiosqlite:///{tmp_path}/{name}.db",
                ACCESSLINE_LATE_CALL_WINDOW_SECONDS="0",
                **secret,
            )
        )
    async with as_system(processes) as running:
        yield running


async def test_calls_are_matched_and_codes_checked_with_numberdistribution_down(
    system: System,
) -> None:
    subject, numbers = await make_pool(
        system, 2, access_code_policy=CODE_POLICY, resource_group="mortgage-team"
    )
    app_id = await register(system, S.MATCH_SCHEMA_NUMBER_ANI_CODE, max_code_attempts=5)
    ani = fresh_ani()
    started = await handoff(system, app_id, subject, ani_hint=ani)
    system.processes[0].stop()  # NumberDistribution: no replica answers any more

    number, code = started.access_number, started.access_code
    wrong = str((int(code) + 1) % 10**6).zfill(6)
    refused = await call(system.cm, number, ani=ani, dtmf=wrong)
    assert (refused.outcome, refused.resource_group) == (
        cm_pb2.MATCH_OUTCOME_CODE_MISMATCH,
        "mortgage-team",
    )
    free = next(n for n in numbers if n != number)
    nobody = await call(system.cm, free, ani=ani, dtmf=code)
    assert (nobody.outcome, nobody.resource_group) == (
        cm_pb2.MATCH_OUTCOME_NO_RESERVATION,
        "mortgage-team",
    )
    matched = await call(system.cm, number, ani=ani, dtmf=code)
    assert (matched.outcome, matched.session_id, matched.resource_group) == (
        cm_pb2.MATCH_OUTCOME_MATCHED,
        started.session_id,
        "mortgage-team",
    )
    again = await call(system.cm, number, ani=ani, dtmf=code)
    assert again.outcome == cm_pb2.MATCH_OUTCOME_NO_RESERVATION


async def test_a_callmatching_whose_numbers_secret_differs_refuses_to_check_codes(
    system: System,
) -> None:
    """Its hashes of the caller's digits would never match: it says why rather than count
    every right code as a wrong one, and the session waits untouched for the call."""
    subject, _ = await make_pool(system, 2, access_code_policy=CODE_POLICY)
    app_id = await register(system, S.MATCH_SCHEMA_NUMBER_CODE, max_code_attempts=5)
    started = await handoff(system, app_id, subject)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(system.cm2, started.access_number, dtmf=started.access_code)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(refused.value)["ErrorInfo"].reason == "CODE_SECRET_MISMATCH"
    assert "ACCESSLINE_NUMBERS_SECRET" in (refused.value.details() or "")

    state = await system.cm.GetSession(cm_pb2.GetSessionRequest(session_id=started.session_id))
    assert state.state == cm_pb2.SESSION_STATE_WAITING_FOR_CALL
    matched = await call(system.cm, started.access_number, dtmf=started.access_code)
    assert (matched.outcome, matched.session_id) == (
        cm_pb2.MATCH_OUTCOME_MATCHED,
        started.session_id,
    )

    # Calls without digits need no key: matched by the number alone.
    number_only = await register(system, S.MATCH_SCHEMA_NUMBER)
    plain = await handoff(system, number_only, subject)
    answered = await call(system.cm2, plain.access_number)
    assert (answered.outcome, answered.session_id) == (
        cm_pb2.MATCH_OUTCOME_MATCHED,
        plain.session_id,
    )
