"""Calls through the SIP edge: SIPp places calls at a fixed rate to an access number;
Kamailio holds each INVITE, the SIP adapter routes it through Accessline (etcd and the
services as processes; simulated agents accept every offer) and Kamailio forwards it to
the agents' phone (a SIPp that answers every call). Prints calls per second and p50/p99
of INVITE to 200 OK, next to the same calls through Kamailio alone (each INVITE
forwarded straight to the phone) measured in the same run.

    python -m bench.sip_bench [--calls 200] [--rate 20] [--agents 16]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx

from accessline.callmatching.v1 import call_matching_pb2_grpc as cm_grpc
from accessline.numberdistribution.v1 import number_distribution_pb2_grpc as nd_grpc
from accessline.presence.v1 import presence_pb2_grpc as pr_grpc
from accessline_server.runtime import processes
from accessline_server.runtime.embedded_etcd import free_port
from accessline_server.sipedge import scenarios
from accessline_server.sipedge.edge import free_udp_port, kamailio_command
from bench.common import (
    PLAIN,
    Result,
    embedded_etcd,
    mortgage_pool_and_bank,
    print_table,
    service_process,
    simulated_team,
)

NUMBER = "+33140000001"


@contextlib.contextmanager
def kamailio(folder: Path, sip_port: int, evapi_port: int, *defines: str) -> Any:
    command = kamailio_command(f"udp:127.0.0.1:{sip_port}", f"127.0.0.1:{evapi_port}", folder)
    for define in defines:
        command += ["-A", define]
    # Kamailio's log level for the run: warnings only.
    command += ["--debug=1"]
    with (folder / "kamailio.log").open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.terminate()
        process.wait(10)


async def wait_port(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError("Kamailio's event socket did not open")


async def adapter_connected(metrics_port: int) -> None:
    """Waits until the adapter reports itself on Kamailio's event socket (its gauge)."""
    deadline = time.monotonic() + 20
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                text = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
                name = "accessline_sipedge_connected"
                gauge = [line for line in text.splitlines() if line.startswith(name)]
                if gauge and gauge[0].endswith(" 1.0"):
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError("the SIP adapter did not connect to Kamailio")


@contextlib.asynccontextmanager
async def phone(folder: Path) -> AsyncIterator[int]:
    """The agents' phone: a SIPp answering every call; yields its port."""
    port = free_udp_port()
    (folder / "agent.xml").write_text(scenarios.agent(200))
    process = await asyncio.create_subprocess_exec(
        "sipp",
        "-sf",
        str(folder / "agent.xml"),
        "-i",
        "127.0.0.1",
        "-p",
        str(port),
        "-nostdin",
        "-bg",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    await process.wait()  # -bg: SIPp forks into the background
    try:
        yield port
    finally:
        stopped = await asyncio.create_subprocess_exec(
            "pkill", "-f", f"sipp -sf {folder / 'agent.xml'}"
        )
        await stopped.wait()


async def calls(folder: Path, name: str, sip_port: int, count: int, rate: int) -> Result:
    """`count` calls at `rate` per second to the number; INVITE to 200 OK of each."""
    (folder / f"{name}.xml").write_text(scenarios.caller(""))
    messages = folder / f"{name}.messages"
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        "sipp",
        "-sf",
        str(folder / f"{name}.xml"),
        "-s",
        NUMBER,
        "-i",
        "127.0.0.1",
        "-p",
        str(free_udp_port()),
        "-r",
        str(rate),
        "-m",
        str(count),
        "-l",
        str(rate * 30),
        "-nostdin",
        "-trace_shortmsg",
        "-shortmessage_file",
        str(messages),
        f"127.0.0.1:{sip_port}",
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    code = await process.wait()
    elapsed = time.perf_counter() - started
    latencies = answer_times(messages.read_text())
    if code != 0:
        print(f"{name}: SIPp exited with {code} ({count - len(latencies)} calls not answered)")
    return Result(name, len(latencies), elapsed, latencies)


def answer_times(short_messages: str) -> list[float]:
    """Seconds from each call's INVITE sent to its 200 OK received, from SIPp's short
    message log (one line per message: date, time, epoch, S or R, Call-ID, CSeq, first
    line)."""
    sent: dict[str, float] = {}
    out = []
    for line in short_messages.splitlines():
        fields = line.split("\t")
        if len(fields) < 7 or fields[5] != "CSeq:1 INVITE":
            continue
        at, direction, call = float(fields[2]), fields[3], fields[4]
        if direction == "S" and fields[6].startswith("INVITE"):
            sent.setdefault(call, at)
        elif direction == "R" and fields[6].startswith("SIP/2.0 200") and call in sent:
            out.append(at - sent.pop(call))
    return out


async def through_accessline(folder: Path, count: int, rate: int, agents: int) -> Result:
    # Each service needs the ones started before it.
    async with embedded_etcd() as etcd:  # noqa: SIM117
        async with service_process("accessline_server.numberdistribution", etcd, "/sip") as nd:
            async with (
                service_process(
                    "accessline_server.callmatching",
                    etcd,
                    "/sip",
                    ACCESSLINE_NUMBERDISTRIBUTION_ADDRESS=nd,
                    ACCESSLINE_HISTORY_DSN=f"sqlite+aiosqlite:///{folder / 'history.db'}",
                ) as cm,
                service_process("accessline_server.presence", etcd, "/sip") as pr,
                service_process("accessline_server.notification", etcd, "/sip") as nt,
            ):
                async with service_process(
                    "accessline_server.routing",
                    etcd,
                    "/sip",
                    ACCESSLINE_CALLMATCHING_ADDRESS=cm,
                    ACCESSLINE_PRESENCE_ADDRESS=pr,
                    ACCESSLINE_NOTIFICATION_ADDRESS=nt,
                ) as rt:
                    return await edge_calls(folder, (nd, cm, pr, rt), count, rate, agents)


async def edge_calls(
    folder: Path, addresses: tuple[str, str, str, str], count: int, rate: int, agents: int
) -> Result:
    nd, cm, pr, rt = addresses
    async with (
        grpc.aio.insecure_channel(nd) as nd_channel,
        grpc.aio.insecure_channel(cm) as cm_channel,
        grpc.aio.insecure_channel(pr) as pr_channel,
        phone(folder) as phone_port,
    ):
        # Calls to a number of the pool with no handoff waiting: unmatched, routed to the
        # pool's group (the whole switch path but the handoff's session).
        await mortgage_pool_and_bank(
            nd_grpc.NumberDistributionServiceStub(nd_channel),
            cm_grpc.CallMatchingServiceStub(cm_channel),
            "sip",
            [NUMBER],
        )
        team = await simulated_team(
            pr_grpc.PresenceServiceStub(pr_channel),
            "mortgage-team",
            "mortgage",
            agents,
            "sip-agent",
            4000,
            pr,
        )
        sip_port, evapi_port, metrics_port = free_udp_port(), free_port(), free_port()
        with kamailio(folder, sip_port, evapi_port):
            await wait_port(evapi_port)
            adapter = processes.spawn(
                "accessline_server.sipedge",
                {
                    **PLAIN,
                    "ACCESSLINE_ROUTING_ADDRESS": rt,
                    "ACCESSLINE_SIPEDGE_EVAPI_ADDRESS": f"127.0.0.1:{evapi_port}",
                    "ACCESSLINE_SIPEDGE_CODE_DIGITS": "0",
                    "ACCESSLINE_SIPEDGE_METRICS_PORT": str(metrics_port),
                    "ACCESSLINE_SIPEDGE_AGENT_DOMAIN": f"127.0.0.1:{phone_port}",
                    "ACCESSLINE_LOG_LEVEL": "WARNING",
                },
                stdout=subprocess.DEVNULL,
            )
            try:
                await adapter_connected(metrics_port)
                result = await calls(folder, "through Accessline", sip_port, count, rate)
            finally:
                processes.stop([adapter], timeout=10)
        for member in team:
            member.stop()
    result.name = "Kamailio + SIP adapter + Accessline"
    return result


async def kamailio_alone(folder: Path, count: int, rate: int) -> Result:
    async with phone(folder) as phone_port:
        sip_port = free_udp_port()
        evapi_port = free_port()
        with kamailio(folder, sip_port, evapi_port, f'FORWARD_TO="sip:127.0.0.1:{phone_port}"'):
            await wait_port(evapi_port)  # Kamailio is up
            result = await calls(folder, "baseline", sip_port, count, rate)
    result.name = "Kamailio alone (INVITE forwarded)"
    return result


async def main(count: int, rate: int, agents: int) -> None:
    with tempfile.TemporaryDirectory(prefix="accessline-sip-") as tmp:
        baseline = await kamailio_alone(Path(tmp), count, rate)
        edge = await through_accessline(Path(tmp), count, rate, agents)
    print_table(
        f"SIP calls, {count} at {rate} per second, {agents} agents (ops/s = calls answered per"
        " second, latency = INVITE to 200 OK)",
        [baseline, edge],
        baseline,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rate", type=int, default=20)
    parser.add_argument("--agents", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.rate, args.agents))
