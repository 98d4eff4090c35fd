"""Starting and stopping service processes on this machine: for `accessline up`, the
benchmarks and the tests alike."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def spawn(
    module: str,
    env: Mapping[str, str],
    *,
    stdout: IO[Any] | int | None = None,
    text: bool = False,
) -> subprocess.Popen[Any]:
    """Starts `python -m module` with the current environment plus `env`."""
    return subprocess.Popen(
        [sys.executable, "-m", module],
        env={**os.environ, **env},
        stdout=stdout,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=text,
    )


def channel(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    """A channel to a service: TLS with the given credentials, plain text without."""
    if credentials is None:
        return grpc.aio.insecure_channel(address)
    return grpc.aio.secure_channel(address, credentials)


async def wait_serving(
    address: str,
    process: subprocess.Popen[Any],
    name: str,
    timeout: float = 30.0,
    credentials: grpc.ChannelCredentials | None = None,
) -> None:
    """Polls the health service until the process reports SERVING, it exits (RuntimeError)
    or the deadline passes (TimeoutError)."""
    deadline = time.monotonic() + timeout
    async with channel(address, credentials) as channel_:
        stub: Any = health_pb2_grpc.HealthStub(channel_)
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with status {process.returncode}")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not serving at {address} after {timeout}s")
            await asyncio.sleep(0.1)


def stop(processes: Sequence[subprocess.Popen[Any]], timeout: float) -> None:
    """SIGTERM to all, then SIGKILL to whatever has not exited by the deadline."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
