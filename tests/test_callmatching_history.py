"""CallMatching's match history end to end: every attempt recorded and summarised, on
SQLite and on a PostgreSQL shared by replicas that survives an outage without failing a
match, and a replica that waits for the deploy's migration."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.callmatching.v1 import call_matching_pb2_grpc as cm_grpc
from accessline.journey.v1 import journey_pb2 as jn
from accessline.journey.v1 import journey_pb2_grpc as jn_grpc
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd, free_port
from accessline_server.runtime.tables import engine_for
from tests.conftest import (
    ROOT,
    connect,
    error_details,
    eventually,
    health_status,
    spawn_service,
    wait_serving,
)
from tests.support.callmatching import (
    PREFIX,
    WITHHELD_LIMIT,
    S,
    System,
    call,
    context,
    fresh_ani,
    handoff,
    make_pool,
    register,
)


@pytest.fixture
def system(callmatching_system: System) -> System:
    """The session's CallMatching system (tests/support/callmatching.py)."""
    return callmatching_system


async def test_history_records_every_attempt_and_gives_statistics(system: System) -> None:
    subject, _ = await make_pool(system, 3)
    app_id = await register(system, S.MATCH_SCHEMA_NUMBER_ANI)
    ani = fresh_ani()
    for _ in range(2):
        started = await handoff(system, app_id, subject, ani_hint=ani)
        assert (
            await call(system.cm, started.access_number, ani=ani)
        ).outcome == cm_pb2.MATCH_OUTCOME_MATCHED
    started = await handoff(system, app_id, subject, ani_hint=ani)
    assert (
        await call(system.cm, started.access_number, ani=fresh_ani())
    ).outcome == cm_pb2.MATCH_OUTCOME_ANI_MISMATCH

    async def recorded() -> list[cm_pb2.MatchAttempt]:
        page = await system.cm.ListMatchAttempts(
            cm_pb2.ListMatchAttemptsRequest(application_id=app_id)
        )
        return list(page.attempts) if len(page.attempts) == 3 else []

    attempts = await eventually(recorded, what="three attempts in history")
    assert [a.outcome for a in attempts] == [
        cm_pb2.MATCH_OUTCOME_ANI_MISMATCH,
        cm_pb2.MATCH_OUTCOME_MATCHED,
        cm_pb2.MATCH_OUTCOME_MATCHED,
    ]
    assert all(len(a.ani_hash) == 64 and ani[1:] not in a.ani_hash for a in attempts)
    assert all(
        a.pool_id and a.session_id and a.match_schema == S.MATCH_SCHEMA_NUMBER_ANI for a in attempts
    )

    first = await system.cm.ListMatchAttempts(
        cm_pb2.ListMatchAttemptsRequest(application_id=app_id, page_size=2)
    )
    second = await system.cm.ListMatchAttempts(
        cm_pb2.ListMatchAttemptsRequest(
            application_id=app_id, page_size=2, page_token=first.next_page_token
        )
    )
    assert [a.attempt_id for a in [*first.attempts, *second.attempts]] == [
        a.attempt_id for a in attempts
    ]
    assert second.next_page_token == ""
    only = await system.cm.ListMatchAttempts(
        cm_pb2.ListMatchAttemptsRequest(
            application_id=app_id, outcome=cm_pb2.MATCH_OUTCOME_ANI_MISMATCH
        )
    )
    assert len(only.attempts) == 1

    stats = await system.cm.GetMatchStats(cm_pb2.GetMatchStatsRequest(application_id=app_id))
    assert (stats.attempts, stats.matched) == (3, 2)
    assert stats.success_rate == pytest.approx(2 / 3)
    assert {o.outcome: o.count for o in stats.outcomes} == {
        cm_pb2.MATCH_OUTCOME_MATCHED: 2,
        cm_pb2.MATCH_OUTCOME_ANI_MISMATCH: 1,
    }
    assert stats.handoff_to_call_p50.ToNanoseconds() > 0
    assert stats.handoff_to_call_p95.ToNanoseconds() >= stats.handoff_to_call_p50.ToNanoseconds()


async def test_history_on_postgresql_survives_an_outage_without_failing_matches(
    system: System, etcd: EmbeddedEtcd, postgres: Any, tmp_path: Path
) -> None:
    nd_address = system.processes[0].address
    env = {
        "ACCESSLINE_NUMBERDISTRIBUTION_ADDRESS": nd_address,
        "ACCESSLINE_HISTORY_DSN": postgres.dsn,
        "ACCESSLINE_WITHHELD_FAILURE_LIMIT": WITHHELD_LIMIT,
    }
    replicas = [
        spawn_service("accessline_server.callmatching", etcd.endpoint, PREFIX, **env)
        for _ in range(2)
    ]
    channels = [connect(r.address, service="routing") for r in replicas]
    try:
        for replica in replicas:
            await wait_serving(replica)
        stubs = [cm_grpc.CallMatchingServiceStub(c) for c in channels]
        subject, _ = await make_pool(system, 4)
        app_id = await register(system, S.MATCH_SCHEMA_NUMBER)
        for stub in stubs:
            started = await handoff(system, app_id, subject)
            assert (await call(stub, started.access_number)).outcome == cm_pb2.MATCH_OUTCOME_MATCHED

        async def shared_history(expected: int) -> bool:
            page = await stubs[0].ListMatchAttempts(
                cm_pb2.ListMatchAttemptsRequest(application_id=app_id)
            )
            return len(page.attempts) == expected

        # Both replicas write to the one database.
        await eventually(lambda: shared_history(2), what="both replicas' attempts in PostgreSQL")

        history = "accessline.callmatching.v1.MatchHistory"
        postgres.stop()
        started = await handoff(system, app_id, subject)
        assert (await call(stubs[1], started.access_number)).outcome == cm_pb2.MATCH_OUTCOME_MATCHED
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        await eventually(
            lambda: _status(replicas[1].address, history, not_serving),
            what="history NOT_SERVING in health",
        )
        assert await health_status(replicas[1].address) == health_pb2.HealthCheckResponse.SERVING

        postgres.start()
        await postgres.wait_ready()
        await eventually(
            lambda: shared_history(3), timeout=30, what="buffered attempt written after the outage"
        )
        assert (
            await health_status(replicas[1].address, history)
            == health_pb2.HealthCheckResponse.SERVING
        )
        stats = await stubs[0].GetMatchStats(cm_pb2.GetMatchStatsRequest(application_id=app_id))
        assert (stats.attempts, stats.matched) == (3, 3)
    finally:
        for channel in channels:
            await channel.close()
        for replica in replicas:
            replica.stop()


async def test_a_replica_that_does_not_migrate_waits_for_the_migration_of_the_deploy(
    system: System, etcd: EmbeddedEtcd, postgres: Any
) -> None:
    import asyncpg

    database = f"history_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(host="127.0.0.1", port=postgres.port, user="postgres")
    await admin.execute(f"CREATE DATABASE {database}")
    await admin.close()
    dsn = postgres.dsn.rsplit("/", 1)[0] + f"/{database}"
    replica = spawn_service(
        "accessline_server.callmatching",
        etcd.endpoint,
        PREFIX,
        ACCESSLINE_NUMBERDISTRIBUTION_ADDRESS=system.processes[0].address,
        ACCESSLINE_HISTORY_DSN=dsn,
        ACCESSLINE_HISTORY_MIGRATE="false",
        ACCESSLINE_WITHHELD_FAILURE_LIMIT=WITHHELD_LIMIT,
    )
    history = "accessline.callmatching.v1.MatchHistory"
    try:
        await wait_serving(replica)
        async with connect(replica.address, service="routing") as channel:
            stub = cm_grpc.CallMatchingServiceStub(channel)
            subject, _ = await make_pool(system, 1)
            app_id = await register(system, S.MATCH_SCHEMA_NUMBER)
            started = await handoff(system, app_id, subject)
            # Matching does not wait for the history: the attempt is buffered.
            assert (await call(stub, started.access_number)).outcome == (
                cm_pb2.MATCH_OUTCOME_MATCHED
            )
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            await eventually(
                lambda: _status(replica.address, history, not_serving),
                what="history NOT_SERVING until migrated",
            )
            await replica.wait_for_log("accessline history migrate")
            # The deploy's migration, run twice (a repeated Job changes nothing).
            everything = (
                "audit_events, journey_alembic_version, journey_identifiers,"
                " journey_interactions, journey_transactions, match_attempts"
            )
            for expected in (everything, "nothing"):
                done = await asyncio.to_thread(
                    subprocess.run,
                    [
                        sys.executable,
                        "-m",
                        "accessline_server.cli",
                        "history",
                        "migrate",
                        "--dsn",
                        dsn,
                    ],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'gen'}"},
                )
                assert done.returncode == 0, done.stderr
                assert f"created: {expected}" in done.stdout

            async def written() -> bool:
                page = await stub.ListMatchAttempts(
                    cm_pb2.ListMatchAttemptsRequest(application_id=app_id)
                )
                return len(page.attempts) == 1

            await eventually(written, timeout=30, what="the buffered attempt written")
            assert await health_status(replica.address, history) == (
                health_pb2.HealthCheckResponse.SERVING
            )
            await _journey_on_postgresql(replica.address, app_id, started.session_id)
    finally:
        replica.stop()


async def _status(address: str, service: str, want: int) -> bool:
    return await health_status(address, service) == want


async def test_a_sqlite_history_is_written_in_wal_mode(tmp_path: Path) -> None:
    engine = engine_for(f"sqlite+aiosqlite:///{tmp_path / 'history.db'}")
    try:
        async with engine.connect() as conn:
            mode = (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar()
    finally:
        await engine.dispose()
    assert mode == "wal"


async def _journey_on_postgresql(address: str, app_id: str, session_id: str) -> None:
    """The customer's journey in the migrated PostgreSQL database: the matched call (its
    handoff started on another replica), an outside e-mail of the same customer, newest
    first."""
    async with connect(address) as channel:
        await _journey_checked(jn_grpc.JourneyServiceStub(channel), app_id, session_id)


async def _journey_checked(stub: Any, app_id: str, session_id: str) -> None:
    customer = "customer-1"

    async def listed() -> list[Any]:
        reply = await stub.ListInteractions(
            jn.ListInteractionsRequest(application_id=app_id, customer_id=customer)
        )
        return list(reply.interactions)

    async def matched() -> bool:
        found = await listed()
        return bool(found) and found[0].outcome == "MATCHED"

    await eventually(matched, timeout=30, what="the matched handoff in the journey")
    await stub.RecordInteraction(
        jn.RecordInteractionRequest(
            interaction=jn.Interaction(
                interaction_id="mail-1",
                application_id=app_id,
                channel=jn.INTERACTION_CHANNEL_EMAIL,
                status=jn.INTERACTION_STATUS_RECEIVED,
            ),
            correlation=jn.Correlation(customer_id=customer),
        )
    )
    assert [r.interaction_id for r in await listed()] == ["mail-1", session_id]


async def test_a_handoff_goes_on_when_the_history_database_does_not_answer(
    system: System, etcd: EmbeddedEtcd
) -> None:
    """The customer's open transactions are looked up as a handoff starts: with the
    database unreachable, the handoff goes without them and its call still matches; the
    journey's reads say UNAVAILABLE."""
    replica = spawn_service(
        "accessline_server.callmatching",
        etcd.endpoint,
        PREFIX,
        ACCESSLINE_NUMBERDISTRIBUTION_ADDRESS=system.processes[0].address,
        ACCESSLINE_HISTORY_DSN=f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/none",
        ACCESSLINE_WITHHELD_FAILURE_LIMIT=WITHHELD_LIMIT,
    )
    try:
        await wait_serving(replica)
        async with connect(replica.address, service="routing") as channel:
            stub = cm_grpc.CallMatchingServiceStub(channel)
            subject, _ = await make_pool(system, 1)
            app_id = await register(system, S.MATCH_SCHEMA_NUMBER)
            started = await stub.StartHandoff(
                cm_pb2.StartHandoffRequest(
                    application_id=app_id, customer_id="customer-1", context=context(subject)
                )
            )
            matched = await call(stub, started.access_number)
            assert matched.outcome == cm_pb2.MATCH_OUTCOME_MATCHED
            assert list(matched.context.open_transactions) == []
        async with connect(replica.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await jn_grpc.JourneyServiceStub(channel).ListInteractions(
                    jn.ListInteractionsRequest(application_id=app_id, customer_id="customer-1")
                )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_details(caught.value)["ErrorInfo"].reason == "HISTORY_UNAVAILABLE"
    finally:
        replica.stop()
