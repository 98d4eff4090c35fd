"""CallMatching end to end: real NumberDistribution and CallMatching processes on a real
etcd. StartHandoff stores the app's context and reserves a number; MatchCall matches the
voice call to it exactly once, with every schema and every failure reason."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.callmatching.v1 import call_matching_pb2_grpc as cm_grpc
from accessline.common.v1 import common_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline_server.callmatching.domain import guess_success_probability
from accessline_server.runtime.contextdata import MAX_ATTRIBUTES, MAX_CONTEXT_BYTES, MAX_VALUE_BYTES
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from tests.conftest import (
    connect,
    error_details,
    eventually,
    spawn_service,
    violated_fields,
    wait_serving,
)
from tests.support.callmatching import (
    CODE_POLICY,
    MARKER,
    PREFIX,
    S,
    System,
    call,
    context,
    fresh_ani,
    fresh_numbers,
    handoff,
    make_pool,
    register,
    seconds,
)


@pytest.fixture
def system(callmatching_system: System) -> System:
    """The session's CallMatching system (tests/support/callmatching.py)."""
    return callmatching_system


@pytest.mark.parametrize(
    "schema",
    [
        S.MATCH_SCHEMA_NUMBER,
        S.MATCH_SCHEMA_NUMBER_ANI,
        S.MATCH_SCHEMA_NUMBER_CODE,
        S.MATCH_SCHEMA_NUMBER_ANI_CODE,
    ],
)
async def test_a_handoff_is_matched_exactly_once_with_each_schema(
    system: System, schema: int
) -> None:
    subject, numbers = await make_pool(system, 1, access_code_policy=CODE_POLICY)
    app_id = await register(system, schema)
    ani = fresh_ani()
    started = await handoff(system, app_id, subject, ani_hint=ani)
    needs_code = schema in (S.MATCH_SCHEMA_NUMBER_CODE, S.MATCH_SCHEMA_NUMBER_ANI_CODE)
    assert started.access_number == numbers[0]
    assert bool(started.access_code) == needs_code
    assert started.dial_string == (
        f"{numbers[0]},,{started.access_code}#" if needs_code else numbers[0]
    )
    assert started.display.number_display.startswith("02 4")

    matched = await call(
        system.cm, started.access_number, ani=ani, dtmf=started.access_code, call_id="call-A"
    )
    assert matched.outcome == cm_pb2.MATCH_OUTCOME_MATCHED
    assert matched.session_id == started.session_id
    assert matched.application_id == app_id
    assert matched.customer_id == "customer-1"
    assert matched.context == context(subject, note=MARKER)
    assert matched.skip_ivr
    assert matched.match_schema == schema
    assert matched.handoff_trace.traceparent.startswith("00-")

    state = await system.cm.GetSession(cm_pb2.GetSessionRequest(session_id=started.session_id))
    assert (state.state, state.merged_session_id, state.call_id) == (
        cm_pb2.SESSION_STATE_MATCHED,
        started.session_id,
        "call-A",
    )
    again = await call(system.cm2, started.access_number, ani=ani, dtmf=started.access_code)
    assert again.outcome == cm_pb2.MATCH_OUTCOME_NO_RESERVATION


async def test_calls_that_do_not_fit_the_schema_get_their_reason(system: System) -> None:
    subject, _ = await make_pool(system, 4, access_code_policy=CODE_POLICY)
    app_id = await register(system, S.MATCH_SCHEMA_NUMBER_ANI_CODE, max_code_attempts=5)
    ani = fresh_ani()
    started = await handoff(system, app_id, subject, ani_hint=ani)
    number, code = started.access_number, started.access_code
    wrong = str((int(code) + 1) % 10**6).zfill(6)

    outcomes = [
        (await call(system.cm, number, ani=fresh_ani(), dtmf=code)).outcome,
        (await call(system.cm, number, ani="", dtmf=code)).outcome,
        (await call(system.cm, number, ani="anonymous", dtmf=code)).outcome,
        (await call(system.cm, number, ani=ani, dtmf=wrong)).outcome,
        (await call(system.cm, number, ani=ani, dtmf="")).outcome,
        (await call(system.cm, fresh_numbers(1)[0], ani=ani, dtmf=code)).outcome,
    ]
    assert outcomes == [
        cm_pb2.MATCH_OUTCOME_ANI_MISMATCH,
        cm_pb2.MATCH_OUTCOME_ANI_WITHHELD,
        cm_pb2.MATCH_OUTCOME_ANI_WITHHELD,
        cm_pb2.MATCH_OUTCOME_CODE_MISMATCH,
        cm_pb2.MATCH_OUTCOME_CODE_MISMATCH,
        cm_pb2.MATCH_OUTCOME_NO_RESERVATION,
    ]
    # None of those consumed the session: the right call still matches.
    assert (
        await call(system.cm, number, ani=ani, dtmf=code)
    ).outcome == cm_pb2.MATCH_OUTCOME_MATCHED


async def test_an_expired_session_answers_expired_and_its_number_rests(system: System) -> None:
    subject, numbers = await make_pool(system, 1, quarantine=seconds(3))
    app_id = await register(system, S.MATCH_SCHEMA_NUMBER)
    started = await handoff(system, app_id, subject, ttl=seconds(1))

    async def expired() -> bool:
        got = await system.cm.GetSession(cm_pb2.GetSessionRequest(session_id=started.session_id))
        return got.state == cm_pb2.SESSION_STATE_EXPIRED

    await eventually(expired, timeout=10, what="session expired")
    late = await call(system.cm, numbers[0])
    assert late.outcome == cm_pb2.MATCH_OUTCOME_EXPIRED
    # The next customer cannot get the number while it rests.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await handoff(system, app_id, subject)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_the_late_caller_never_matches_the_next_customers_session(system: System) -> None:
    subject, numbers = await make_pool(
        system, 1, quarantine=seconds(1), access_code_policy=CODE_POLICY
    )
    app_id = await register(system, S.MATCH_SCHEMA_NUMBER_CODE)
    first = await handoff(system, app_id, subject)
    assert (
        await call(system.cm, numbers[0], dtmf=first.access_code)
    ).outcome == cm_pb2.MATCH_OUTCOME_MATCHED
    late = await call(system.cm, numbers[0], dtmf=first.access_code)
    assert late.outcome == cm_pb2.MATCH_OUTCOME_NO_RESERVATION

    async def next_customer() -> cm_pb2.StartHandoffResponse | None:
        try:
            return await handoff(system, app_id, subject)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            return None

    second = await eventually(
        next_customer, timeout=20, interval=0.2, what="number back after quarantine"
    )
    assert second.access_number == numbers[0]
    assert second.access_code != first.access_code
    # The late caller redials with the old code (it sits in the phone's dial string):
    # told apart from a guesser, never counted against the next customer's session.
    for _ in range(4):
        late_again = await call(system.cm, numbers[0], dtmf=first.access_code)
        assert late_again.outcome == cm_pb2.MATCH_OUTCOME_STALE_CODE
    state = await system.cm.GetSession(cm_pb2.GetSessionRequest(session_id=second.session_id))
    assert state.state == cm_pb2.SESSION_STATE_WAITING_FOR_CALL
    matched = await call(system.cm, numbers[0], dtmf=second.access_code)
    assert matched.outcome == cm_pb2.MATCH_OUTCOME_MATCHED
    assert matched.session_id == second.session_id


async def test_number_only_matching_gets_numbers_only_from_pools_resting_long_enough(
    system: System, etcd: EmbeddedEtcd, tmp_path: Path
) -> None:
    """With the number alone, only the quarantine keeps a late caller from the next
    customer: such an application is refused pools resting less than the window."""
    short, _ = await make_pool(system, 1, quarantine=seconds(5))
    long, numbers = await make_pool(system, 1, quarantine=seconds(120))
    cm = spawn_service(
        "accessline_server.callmatching",
        etcd.endpoint,
        PREFIX,
        ACCESSLINE_NUMBERDISTRIBUTION_ADDRESS=system.processes[0].address,
        ACCESSLINE_HISTORY_DSN=f"sqlite+aiosqlite:///{tmp_path}/h.db",
        ACCESSLINE_LATE_CALL_WINDOW_SECONDS="60",
    )
    try:
        await wait_serving(cm)
        async with connect(cm.address) as channel:
            stub = cm_grpc.CallMatchingServiceStub(channel)
            app_id = await register(system, S.MATCH_SCHEMA_NUMBER)
            request = cm_pb2.StartHandoffRequest(
                application_id=app_id, customer_id="c", context=context(short)
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.StartHandoff(request)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error_details(refused.value)["ErrorInfo"].reason == "QUARANTINE_TOO_SHORT"
            request.context.subject = long
            assert (await stub.StartHandoff(request)).access_number == numbers[0]
            # An application matching by the code too may use the short one.
            code_app = await register(system, S.MATCH_SCHEMA_NUMBER_CODE)
            await system.nd.UpdatePool(
                nd_pb2.UpdatePoolRequest(
                    pool=nd_pb2.Pool(
                        pool_id=(await pool_of(system, short)).pool_id,
                        subjects=[short],
                        quarantine=seconds(5),
                        access_code_policy=CODE_POLICY,
                    )
                )
            )
            request.application_id = code_app
            request.context.subject = short
            assert (await stub.StartHandoff(request)).access_code
    finally:
        cm.stop()


async def pool_of(system: System, subject: str) -> nd_pb2.Pool:
    pools = await system.nd.ListPools(nd_pb2.ListPoolsRequest(page_size=500))
    return next(p for p in pools.pools if subject in p.subjects)


async def test_many_calls_racing_on_two_replicas_match_a_session_exactly_once(
    system: System,
) -> None:
    subject, _ = await make_pool(system, 10, access_code_policy=CODE_POLICY)
    app_id = await register(system, S.MATCH_SCHEMA_NUMBER_CODE)
    sessions = [await handoff(system, app_id, subject) for _ in range(10)]
    calls = [
        call(
            system.cm if i % 2 else system.cm2,
            s.access_number,
            dtmf=s.access_code,
            call_id=f"race-{n}-{i}",
        )
        for n, s in enumerate(sessions)
        for i in range(12)
    ]
    answers = await asyncio.gather(*calls)
    for n, started in enumerate(sessions):
        mine = answers[n * 12 : (n + 1) * 12]
        winners = [a for a in mine if a.outcome == cm_pb2.MATCH_OUTCOME_MATCHED]
        assert len(winners) == 1, [cm_pb2.MatchOutcome.Name(a.outcome) for a in mine]
        assert winners[0].session_id == started.session_id
        assert {a.outcome for a in mine} <= {
            cm_pb2.MATCH_OUTCOME_MATCHED,
            cm_pb2.MATCH_OUTCOME_NO_RESERVATION,
        }
        state = await system.cm.GetSession(cm_pb2.GetSessionRequest(session_id=started.session_id))
        assert state.state == cm_pb2.SESSION_STATE_MATCHED


async def test_a_wrong_code_racing_the_right_one_never_knocks_out_the_right_caller(
    system: System,
) -> None:
    rounds = 30
    subject, _ = await make_pool(system, rounds, access_code_policy=CODE_POLICY)
    app_id = await register(system, S.MATCH_SCHEMA_NUMBER_CODE, max_code_attempts=5)
    sessions = [await handoff(system, app_id, subject) for _ in range(rounds)]
    outcomes = []
    for n, started in enumerate(sessions):
        wrong = str((int(started.access_code) + 1) % 10**6).zfill(6)
        # The two calls on two replicas: the wrong one counts an attempt on the session
        # while the right one is deciding.
        guess, right = await asyncio.gather(
            call(system.cm, started.access_number, dtmf=wrong, call_id=f"wrong-{n}"),
            call(system.cm2, started.access_number, dtmf=started.access_code, call_id=f"ok-{n}"),
        )
        outcomes.append((guess.outcome, right.outcome))
    assert all(r == cm_pb2.MATCH_OUTCOME_MATCHED for _, r in outcomes), [
        (cm_pb2.MatchOutcome.Name(g), cm_pb2.MatchOutcome.Name(r)) for g, r in outcomes
    ]
    # The wrong code was a mismatch, or came after the match and found nothing.
    assert {g for g, _ in outcomes} <= {
        cm_pb2.MATCH_OUTCOME_CODE_MISMATCH,
        cm_pb2.MATCH_OUTCOME_NO_RESERVATION,
    }


async def test_guessing_codes_locks_the_reservation_after_the_limit(system: System) -> None:
    policy = nd_pb2.AccessCodePolicy(mode=nd_pb2.ACCESS_CODE_MODE_REQUIRED, length=4)
    subject, numbers = await make_pool(system, 1, access_code_policy=policy, quarantine=seconds(30))
    app_id = await register(system, S.MATCH_SCHEMA_NUMBER_CODE, max_code_attempts=3)
    started = await handoff(system, app_id, subject)
    guesses = [str(g).zfill(4) for g in range(10_000) if str(g).zfill(4) != started.access_code][:3]
    outcomes = [(await call(system.cm, numbers[0], dtmf=g)).outcome for g in guesses]
    assert outcomes == [
        cm_pb2.MATCH_OUTCOME_CODE_MISMATCH,
        cm_pb2.MATCH_OUTCOME_CODE_MISMATCH,
        cm_pb2.MATCH_OUTCOME_LOCKED_OUT,
    ]
    # Locked and released: even the right code no longer matches, and the number rests.
    assert (
        await call(system.cm, numbers[0], dtmf=started.access_code)
    ).outcome == cm_pb2.MATCH_OUTCOME_NO_RESERVATION
    state = await system.cm.GetSession(cm_pb2.GetSessionRequest(session_id=started.session_id))
    assert state.state == cm_pb2.SESSION_STATE_LOCKED
    resolved = await system.nd.ResolveNumber(nd_pb2.ResolveNumberRequest(dialled_number=numbers[0]))
    assert resolved.quarantined
    assert list(resolved.reservations) == []
    # So a guesser gets 3 tries among 10,000 codes: a 0.03 % chance, as documented.
    assert guess_success_probability(4, 3) == pytest.approx(0.0003)


async def test_a_caller_number_that_keeps_failing_is_rate_limited(system: System) -> None:
    subject, _numbers = await make_pool(system, 1)
    app_id = await register(system, S.MATCH_SCHEMA_NUMBER)
    started = await handoff(system, app_id, subject)
    prowler = fresh_ani()
    misses = [(await call(system.cm, fresh_numbers(1)[0], ani=prowler)).outcome for _ in range(4)]
    assert misses == [cm_pb2.MATCH_OUTCOME_NO_RESERVATION] * 4
    # The limit (4 here) is shared by the replicas through etcd.
    refused = await call(system.cm2, started.access_number, ani=prowler)
    assert refused.outcome == cm_pb2.MATCH_OUTCOME_RATE_LIMITED
    honest = await call(system.cm2, started.access_number, ani=fresh_ani())
    assert honest.outcome == cm_pb2.MATCH_OUTCOME_MATCHED


async def test_handoffs_are_refused_clearly_when_they_cannot_be_served(system: System) -> None:
    subject, _ = await make_pool(system, 1, quarantine=seconds(0))
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await handoff(system, "no-such-app", subject)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    ani_app = await register(system, S.MATCH_SCHEMA_NUMBER_ANI, required_context_keys=["contract"])
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await handoff(system, ani_app, subject)
    assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(missing.value) == {"ani_hint", "context.attributes[contract]"}

    code_app = await register(system, S.MATCH_SCHEMA_NUMBER_CODE)
    with pytest.raises(grpc.aio.AioRpcError) as no_codes:
        await handoff(system, code_app, subject)
    assert no_codes.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # The number reserved for that refused handoff was given back.
    number_app = await register(system, S.MATCH_SCHEMA_NUMBER)
    assert (await handoff(system, number_app, subject)).access_number


async def test_a_retried_handoff_returns_the_same_session_and_code(system: System) -> None:
    subject, _ = await make_pool(system, 3, access_code_policy=CODE_POLICY)
    app_id = await register(system, S.MATCH_SCHEMA_NUMBER_CODE)
    first = await handoff(system, app_id, subject, idempotency_key="tap-77")
    again = await handoff(system, app_id, subject, idempotency_key="tap-77")
    assert again == first
    other = await handoff(system, app_id, subject, idempotency_key="tap-78")
    assert other.session_id != first.session_id


async def test_a_cancelled_handoff_frees_its_number(system: System) -> None:
    subject, numbers = await make_pool(system, 1, quarantine=seconds(0))
    app_id = await register(system, S.MATCH_SCHEMA_NUMBER)
    started = await handoff(system, app_id, subject)
    await system.cm.CancelHandoff(cm_pb2.CancelHandoffRequest(session_id=started.session_id))
    state = await system.cm.GetSession(cm_pb2.GetSessionRequest(session_id=started.session_id))
    assert state.state == cm_pb2.SESSION_STATE_CANCELLED
    assert (await call(system.cm, numbers[0])).outcome == cm_pb2.MATCH_OUTCOME_NO_RESERVATION
    assert (await handoff(system, app_id, subject)).access_number == numbers[0]


def _context_is_acceptable(attributes: dict[str, str]) -> bool:
    import re

    if len(attributes) > MAX_ATTRIBUTES:
        return False
    for key, value in attributes.items():
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", key) or len(value.encode()) > MAX_VALUE_BYTES:
            return False
    return (
        common_pb2.ContextData(subject="x" * 12, attributes=attributes).ByteSize()
        <= MAX_CONTEXT_BYTES
    )


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    attributes=st.dictionaries(
        st.text(alphabet="abcXYZ019_.-é ", min_size=0, max_size=70),
        st.text(min_size=0, max_size=1100),
        max_size=36,
    )
)
async def test_context_limits_are_enforced_with_field_violations(
    system: System, attributes: dict[str, str]
) -> None:
    subject, _ = await make_pool(system, 1, quarantine=seconds(0))
    app_id = await register(system, S.MATCH_SCHEMA_NUMBER)
    request = cm_pb2.StartHandoffRequest(
        application_id=app_id,
        customer_id="customer-1",
        context=common_pb2.ContextData(subject=subject, attributes=attributes),
    )
    if _context_is_acceptable(attributes):
        started = await system.cm.StartHandoff(request)
        await system.cm.CancelHandoff(cm_pb2.CancelHandoffRequest(session_id=started.session_id))
    else:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await system.cm.StartHandoff(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert all(f.startswith("context") for f in violated_fields(caught.value))


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(dnis=st.text(max_size=40), ani=st.text(max_size=40))
async def test_any_dialled_and_caller_numbers_get_an_outcome_or_a_clear_refusal(
    system: System, dnis: str, ani: str
) -> None:
    try:
        answer = await call(system.cm, dnis, ani=ani)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violated_fields(exc) <= {"dnis", "ani"}
    else:
        assert answer.outcome in (
            cm_pb2.MATCH_OUTCOME_NO_RESERVATION,
            cm_pb2.MATCH_OUTCOME_RATE_LIMITED,
            cm_pb2.MATCH_OUTCOME_EXPIRED,
        )


async def test_dialled_numbers_match_in_every_common_format(system: System) -> None:
    subject, _numbers = await make_pool(system, 4)
    app_id = await register(system, S.MATCH_SCHEMA_NUMBER_ANI)
    ani = fresh_ani()
    formats = [
        lambda n: "0" + n[3:],
        lambda n: f"tel:{n}",
        lambda n: f"sip:{n}@edge.example.net;user=phone",
        lambda n: f"{n[:3]} {n[3]} {n[4:6]} {n[6:8]} {n[8:10]} {n[10:]}",
    ]
    for spell in formats:
        started = await handoff(
            system, app_id, subject, ani_hint="0" + ani[3:], default_region="FR"
        )
        answer = await system.cm.MatchCall(
            cm_pb2.MatchCallRequest(
                call_id="fmt", dnis=spell(started.access_number), ani=ani, default_region="FR"
            )
        )
        assert answer.outcome == cm_pb2.MATCH_OUTCOME_MATCHED, spell(started.access_number)


async def test_personal_data_never_reaches_the_logs(system: System) -> None:
    subject, _ = await make_pool(system, 1, access_code_policy=CODE_POLICY)
    app_id = await register(system, S.MATCH_SCHEMA_NUMBER_ANI_CODE)
    ani = fresh_ani()
    started = await handoff(system, app_id, subject, ani_hint=ani)
    answer = await call(system.cm, started.access_number, ani=ani, dtmf=started.access_code)
    assert answer.outcome == cm_pb2.MATCH_OUTCOME_MATCHED
    await system.processes[1].wait_for_log("call match decided")
    logs = "\n".join(line for p in system.processes for line in p.lines)
    assert MARKER not in logs
    assert ani not in logs
    assert f'"{started.access_code}"' not in logs
    for line in system.processes[1].lines:
        json.loads(line)  # every line is a JSON object


async def test_pool_exhaustion_reaches_the_app_with_retry_info(system: System) -> None:
    subject, _ = await make_pool(system, 1)
    app_id = await register(system, S.MATCH_SCHEMA_NUMBER)
    await handoff(system, app_id, subject)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await handoff(system, app_id, subject)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(caught.value)
    assert status is not None
    assert any(d.TypeName() == "google.rpc.RetryInfo" for d in status.details)
