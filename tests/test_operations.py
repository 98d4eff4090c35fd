"""What an operator reads off a running service: every call in the per-RPC histogram by
method and status code and in the access log (without the request's content), a warning
for each development secret in use, gauges that say 0 instead of nothing."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2_grpc as nd_grpc
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline.presence.v1 import presence_pb2_grpc as pr_grpc
from accessline_server.runtime.embedded_etcd import free_port
from tests.conftest import ServiceProcess, connect, eventually, identity, wait_serving
from tests.support.presence import App, C, ending, register
from tests.support.scraping import scrape_samples

LIST_POOLS = "accessline.numberdistribution.v1.NumberDistributionService/ListPools"
ADD_NUMBERS = "accessline.numberdistribution.v1.NumberDistributionService/AddNumbers"


def access_lines(service: ServiceProcess) -> list[dict[str, Any]]:
    found = []
    for line in list(service.lines):
        if '"accessline.access"' in line:
            found.append(json.loads(line))
    return found


async def test_every_call_is_counted_by_method_and_status_and_logged_without_its_content(
    service_factory: Callable[..., ServiceProcess],
) -> None:
    metrics_port = free_port()
    nd = service_factory(
        "accessline_server.numberdistribution", ACCESSLINE_METRICS_PORT=str(metrics_port)
    )
    await wait_serving(nd)
    secret_number = "+33140001234"
    async with connect(nd.address, identity().token("olga", "admin")) as channel:
        numbers: Any = nd_grpc.NumberDistributionServiceStub(channel)
        await numbers.ListPools(nd_pb2.ListPoolsRequest())
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await numbers.AddNumbers(
                nd_pb2.AddNumbersRequest(pool_id="no-such-pool", numbers=[secret_number])
            )
    code = refused.value.code().name

    def counted() -> dict[tuple[str, str], float] | None:
        samples = scrape_samples(metrics_port, "rpc_server_call_duration_seconds_count")
        found = {(s["rpc_method"], s["rpc_response_status_code"]): v for s, v in samples}
        return found if (ADD_NUMBERS, code) in found else None

    found = await eventually(counted, what="the per-RPC histogram")
    assert found[(LIST_POOLS, "OK")] >= 1
    assert found[(ADD_NUMBERS, code)] == 1
    assert all(
        s["rpc_system_name"] == "grpc"
        for s, _ in scrape_samples(metrics_port, "rpc_server_call_duration_seconds_count")
    )

    await nd.wait_for_log(ADD_NUMBERS)
    lines = {line["method"].lstrip("/"): line for line in access_lines(nd)}
    listed, refused_line = lines[LIST_POOLS], lines[ADD_NUMBERS]
    assert listed["status"] == "OK"
    assert listed["caller"] == "olga (admin)"
    assert refused_line["status"] == code
    assert refused_line["duration_ms"] >= 0
    assert len(refused_line["trace_id"]) == 32
    assert secret_number not in "\n".join(nd.lines)


async def test_the_access_log_can_be_turned_off(
    service_factory: Callable[..., ServiceProcess],
) -> None:
    nd = service_factory("accessline_server.numberdistribution", ACCESSLINE_ACCESS_LOG="false")
    await wait_serving(nd)
    async with connect(nd.address, identity().token("olga", "admin")) as channel:
        await nd_grpc.NumberDistributionServiceStub(channel).ListPools(nd_pb2.ListPoolsRequest())
    nd.signal(15)
    assert await nd.wait_exit() == 0
    lines = await nd.whole_log()
    assert any("serving" in line for line in lines)
    assert access_lines(nd) == []


async def test_each_development_secret_in_use_is_warned_about_at_start(
    service_factory: Callable[..., ServiceProcess],
) -> None:
    rt = service_factory("accessline_server.routing")  # its own and Presence's development secrets
    line = await rt.wait_for_log("ACCESSLINE_ROUTING_SECRET")
    assert json.loads(line)["level"] == "WARNING"
    await rt.wait_for_log("ACCESSLINE_PRESENCE_SECRET")
    await rt.wait_for_log("development CA in use")


async def test_agents_available_per_channel_is_zero_with_no_agent_logged_in(
    service_factory: Callable[..., ServiceProcess],
) -> None:
    metrics_port = free_port()
    pr = service_factory("accessline_server.presence", ACCESSLINE_METRICS_PORT=str(metrics_port))
    await wait_serving(pr)
    samples = scrape_samples(metrics_port, "accessline_presence_channels")
    available = {
        s["accessline_channel"]: v
        for s, v in samples
        if s["accessline_presence"] == "CHANNEL_PRESENCE_AVAILABLE"
    }
    assert available["CHANNEL_DESK_VOICE"] == 0
    assert available["CHANNEL_MOBILE_VOICE"] == 0
    assert set(available.values()) == {0}


async def test_an_agent_session_that_logs_out_is_closed_and_one_whose_stream_breaks_dropped(
    service_factory: Callable[..., ServiceProcess],
) -> None:
    metrics_port = free_port()
    pr = service_factory("accessline_server.presence", ACCESSLINE_METRICS_PORT=str(metrics_port))
    await wait_serving(pr)
    async with connect(pr.address) as channel:
        stub: Any = pr_grpc.PresenceServiceStub(channel)
        leaving, breaking = await register(stub), await register(stub)
    leaver, breaker = App(pr.address), App(pr.address)
    await leaver.login(leaving)
    await breaker.login(breaking)
    await leaver.call.done_writing()  # the app ends its stream: a logout
    await ending(leaver)
    breaker.call.cancel()  # the connection breaks

    def ended() -> dict[str, float] | None:
        samples = scrape_samples(metrics_port, "accessline_presence_sessions_ended_total")
        found = {s["accessline_session_end"]: v for s, v in samples}
        return found if sum(found.values()) >= 2 else None

    assert await eventually(ended, what="both sessions ended") == {"closed": 1, "dropped": 1}


async def test_not_ready_reasons_are_counted_by_reason(
    service_factory: Callable[..., ServiceProcess],
) -> None:
    metrics_port = free_port()
    pr = service_factory("accessline_server.presence", ACCESSLINE_METRICS_PORT=str(metrics_port))
    await wait_serving(pr)
    async with connect(pr.address) as channel:
        agent_id = await register(pr_grpc.PresenceServiceStub(channel))
    app = App(pr.address)
    await app.login(agent_id)
    for enabled in (True, False, True):
        await app.send(
            set_do_not_disturb=pr_pb2.SetDoNotDisturb(
                enabled=enabled, reason_code="lunch" if enabled else ""
            )
        )
        await app.next_kind("presence_confirmed")
    await app.send(
        set_channel_presence=pr_pb2.SetChannelPresence(
            channel=C.CHANNEL_CHAT, available=False, reason_code="training"
        )
    )
    await app.next_kind("presence_confirmed")

    def counted() -> dict[str, float] | None:
        samples = scrape_samples(metrics_port, "accessline_presence_not_ready_total")
        found = {s["accessline_not_ready_reason"]: v for s, v in samples}
        return found if sum(found.values()) >= 3 else None

    assert await eventually(counted, what="reasons counted") == {"lunch": 2, "training": 1}
    app.call.cancel()
