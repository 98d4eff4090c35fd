"""The SIP edge with real SIP traffic on loopback: Kamailio with the repository's
configuration, the SIP adapter, the five services, and SIPp as the customer's phone
(INVITE to the reserved number, the access code by SIP INFO, BYE or CANCEL) and as the
agents' phones."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.common.v1 import common_pb2 as C
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.routing.v1 import routing_pb2 as rt_pb2
from services.runtime.embedded_etcd import EmbeddedEtcd
from services.sipedge import scenarios
from services.sipedge.adapter import Adapter, caller_number
from services.sipedge.settings import SipEdgeSettings
from tests.conftest import eventually
from tests.support.presence import App
from tests.support.sip import (
    SipEdge,
    agent_phone,
    customer_phone,
    free_udp_port,
    sipp,
    start_sip_edge,
)
from tests.support.stack import (
    ACCEPT,
    Stack,
    answer,
    set_available,
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


async def code_pool(stack: Stack, group: str) -> tuple[str, str]:
    """A pool of one number whose reservations carry a 4-digit code, and an application
    matching by number and code: the subject and the application id."""
    pool_id = f"p-{uuid.uuid4().hex[:6]}"
    subject = f"claims-{pool_id}"
    await stack.nd.CreatePool(
        nd_pb2.CreatePoolRequest(
            pool=nd_pb2.Pool(
                pool_id=pool_id,
                subjects=[subject],
                resource_group=group,
                access_code_policy=nd_pb2.AccessCodePolicy(
                    mode=nd_pb2.ACCESS_CODE_MODE_REQUIRED, length=4
                ),
            )
        )
    )
    await stack.nd.AddNumbers(
        nd_pb2.AddNumbersRequest(pool_id=pool_id, numbers=[f"+3313{uuid.uuid4().int % 10**7:07d}"])
    )
    app_id = f"app-{uuid.uuid4().hex[:6]}"
    await stack.cm.RegisterApplication(
        cm_pb2.RegisterApplicationRequest(
            application=cm_pb2.Application(
                application_id=app_id,
                match_schema=C.MATCH_SCHEMA_NUMBER_CODE,
                skip_ivr_on_match=True,
            )
        )
    )
    return subject, app_id


async def sip_agent(
    stack: Stack, group: str, address: str, *, available: bool = True
) -> tuple[str, App]:
    """An agent whose desk phone is the SIP address given, logged in (and available)."""
    agent_id = f"agent-{uuid.uuid4().hex[:6]}"
    await stack.pr.RegisterAgent(
        pr_pb2.RegisterAgentRequest(
            agent=pr_pb2.Agent(
                agent_id=agent_id,
                resource_groups=[group],
                channels=[
                    pr_pb2.ChannelConfig(
                        channel=C.CHANNEL_DESK_VOICE, address=address, available_on_login=available
                    )
                ],
            )
        )
    )
    app = App(stack.processes[1].address)
    await app.login(agent_id)
    return agent_id, app


async def drain(app: App) -> list[Any]:
    """What the agent's app has been sent and not read yet, after a short quiet spell."""
    out = []
    while True:
        try:
            out.append(await app.next(timeout=1.0))
        except TimeoutError:
            return out


async def handoff(stack: Stack, app_id: str, subject: str) -> Any:
    return await stack.cm.StartHandoff(
        cm_pb2.StartHandoffRequest(
            application_id=app_id,
            customer_id=f"customer-{uuid.uuid4().hex[:6]}",
            context=C.ContextData(subject=subject),
            device_can_dial=True,
            device_can_send_dtmf=True,
        )
    )


async def test_a_matched_call_reaches_the_accepting_agents_phone_with_its_session(
    edge: Edge, tmp_path: Path
) -> None:
    group = f"g-{uuid.uuid4().hex[:6]}"
    subject, app_id = await code_pool(edge.stack, group)
    phone, port = await agent_phone(tmp_path, "agent")
    _, app = await sip_agent(edge.stack, group, f"sip:desk@127.0.0.1:{port}")
    started = await handoff(edge.stack, app_id, subject)

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
    group = f"g-{uuid.uuid4().hex[:6]}"
    subject, app_id = await code_pool(edge.stack, group)
    ivr = await sipp(tmp_path, "ivr", scenarios.agent(200), "-p", str(edge.ivr_port))
    started = await handoff(edge.stack, app_id, subject)
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
    group = f"g-{uuid.uuid4().hex[:6]}"
    subject, app_id = await code_pool(edge.stack, group)
    # The group's only agent is logged in but not available: the call waits.
    _agent_id, app = await sip_agent(edge.stack, group, "sip:desk@127.0.0.1:9", available=False)
    started = await handoff(edge.stack, app_id, subject)

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
    group = f"g-{uuid.uuid4().hex[:6]}"
    subject, app_id = await code_pool(edge.stack, group)
    started = await handoff(edge.stack, app_id, subject)
    caller = await customer_phone(
        tmp_path, edge.sip, started.access_number, started.access_code, expect=480
    )
    assert await caller.finished() == 0, caller.trace()


async def test_two_callers_on_one_exclusive_number_at_once_make_one_match(
    edge: Edge, tmp_path: Path
) -> None:
    group = f"g-{uuid.uuid4().hex[:6]}"
    subject, app_id = await code_pool(edge.stack, group)
    phone, port = await agent_phone(tmp_path, "agent")
    ivr = await sipp(tmp_path, "ivr", scenarios.agent(200), "-p", str(edge.ivr_port))
    _, app = await sip_agent(edge.stack, group, f"sip:desk@127.0.0.1:{port}")
    started = await handoff(edge.stack, app_id, subject)

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


async def test_a_caller_who_keys_nothing_in_is_routed_unmatched_after_the_time_out(
    edge: Edge, tmp_path: Path
) -> None:
    group = f"g-{uuid.uuid4().hex[:6]}"
    subject, app_id = await code_pool(edge.stack, group)
    ivr = await sipp(tmp_path, "ivr", scenarios.agent(200), "-p", str(edge.ivr_port))
    started = await handoff(edge.stack, app_id, subject)
    caller = await customer_phone(tmp_path, edge.sip, started.access_number, "")
    assert await caller.finished() == 0, caller.trace()
    assert await ivr.finished() == 0, ivr.trace()
    assert len(ivr.received("INVITE")) == 1


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
