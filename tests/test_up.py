"""`make up` as an operator runs it (`accessline up`): etcd and the five services come up
with their web ports, and the agent console is served at the URL it prints. It takes the
fixed ports `make up` documents (gRPC 50051-50055, web 8451-8455): not beside a running
`make up`."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import ROOT, free_port


def logs_of(data: Path) -> str:
    """The last lines of each service's log in the data folder (why one exited)."""
    return "".join(
        f"\n--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        for log in sorted(data.glob("*.log"))
    )


async def test_up_serves_the_agent_console_at_the_url_it_prints(tmp_path: Path) -> None:
    data = tmp_path / "up"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "accessline_server.cli",
            "up",
            "--data-dir",
            str(data),
            "--etcd-port",
            str(free_port()),
            "--etcd-peer-port",
            str(free_port()),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'gen'}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        assert process.stdout is not None
        line = ""
        async with asyncio.timeout(90):
            while not line.startswith("Agent console:"):
                line = await asyncio.to_thread(process.stdout.readline)
                assert line or process.poll() is None, "".join(lines) + logs_of(data)
                lines.append(line)
        url = re.search(r"https://\S+/console/", line)
        assert url is not None, line
        ca = data / "identity" / "ca.pem"
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=ca)) as client:
            page = await client.get(url.group(0))
            script = await client.get(url.group(0) + "app.js")
        assert page.status_code == 200, page.text
        assert "<title>Accessline agent console</title>" in page.text
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(30)
