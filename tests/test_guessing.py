"""Guessing access codes, as an attacker would: concurrent MatchCalls over two CallMatching
replicas on a real etcd, against exclusive and shared numbers, from one caller id, from
many, and from withheld ones. Every failure is counted before it is told, in one etcd
transaction per attempt, so no limit is overshot however the guesses race."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.callmatching.v1 import call_matching_pb2_grpc as cm_grpc
from accessline.common.v1 import common_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2_grpc as nd_grpc
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from tests.conftest import (
    ServiceProcess,
    connect,
    error_details,
    identity,
    spawn_service,
    wait_serving,
)

PREFIX = "/cm-guessing"
M = cm_pb2
CALLER_LIMIT = 5
WITHHELD_LIMIT = 6
NUMBER_LIMIT = 8
_serial = itertools.count(1)


def fresh_number() -> str:
    return f"+3325{next(_serial):07d}"


def fresh_ani() -> str:
    return f"+33613{next(_serial):06d}"


@dataclass
class System:
    nd: Any
    replicas: list[Any]
    processes: list[ServiceProcess]


async def start(etcd: EmbeddedEtcd, tmp: Path, prefix: str) -> System:
    nd = spawn_service("accessline_server.numberdistribution", etcd.endpoint, prefix)
    await wait_serving(nd)
    limits = {
        "ACCESSLINE_NUMBERDISTRIBUTION_ADDRESS": nd.address,
        "ACCESSLINE_ANI_FAILURE_LIMIT": str(CALLER_LIMIT),
        "ACCESSLINE_WITHHELD_FAILURE_LIMIT": str(WITHHELD_LIMIT),
        "ACCESSLINE_NUMBER_FAILURE_LIMIT": str(NUMBER_LIMIT),
        "ACCESSLINE_ANI_FAILURE_WINDOW_SECONDS": "3600",
        "ACCESSLINE_LATE_CALL_WINDOW_SECONDS": "0",
    }
    replicas = [
        spawn_service(
            "accessline_server.callmatching",
            etcd.endpoint,
            prefix,
            ACCESSLINE_HISTORY_DSN=f"sqlite+aiosqlite:///{tmp}/h{n}.db",
            **limits,
        )
        for n in (1, 2)
    ]
    for replica in replicas:
        await wait_serving(replica)
    return System(
        nd_grpc.NumberDistributionServiceStub(connect(nd.address)),
        # As Routing, which alone may call MatchCall (and with the superuser's token).
        [cm_grpc.CallMatchingServiceStub(connect(r.address, service="routing")) for r in replicas],
        [nd, *replicas],
    )


@pytest.fixture
async def system(etcd: EmbeddedEtcd, tmp_path: Path) -> AsyncIterator[System]:
    """Fresh processes and a fresh prefix per test: each test fills its buckets."""
    started = await start(etcd, tmp_path, f"{PREFIX}-{uuid.uuid4().hex[:8]}")
    try:
        yield started
    finally:
        for process in started.processes:
            process.stop()


async def pool(system: System, numbers: list[str], **fields: Any) -> str:
    subject = f"s-{uuid.uuid4().hex[:8]}"
    created = nd_pb2.Pool(pool_id=f"p-{uuid.uuid4().hex[:8]}", subjects=[subject], **fields)
    await system.nd.CreatePool(nd_pb2.CreatePoolRequest(pool=created))
    await system.nd.AddNumbers(nd_pb2.AddNumbersRequest(pool_id=created.pool_id, numbers=numbers))
    return subject


async def application(system: System, max_code_attempts: int) -> str:
    app_id = f"app-{uuid.uuid4().hex[:8]}"
    await system.replicas[0].RegisterApplication(
        cm_pb2.RegisterApplicationRequest(
            application=cm_pb2.Application(
                application_id=app_id,
                match_schema=common_pb2.MATCH_SCHEMA_NUMBER_CODE,
                max_code_attempts=max_code_attempts,
            )
        )
    )
    return app_id


async def handoffs(system: System, app_id: str, subject: str, count: int) -> list[Any]:
    return [
        await system.replicas[0].StartHandoff(
            cm_pb2.StartHandoffRequest(
                application_id=app_id,
                customer_id=f"customer-{n}",
                context=common_pb2.ContextData(subject=subject),
                device_can_dial=True,
                device_can_send_dtmf=True,
            )
        )
        for n in range(count)
    ]


async def guess(system: System, n: int, dnis: str, ani: str, dtmf: str = "") -> int:
    """One MatchCall, on replica n % 2."""
    answer = await system.replicas[n % 2].MatchCall(
        cm_pb2.MatchCallRequest(
            call_id=f"call-{uuid.uuid4().hex[:10]}", dnis=dnis, ani=ani, dtmf_digits=dtmf
        )
    )
    return int(answer.outcome)


def wrong_codes(right: set[str], count: int) -> list[str]:
    return [c for c in (f"{n:04d}" for n in range(10_000)) if c not in right][:count]


async def test_guesses_on_a_shared_number_stop_at_the_number_limit_across_replicas(
    system: System,
) -> None:
    number = fresh_number()
    subject = await pool(
        system,
        [number],
        mode=nd_pb2.POOL_MODE_SHARED,
        max_shares_per_number=10,
        resource_group="mortgage-team",
        access_code_policy=nd_pb2.AccessCodePolicy(mode=nd_pb2.ACCESS_CODE_MODE_REQUIRED, length=4),
    )
    app_id = await application(system, max_code_attempts=20)
    waiting = await handoffs(system, app_id, subject, 5)
    assert {h.access_number for h in waiting} == {number}
    codes = {h.access_code for h in waiting}

    # Forty guessers, each with a caller id of their own, race over both replicas.
    outcomes = Counter(
        await asyncio.gather(
            *(
                guess(system, n, number, fresh_ani(), code)
                for n, code in enumerate(wrong_codes(codes, 40))
            )
        )
    )
    assert outcomes == {
        M.MATCH_OUTCOME_CODE_MISMATCH: NUMBER_LIMIT,
        M.MATCH_OUTCOME_RATE_LIMITED: 40 - NUMBER_LIMIT,
    }

    # Past the limit even a right code is not told: the call goes on unmatched, and the
    # customers' sessions still wait (nothing was locked for them by the guessing).
    refused = await system.replicas[0].MatchCall(
        cm_pb2.MatchCallRequest(
            call_id="right-code", dnis=number, ani=fresh_ani(), dtmf_digits=waiting[0].access_code
        )
    )
    # ...and the switch still learns the number's group, to route the call unmatched.
    assert (refused.outcome, refused.resource_group) == (
        M.MATCH_OUTCOME_RATE_LIMITED,
        "mortgage-team",
    )
    for started in waiting:
        state = await system.replicas[1].GetSession(
            cm_pb2.GetSessionRequest(session_id=started.session_id)
        )
        assert state.state == cm_pb2.SESSION_STATE_WAITING_FOR_CALL


async def test_concurrent_guesses_on_one_session_never_get_past_its_lock(system: System) -> None:
    for _ in range(3):
        number = fresh_number()
        subject = await pool(
            system,
            [number],
            access_code_policy=nd_pb2.AccessCodePolicy(
                mode=nd_pb2.ACCESS_CODE_MODE_REQUIRED, length=4
            ),
        )
        app_id = await application(system, max_code_attempts=3)
        (started,) = await handoffs(system, app_id, subject, 1)
        # Thirty guesses at once over both replicas, the right code among them.
        guesses = [*wrong_codes({started.access_code}, 29), started.access_code]
        outcomes = Counter(
            await asyncio.gather(
                *(guess(system, n, number, fresh_ani(), code) for n, code in enumerate(guesses))
            )
        )
        told_wrong = outcomes[M.MATCH_OUTCOME_CODE_MISMATCH] + outcomes[M.MATCH_OUTCOME_LOCKED_OUT]
        # The session tells at most its 3 attempts: 2 mismatches then the lock, or the
        # match before the lock.
        if outcomes[M.MATCH_OUTCOME_MATCHED]:
            assert outcomes[M.MATCH_OUTCOME_MATCHED] == 1
            assert outcomes[M.MATCH_OUTCOME_LOCKED_OUT] == 0
            assert told_wrong <= 2
        else:
            assert outcomes[M.MATCH_OUTCOME_CODE_MISMATCH] == 2
            assert outcomes[M.MATCH_OUTCOME_LOCKED_OUT] == 1
        # And the number's bucket bounds everything the number answered.
        assert sum(n for o, n in outcomes.items() if o != M.MATCH_OUTCOME_RATE_LIMITED) <= (
            NUMBER_LIMIT + outcomes[M.MATCH_OUTCOME_MATCHED]
        )


async def test_one_caller_id_failing_concurrently_is_stopped_exactly_at_its_limit(
    system: System,
) -> None:
    prowler = fresh_ani()
    outcomes = Counter(
        await asyncio.gather(*(guess(system, n, fresh_number(), prowler) for n in range(40)))
    )
    assert outcomes == {
        M.MATCH_OUTCOME_NO_RESERVATION: CALLER_LIMIT,
        M.MATCH_OUTCOME_RATE_LIMITED: 40 - CALLER_LIMIT,
    }
    # Another caller is not held back by the prowler.
    assert await guess(system, 1, fresh_number(), fresh_ani()) == M.MATCH_OUTCOME_NO_RESERVATION


async def test_withheld_caller_ids_share_one_bucket(system: System) -> None:
    spellings = ["", "anonymous", "restricted", "Anonymous <sip:anonymous@anonymous.invalid>"]
    outcomes = Counter(
        await asyncio.gather(
            *(guess(system, n, fresh_number(), spellings[n % 4]) for n in range(20))
        )
    )
    assert outcomes == {
        M.MATCH_OUTCOME_NO_RESERVATION: WITHHELD_LIMIT,
        M.MATCH_OUTCOME_RATE_LIMITED: 20 - WITHHELD_LIMIT,
    }
    assert await guess(system, 0, fresh_number(), "") == M.MATCH_OUTCOME_RATE_LIMITED
    assert await guess(system, 1, fresh_number(), fresh_ani()) == M.MATCH_OUTCOME_NO_RESERVATION


async def test_only_callmatching_may_have_numberdistribution_check_a_code(system: System) -> None:
    number = fresh_number()
    subject = await pool(
        system,
        [number],
        access_code_policy=nd_pb2.AccessCodePolicy(mode=nd_pb2.ACCESS_CODE_MODE_REQUIRED, length=4),
    )
    app_id = await application(system, max_code_attempts=3)
    (started,) = await handoffs(system, app_id, subject, 1)
    # An administrator (or anyone but CallMatching) asking with digits is refused...
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await system.nd.ResolveNumber(
            nd_pb2.ResolveNumberRequest(dialled_number=number, dtmf_digits=started.access_code)
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_details(refused.value)["ErrorInfo"].reason == "CODE_CHECK_NOT_ALLOWED"
    # ...and without digits sees the number's state, never the ids that would let it end
    # someone's handoff.
    seen = await system.nd.ResolveNumber(nd_pb2.ResolveNumberRequest(dialled_number=number))
    assert len(seen.reservations) == 1
    shown = seen.reservations[0]
    assert (shown.reservation.session_id, shown.reservation.reservation_id) == ("", "")
    assert shown.code_check == nd_pb2.CODE_CHECK_MISSING  # a code is due, none given
    # CallMatching's own identity still gets the code checked.
    async with grpc.aio.secure_channel(
        system.processes[0].address, identity().service_credentials("callmatching")
    ) as channel:
        as_matching: Any = nd_grpc.NumberDistributionServiceStub(channel)
        checked = await as_matching.ResolveNumber(
            nd_pb2.ResolveNumberRequest(dialled_number=number, dtmf_digits=started.access_code)
        )
    assert checked.reservations[0].code_check == nd_pb2.CODE_CHECK_MATCH
    assert checked.reservations[0].reservation.session_id == started.session_id
