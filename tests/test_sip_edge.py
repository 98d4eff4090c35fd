"""The SIP edge with real SIP traffic on loopback: Kamailio with the repository's
configuration, the SIP adapter, the five services, and SIPp as the customer's phone
(INVITE to the reserved number, the access code by SIP INFO, BYE or CANCEL) and as the
agents' phones."""

from __future__ import annotations

import signal
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.common.v1 import common_pb2 as C
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.routing.v1 import routing_pb2 as rt_pb2
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd
from accessline_server.sipedge import scenarios
from accessline_server.sipedge.adapter import Adapter, HeldCall, caller_number
from accessline_server.sipedge.settings import SipEdgeSettings
from tests.conftest import eventually
from tests.support.presence import App
from tests.support.sip import (
    SipEdge,
    agent_phone,
    customer_phone,
    free_udp_port,
    sipp,
    start_kamailio,
    start_sip_edge,
)
from tests.support.stack import (
    ACCEPT,
    Stack,
    agent,
    answer,
    pool_subject,
    set_available,
    setup_numbers,
    start_stack,
    stop_stack,
)


@dataclass
class Edge:
    """The module's stack and SIP edge; calls Routing sends through the IVR go to the
    SIP phone that listens on `ivr_port`."""

    stack: Stack
    sip: SipEdge
    ivr_port: int


@pytest.fixture(scope="module")
async def edge(etcd: EmbeddedEtcd, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Edge]:
    stack = await start_stack(
        etcd, f"/sip-{uuid.uuid4().hex[:8]}", tmp_path_factory.mktemp("sip-stack")
    )
    ivr_port = free_udp_port()
    logs = tmp_path_factory.mktemp("sip-edge")
    sip = await start_sip_edge(
        stack.processes[4].address,
        logs,
        ACCESSLINE_SIPEDGE_IVR_URI=f"sip:ivr@127.0.0.1:{ivr_port}",
        ACCESSLINE_SIPEDGE_DTMF_TIMEOUT_SECONDS="3",
    )
    yield Edge(stack, sip, ivr_port)
    sip.stop()
    # Kept with the test's files: what the adapter and Kamailio said.
    (logs / "adapter.log").write_text("\n".join(sip.adapter.lines))
    (logs / "kamailio.log").write_text("\n".join(sip.kamailio.lines))
    await stop_stack(stack)


async def waiting_handoff(stack: Stack, *, ani: str = "") -> tuple[str, Any]:
    """A group of its own with one number whose reservations carry a 4-digit code (or,
    given the customer's phone number `ani`, matched by number and caller id), and a
    handoff waiting for its call: the group and the handoff."""
    group = f"g-{uuid.uuid4().hex[:6]}"
    if ani:
        app_id, _ = await setup_numbers(stack, group, schema=C.MATCH_SCHEMA_NUMBER_ANI)
    else:
        app_id, _ = await setup_numbers(stack, group, code_length=4)
    started = await stack.cm.StartHandoff(
        cm_pb2.StartHandoffRequest(
            application_id=app_id,
            customer_id=f"customer-{uuid.uuid4().hex[:6]}",
            context=C.ContextData(subject=await pool_subject(stack, group)),
            device_can_dial=True,
            device_can_send_dtmf=True,
            ani_hint=ani,
        )
    )
    return group, started


async def drain(app: App) -> list[Any]:
    """What the agent's app has been sent and not read yet, after a short quiet spell."""
    out = []
    while True:
        try:
            out.append(await app.next(timeout=1.0))
        except TimeoutError:
            return out


async def test_a_matched_call_reaches_the_accepting_agents_phone_with_its_session(
    edge: Edge, tmp_path: Path
) -> None:
    group, started = await waiting_handoff(edge.stack)
    phone, port = await agent_phone(tmp_path, "agent")
    _, app = await agent(edge.stack, group, address=f"sip:desk@127.0.0.1:{port}")

    caller = await customer_phone(
        tmp_path,
        edge.sip,
        started.access_number,
        started.access_code,
        dtmf_type="application/dtmf",
        headers=["X-Accessline-Session: forged-by-the-caller"],
    )
    await answer(app, ACCEPT)
    assert await caller.finished() == 0, caller.trace()
    assert await phone.finished() == 0, phone.trace()
    (invite,) = phone.received("INVITE")
    sessions = [line for line in invite.splitlines() if line.startswith("X-Accessline-Session")]
    assert sessions == [f"X-Accessline-Session: {started.session_id}"]
    state = await edge.stack.cm.GetSession(cm_pb2.GetSessionRequest(session_id=started.session_id))
    assert state.state == cm_pb2.SESSION_STATE_MATCHED


async def test_a_wrong_code_sends_the_call_to_the_ivr_route(edge: Edge, tmp_path: Path) -> None:
    _, started = await waiting_handoff(edge.stack)
    ivr = await sipp(tmp_path, "ivr", scenarios.agent(200), "-p", str(edge.ivr_port))
    wrong = f"{(int(started.access_code) + 1) % 10000:04d}"

    caller = await customer_phone(tmp_path, edge.sip, started.access_number, wrong)
    assert await caller.finished() == 0, caller.trace()
    assert await ivr.finished() == 0, ivr.trace()
    (invite,) = ivr.received("INVITE")
    assert not any(line.startswith("X-Accessline-Session") for line in invite.splitlines())
    # The customer's session still waits for their call.
    state = await edge.stack.cm.GetSession(cm_pb2.GetSessionRequest(session_id=started.session_id))
    assert state.state == cm_pb2.SESSION_STATE_WAITING_FOR_CALL


async def test_a_caller_who_hangs_up_while_queued_leaves_the_queue(
    edge: Edge, tmp_path: Path
) -> None:
    group, started = await waiting_handoff(edge.stack)
    # The group's only agent is logged in but not available: the call waits.
    _, app = await agent(edge.stack, group, address="sip:desk@127.0.0.1:9", available=False)

    caller = await customer_phone(
        tmp_path,
        edge.sip,
        started.access_number,
        started.access_code,
        hang_up_after_ms=6000,
    )

    async def queued(length: int) -> bool:
        wait = await edge.stack.routers[0].EstimateWait(
            rt_pb2.EstimateWaitRequest(resource_group=group)
        )
        return wait.queue_length == length

    await eventually(lambda: queued(1), timeout=6, what="the call in the queue")
    assert await caller.finished() == 0, caller.trace()
    assert caller.received("SIP/2.0 487")
    await eventually(lambda: queued(0), timeout=15, what="the call out of the queue")
    # Nothing was offered to the agent for the call that hung up.
    await set_available(app, True)
    assert not [m for m in await drain(app) if m.WhichOneof("message") == "offer"]


async def test_a_call_to_a_group_with_no_agent_is_refused_with_480(
    edge: Edge, tmp_path: Path
) -> None:
    before = await answered(edge, "reject", 480)
    _, started = await waiting_handoff(edge.stack)
    caller = await customer_phone(
        tmp_path, edge.sip, started.access_number, started.access_code, expect=480
    )
    assert await caller.finished() == 0, caller.trace()
    # The adapter counts its answers by what it did, and says it is connected.
    assert await answered(edge, "reject", 480) == before + 1
    assert scraped(await scrape(edge), "accessline_sipedge_connected") == [1.0]


async def scrape(edge: Edge) -> str:
    url = f"http://127.0.0.1:{edge.sip.metrics_port}/metrics"
    async with httpx.AsyncClient() as client:
        return (await client.get(url, timeout=5)).text


def scraped(text: str, name: str, **labels: str) -> list[float]:
    """The values of the metric `name` whose labels include `labels`."""
    out = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                out.append(sample.value)
    return out


async def answered(edge: Edge, action: str, status: int) -> float:
    values = scraped(
        await scrape(edge),
        "accessline_sipedge_answers_total",
        accessline_sip_action=action,
        accessline_sip_status=str(status),
    )
    return sum(values)


async def test_two_callers_on_one_exclusive_number_at_once_make_one_match(
    edge: Edge, tmp_path: Path
) -> None:
    group, started = await waiting_handoff(edge.stack)
    phone, port = await agent_phone(tmp_path, "agent")
    ivr = await sipp(tmp_path, "ivr", scenarios.agent(200), "-p", str(edge.ivr_port))
    _, app = await agent(edge.stack, group, address=f"sip:desk@127.0.0.1:{port}")

    callers = [
        await customer_phone(
            tmp_path,
            edge.sip,
            started.access_number,
            started.access_code,
            name=f"caller-{n}",
            caller_id=f"+3361234567{n}",
        )
        for n in range(2)
    ]
    await answer(app, ACCEPT)
    assert [await c.finished() for c in callers] == [0, 0], [c.trace() for c in callers]
    assert await phone.finished() == 0, phone.trace()
    assert await ivr.finished() == 0, ivr.trace()
    (matched,) = phone.received("INVITE")
    assert f"X-Accessline-Session: {started.session_id}" in matched.splitlines()
    assert len(ivr.received("INVITE")) == 1


@pytest.mark.parametrize("refusal", [486, 603, 0])
async def test_an_agent_phone_that_refuses_the_call_sends_it_to_the_next_agent(
    edge: Edge, tmp_path: Path, refusal: int
) -> None:
    """The first agent accepts in their app, but their phone refuses the call (busy,
    declined, or rings unanswered for AGENT_ANSWER_MS): Kamailio holds the call again,
    the adapter sends it back to the queue with the connect's redirect token, the first
    agent's interaction ends, and the next agent gets it."""
    group, started = await waiting_handoff(edge.stack)
    busy, busy_port = await agent_phone(tmp_path, "busy", answer=refusal)
    phone, port = await agent_phone(tmp_path, "agent")
    _, first = await agent(edge.stack, group, address=f"sip:desk@127.0.0.1:{busy_port}")
    _, second = await agent(
        edge.stack, group, address=f"sip:desk@127.0.0.1:{port}", available=False
    )
    caller = await customer_phone(tmp_path, edge.sip, started.access_number, started.access_code)
    taken = await answer(first, ACCEPT)
    assert await busy.finished() == 0, busy.trace()
    ended = await first.next_kind("offer_cancelled")
    assert (ended.offer_id, ended.reason) == (
        taken.offer_id,
        pr_pb2.OFFER_CANCEL_REASON_CALLER_GONE,
    )
    await set_available(second, True)
    await answer(second, ACCEPT)
    assert await caller.finished() == 0, caller.trace()
    assert await phone.finished() == 0, phone.trace()
    (invite,) = phone.received("INVITE")
    assert f"X-Accessline-Session: {started.session_id}" in invite.splitlines()


async def test_a_caller_who_keys_nothing_in_is_routed_unmatched_after_the_time_out(
    edge: Edge, tmp_path: Path
) -> None:
    _, started = await waiting_handoff(edge.stack)
    ivr = await sipp(tmp_path, "ivr", scenarios.agent(200), "-p", str(edge.ivr_port))
    caller = await customer_phone(tmp_path, edge.sip, started.access_number, "")
    assert await caller.finished() == 0, caller.trace()
    assert await ivr.finished() == 0, ivr.trace()
    assert len(ivr.received("INVITE")) == 1


@pytest.mark.parametrize("privacy", ["", "id"])
async def test_a_caller_who_withholds_their_number_is_not_matched_by_it(
    edge: Edge, tmp_path: Path, privacy: str
) -> None:
    """An application that matches by number and caller id: the customer's call with
    their number shown reaches the agent; the same call with `Privacy: id` goes through
    the IVR (Accessline never sees the number)."""
    ani = f"+3361{uuid.uuid4().int % 10**7:07d}"
    group, started = await waiting_handoff(edge.stack, ani=ani)
    phone, port = await agent_phone(tmp_path, "agent")
    ivr = await sipp(tmp_path, "ivr", scenarios.agent(200), "-p", str(edge.ivr_port))
    _, app = await agent(edge.stack, group, address=f"sip:desk@127.0.0.1:{port}")
    caller = await customer_phone(
        tmp_path, edge.sip, started.access_number, "", caller_id=ani, privacy=privacy
    )
    reached = phone if not privacy else ivr
    if not privacy:
        await answer(app, ACCEPT)
    assert await caller.finished() == 0, caller.trace()
    assert await reached.finished() == 0, reached.trace()
    (invite,) = reached.received("INVITE")
    assert ("X-Accessline-Session: " + started.session_id in invite.splitlines()) != bool(privacy)
    # The phone the call did not reach stops listening (the IVR's port is shared).
    unused = ivr if not privacy else phone
    unused.process.kill()
    await unused.process.wait()


@pytest.mark.parametrize(
    ("from_user", "pai_user", "privacy", "ani"),
    [
        ("+33612345678", "", "", "+33612345678"),
        ("+33612345678", "+33698765432", "", "+33698765432"),
        ("+33612345678", "", "id", ""),
        ("+33612345678", "+33698765432", "user; critical", ""),
        ("anonymous", "", "", ""),
        ("Anonymous", "", "none", ""),
        ("alice", "", "", ""),
    ],
)
def test_the_callers_number_is_passed_on_unless_withheld(
    from_user: str, pai_user: str, privacy: str, ani: str
) -> None:
    assert caller_number(from_user, pai_user, privacy) == ani


def test_routings_refusals_become_sip_answers_with_retry_after() -> None:
    adapter = Adapter(SipEdgeSettings(), routing=None, send=None)  # type: ignore[arg-type]

    def refused(reason: int, retry: int = 0) -> Any:
        failed = rt_pb2.Failed(reason=reason)
        failed.retry_after.FromSeconds(retry)
        outcome = adapter._on_event(rt_pb2.RouteInboundCallResponse(failed=failed))
        assert outcome is not None
        return outcome[0]

    assert refused(rt_pb2.FAILURE_REASON_QUEUE_FULL, 30) == {
        "action": "reject",
        "code": 486,
        "reason": "Busy Here",
        "retry_after": "30",
    }
    assert refused(rt_pb2.FAILURE_REASON_NO_AGENTS)["code"] == 480
    assert "retry_after" not in refused(rt_pb2.FAILURE_REASON_NO_AGENTS)
    assert refused(rt_pb2.FAILURE_REASON_UNKNOWN_NUMBER)["code"] == 404
    assert refused(rt_pb2.FAILURE_REASON_UNAVAILABLE, 2)["retry_after"] == "2"
    # A stopping replica's refusal is no answer: the call is resumed with its token.
    stopping = rt_pb2.Failed(reason=rt_pb2.FAILURE_REASON_SERVER_STOPPING, resume_token="t")
    assert adapter._on_event(rt_pb2.RouteInboundCallResponse(failed=stopping)) == (None, "t", 0.0)


async def test_keys_that_overtake_their_invite_are_kept_for_it() -> None:
    """Kamailio's SIP workers relay a call's events side by side: the caller's first key
    (its INFO answered at once) can reach the adapter before the INVITE did. Seen in
    this module's matched-call test: the call routed with 3 of its 4 digits."""
    adapter = Adapter(SipEdgeSettings(), routing=None, send=None)  # type: ignore[arg-type]
    adapter.receive({"event": "dtmf", "call_id": "c1", "digit": "4"})
    adapter.receive({"event": "dtmf", "call_id": "c1", "digit": "7"})
    adapter.receive({"event": "invite", "call_id": "c1", "index": 1, "label": 2})
    call = adapter.calls["c1"]
    assert call.digits == "47"
    assert call.task is not None
    call.task.cancel()


async def test_a_call_while_no_adapter_is_connected_is_refused_at_once(tmp_path: Path) -> None:
    """Kamailio with nobody on its event socket (the adapter not started yet, or
    restarting) answers 503 with Retry-After instead of holding the call for nobody."""
    kamailio, sip_port, _ = await start_kamailio(tmp_path)
    try:
        caller = await sipp(
            tmp_path,
            "caller",
            scenarios.caller("", expect=503),
            "-s",
            "+33130000001",
            "-p",
            str(free_udp_port()),
            f"127.0.0.1:{sip_port}",
        )
        assert await caller.finished(timeout=20) == 0, caller.trace()
        (refusal,) = caller.received("SIP/2.0 503")
        assert "Retry-After: 5" in refusal.splitlines()
    finally:
        kamailio.process.terminate()
        kamailio.process.wait(10)


async def probe(port: int, path: str) -> int:
    async with httpx.AsyncClient(timeout=5) as client:
        return (await client.get(f"http://127.0.0.1:{port}{path}")).status_code


async def test_the_adapter_is_ready_only_while_connected_to_kamailio(tmp_path: Path) -> None:
    """What an orchestrator's probes read: /ready is 200 while the adapter holds
    Kamailio's event socket and 503 once Kamailio is gone (the pod then takes no calls);
    /live stays 200; nothing else is served."""
    sip = await start_sip_edge("127.0.0.1:1", tmp_path)
    try:
        assert await probe(sip.health_port, "/ready") == 200
        assert await probe(sip.health_port, "/live") == 200
        assert await probe(sip.health_port, "/metrics") == 404
        sip.kamailio.process.terminate()
        sip.kamailio.process.wait(10)
        await eventually(
            lambda: _is(probe(sip.health_port, "/ready"), 503), what="/ready to answer 503"
        )
        assert await probe(sip.health_port, "/live") == 200
    finally:
        sip.stop()


async def _is(status: Awaitable[int], expected: int) -> bool:
    return await status == expected


async def test_an_ivr_that_does_not_take_the_call_gets_the_caller_480(
    edge: Edge, tmp_path: Path
) -> None:
    """A forward with nowhere to send the call back to (the IVR route has no queue):
    the caller is refused 480, not held."""
    _, started = await waiting_handoff(edge.stack)
    ivr = await sipp(tmp_path, "ivr", scenarios.agent(486), "-p", str(edge.ivr_port))
    wrong = f"{(int(started.access_code) + 1) % 10000:04d}"
    caller = await customer_phone(tmp_path, edge.sip, started.access_number, wrong, expect=480)
    assert await caller.finished() == 0, caller.trace()
    assert await ivr.finished() == 0, ivr.trace()


async def test_a_phone_failure_for_a_call_the_adapter_does_not_know_is_refused() -> None:
    """An adapter that restarted while a call was forwarded: Kamailio's report that the
    phone did not take it is answered 480 at once (else the call stays held)."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    adapter = Adapter(SipEdgeSettings(), routing=None, send=send)
    adapter.receive({"event": "forward_failed", "call_id": "gone", "index": 3, "label": 4})
    await eventually(lambda: sent, timeout=5, what="the answer to Kamailio")
    assert sent == [
        {"index": 3, "label": 4, "action": "reject", "code": 480, "reason": "Not Answered"}
    ]


def test_the_code_is_complete_at_its_length_or_at_the_hash_key() -> None:
    full = HeldCall("c", 1, 2, "+33130000001", "")
    for digit in "12345":
        full.key(digit, 4)
    assert (full.digits, full.keyed.is_set()) == ("1234", True)
    short = HeldCall("c", 1, 2, "+33130000001", "")
    for digit in "12#3":
        short.key(digit, 4)
    assert (short.digits, short.keyed.is_set()) == ("12", True)


async def test_a_stopping_adapter_refuses_the_calls_it_holds(edge: Edge, tmp_path: Path) -> None:
    """An adapter told to stop (a rolling restart) answers the calls it still holds 503
    with Retry-After instead of leaving them held, and they leave the queue."""
    own = await start_sip_edge(edge.stack.processes[4].address, tmp_path)
    try:
        group, started = await waiting_handoff(edge.stack)
        await agent(edge.stack, group, address="sip:desk@127.0.0.1:9", available=False)
        caller = await customer_phone(
            tmp_path, own, started.access_number, started.access_code, expect=503
        )

        async def queued(length: int) -> bool:
            wait = await edge.stack.routers[0].EstimateWait(
                rt_pb2.EstimateWaitRequest(resource_group=group)
            )
            return wait.queue_length == length

        await eventually(lambda: queued(1), timeout=15, what="the call in the queue")
        own.adapter.signal(signal.SIGTERM)
        assert await caller.finished() == 0, caller.trace()
        (refusal,) = caller.received("SIP/2.0 503")
        assert "Retry-After: 5" in refusal.splitlines()
        assert await own.adapter.wait_exit() == 0
        await eventually(lambda: queued(0), timeout=15, what="the call out of the queue")
    finally:
        own.stop()
