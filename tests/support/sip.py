"""The SIP edge for tests: Kamailio with the repository's configuration and the SIP
adapter, on free loopback ports, in front of a test stack's Routing; SIPp as the
customer's and the agents' phones."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

from accessline_server.runtime import processes
from accessline_server.runtime.embedded_etcd import free_port
from accessline_server.sipedge import scenarios
from accessline_server.sipedge.edge import free_udp_port, kamailio_command
from tests.conftest import ROOT, ServiceProcess, eventually, identity


@dataclass
class Lines:
    """A process's output, collected as it comes."""

    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))


@dataclass
class SipEdge:
    sip_port: int
    kamailio: Lines
    adapter: ServiceProcess
    metrics_port: int = 0
    health_port: int = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.sip_port}"

    def stop(self) -> None:
        for process in (self.adapter.process, self.kamailio.process):
            process.terminate()
        for process in (self.adapter.process, self.kamailio.process):
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# How long an agent's phone may ring in the tests' Kamailio (AGENT_ANSWER_MS).
AGENT_ANSWER_MS = 3000


async def start_kamailio(tmp: Path) -> tuple[Lines, int, int]:
    """Kamailio on a free UDP port with its event socket on a free TCP port: the
    process, its SIP port and its event socket's port."""
    sip_port, evapi_port = free_udp_port(), free_port()
    run_dir = tmp / "kamailio"
    run_dir.mkdir(exist_ok=True)
    kamailio = Lines(
        subprocess.Popen(
            [
                *kamailio_command(f"udp:127.0.0.1:{sip_port}", f"127.0.0.1:{evapi_port}", run_dir),
                "-A",
                f"AGENT_ANSWER_MS={AGENT_ANSWER_MS}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
    )
    await eventually(lambda: _accepts(evapi_port), timeout=20, what="Kamailio's event socket")
    return kamailio, sip_port, evapi_port


async def start_sip_edge(routing_address: str, tmp: Path, **env: str) -> SipEdge:
    """Kamailio and the adapter connected to it, routing through `routing_address` as
    a switch."""
    kamailio, sip_port, evapi_port = await start_kamailio(tmp)
    metrics_port, health_port = free_port(), free_port()
    files = identity().files
    token = identity().token("sip-edge", "switch", switch="*")
    process = processes.spawn(
        "accessline_server.sipedge",
        {
            "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'gen'}",
            "ACCESSLINE_ROUTING_ADDRESS": routing_address,
            "ACCESSLINE_SIPEDGE_EVAPI_ADDRESS": f"127.0.0.1:{evapi_port}",
            "ACCESSLINE_SIPEDGE_TOKEN": token,
            "ACCESSLINE_TLS_CA_FILE": str(files.ca),
            "ACCESSLINE_TLS_CERT_FILE": str(files.client_cert("admin")),
            "ACCESSLINE_TLS_KEY_FILE": str(files.client_key("admin")),
            "ACCESSLINE_SIPEDGE_METRICS_PORT": str(metrics_port),
            "ACCESSLINE_SIPEDGE_HEALTH_PORT": str(health_port),
            "OTEL_EXPORTER_OTLP_ENDPOINT": "",
            **env,
        },
        stdout=subprocess.PIPE,
        text=True,
    )
    adapter = ServiceProcess("accessline_server.sipedge", process, 0)
    threading.Thread(target=adapter._pump, daemon=True).start()
    await adapter.wait_for_log("connected to Kamailio's event socket", timeout=20)
    return SipEdge(sip_port, kamailio, adapter, metrics_port, health_port)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Phone:
    """One SIPp run: a phone placing or taking one call; its messages in a trace file."""

    process: asyncio.subprocess.Process
    messages: Path
    output: Path

    async def finished(self, timeout: float = 60.0) -> int:
        """SIPp's exit code: 0 when the call went as the scenario says."""
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
            raise AssertionError(f"SIPp did not finish: {self.trace()[-3000:]}") from None

    def trace(self) -> str:
        text = self.messages.read_text() if self.messages.exists() else ""
        return text + (self.output.read_text() if self.output.exists() else "")

    def received(self, start: str) -> list[str]:
        """The messages SIPp received that start with `start` (`INVITE`, `SIP/2.0 480`)."""
        text = self.messages.read_text() if self.messages.exists() else ""
        out = []
        for block in text.split("----------------------------------------------- ")[1:]:
            lines = block.split("\n")
            if len(lines) < 4 or "message received" not in lines[1]:
                continue
            message = "\n".join(lines[3:]).strip()
            if message.startswith(start):
                out.append(message)
        return out


async def sipp(tmp: Path, name: str, scenario: str, *args: str) -> Phone:
    path = tmp / f"{name}.xml"
    path.write_text(scenario)
    messages, output = tmp / f"{name}.messages", tmp / f"{name}.out"
    process = await asyncio.create_subprocess_exec(
        "sipp",
        "-sf",
        str(path),
        "-i",
        "127.0.0.1",
        "-m",
        "1",
        "-nostdin",
        "-trace_msg",
        "-message_file",
        str(messages),
        "-trace_err",
        "-error_file",
        str(tmp / f"{name}.errors"),
        *args,
        stdout=output.open("w"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    return Phone(process, messages, output)


async def agent_phone(tmp: Path, name: str, answer: int = 200) -> tuple[Phone, int]:
    """An agent's phone listening on a free port: the phone and the port."""
    port = free_udp_port()
    phone = await sipp(tmp, name, scenarios.agent(answer), "-p", str(port))
    return phone, port


async def customer_phone(
    tmp: Path, edge: SipEdge, number: str, code: str, name: str = "caller", **kwargs: object
) -> Phone:
    scenario = scenarios.caller(code, **kwargs)  # type: ignore[arg-type]
    return await sipp(tmp, name, scenario, "-s", number, "-p", str(free_udp_port()), edge.target)
