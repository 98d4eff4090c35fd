"""An app that gives up on a handoff while CallMatching is starting it (its request
cancelled, its deadline past): the number reserved for it is given back at once, not
held until the session's time to live ends with nobody to call it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets

import grpc
import pytest

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from tests.conftest import eventually
from tests.support.callmatching import (
    S,
    System,
    context,
    make_pool,
    register,
)


@pytest.fixture
def system(callmatching_system: System) -> System:
    """The session's CallMatching system (tests/support/callmatching.py)."""
    return callmatching_system


async def given_up(
    system: System, app_id: str, subject: str, count: int, keyed: bool
) -> dict[str, bool]:
    """`count` handoffs each given up on 0 to 9 ms after it was sent (before, during and
    after the number's reservation and the session's transaction), each in a trace of
    its own; by trace id, whether the app got its answer first."""
    answered = {}
    for n in range(count):
        trace_id = secrets.token_hex(16)
        attempt = system.cm.StartHandoff(
            cm_pb2.StartHandoffRequest(
                application_id=app_id,
                customer_id=f"c-{n}",
                context=context(subject),
                idempotency_key=f"k-{n}" if keyed else "",
            ),
            metadata=traced(trace_id),
        )
        await asyncio.sleep((n % 10) / 1000)
        attempt.cancel()
        answered[trace_id] = False
        with contextlib.suppress(asyncio.CancelledError):
            await attempt
            answered[trace_id] = True
    return answered


def traced(trace_id: str) -> tuple[tuple[str, str]]:
    return (("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01"),)


def server_log(system: System, last: str) -> tuple[dict[str, str], dict[str, str]] | None:
    """By trace id, how CallMatching ended each call (its access log) and the session of
    each handoff it started; None until the call traced `last`, made after the others on
    the same replica, is in the log (a call given up before it was sent has no line)."""
    statuses, sessions = {}, {}
    for process in system.processes:
        for line in process.lines:
            record = json.loads(line) if line.startswith("{") else {}
            trace_id = record.get("trace_id")
            if record.get("message") == "call":
                statuses[trace_id] = record["status"]
            elif record.get("message") == "handoff started":
                sessions[trace_id] = record["session_id"]
    return (statuses, sessions) if last in statuses else None


async def reserved(system: System, subject: str) -> int:
    pools = (await system.nd.ListPools(nd_pb2.ListPoolsRequest(page_size=500))).pools
    [pool] = [p for p in pools if subject in p.subjects]
    stats = await system.nd.GetPoolStats(nd_pb2.GetPoolStatsRequest(pool_id=pool.pool_id))
    return int(stats.stats.reserved)


async def test_a_handoff_its_app_gives_up_on_holds_no_number(system: System) -> None:
    """Once the app cancels the handoffs CallMatching answered (those it got, and those
    whose answer was on its way when it gave up, which the server cannot tell from an
    answer received), no number is held."""
    subject, _ = await make_pool(system, 40)
    app_id = await register(system, S.MATCH_SCHEMA_NUMBER)
    answered = await given_up(system, app_id, subject, 40, keyed=False)
    assert not all(answered.values())
    last = secrets.token_hex(16)
    with contextlib.suppress(grpc.aio.AioRpcError):  # NOT_FOUND: it is its trace that counts
        await system.cm.GetSession(
            cm_pb2.GetSessionRequest(session_id="s-none"), metadata=traced(last)
        )
    statuses, sessions = await eventually(
        lambda: server_log(system, last), what="the calls in the access log"
    )
    # Some were given up on while CallMatching was starting them (else this tests nothing).
    assert any(statuses.get(t) == "CANCELLED" for t in answered)
    for trace_id in answered:
        if statuses.get(trace_id) == "OK":
            await system.cm.CancelHandoff(
                cm_pb2.CancelHandoffRequest(session_id=sessions[trace_id])
            )

    async def none_held() -> bool:
        return await reserved(system, subject) == 0

    await eventually(none_held, what="every number given back", timeout=20)


async def test_a_handoff_given_up_on_is_kept_for_its_idempotency_key(system: System) -> None:
    """With an idempotency key the app can ask again: the handoff is kept, waiting, and
    the same request gets it (no second number)."""
    subject, _ = await make_pool(system, 10)
    app_id = await register(system, S.MATCH_SCHEMA_NUMBER)
    await given_up(system, app_id, subject, 10, keyed=True)
    for n in range(10):
        again = await system.cm.StartHandoff(
            cm_pb2.StartHandoffRequest(
                application_id=app_id,
                customer_id=f"c-{n}",
                context=context(subject),
                idempotency_key=f"k-{n}",
            )
        )
        state = await system.cm.GetSession(cm_pb2.GetSessionRequest(session_id=again.session_id))
        assert state.state == cm_pb2.SESSION_STATE_WAITING_FOR_CALL, n
    assert await reserved(system, subject) == 10
