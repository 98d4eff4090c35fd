"""Shared helpers of Accessline's benchmarks: an embedded etcd, timing, and the table."""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accessline.callmatching.v1 import call_matching_pb2 as cm_pb2
from accessline.common.v1 import common_pb2
from accessline.numberdistribution.v1 import number_distribution_pb2 as nd_pb2
from accessline.presence.v1 import presence_pb2 as pr_pb2
from accessline_server.demo import SimulatedAgent, Tally
from accessline_server.runtime import devpki, processes
from accessline_server.runtime.embedded_etcd import EmbeddedEtcd, free_port

# The benchmarks measure the services' own work: plain text and no token checks unless a
# benchmark gives a Secured (bench/security_bench.py measures what security costs).
PLAIN = {"ACCESSLINE_INSECURE": "true", "ACCESSLINE_ENVIRONMENT": "development"}
# Seconds the end-to-end benchmark's simulated agents stay on a call: long enough for
# the call to be connected before they wrap up, short enough that 16 agents never hold
# the benchmark back.
TALK = 0.2


@dataclass
class Secured:
    """A development identity and its JWKS endpoint: mutual TLS everywhere (etcd too) and
    a bearer token on every call."""

    identity: devpki.DevIdentity
    jwks: devpki.JwksServer

    def env(self, service: str) -> dict[str, str]:
        return self.identity.service_env(service, self.jwks.url)

    def service_channel(self, address: str, service: str) -> Any:
        """A channel as an Accessline service (its certificate, no token)."""
        import grpc

        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.identity.ca.read_bytes(),
            private_key=self.identity.key(service).read_bytes(),
            certificate_chain=self.identity.cert(service).read_bytes(),
        )
        return grpc.aio.secure_channel(address, credentials)

    def channel(self, address: str, *roles: str, subject: str = "bench") -> Any:
        token = self.identity.token(
            subject, roles or ("admin", "app_backend", "switch"), applications=["*"], switch="*"
        )
        return self.identity.channel(address, token)


@asynccontextmanager
async def secured() -> AsyncIterator[Secured]:
    with tempfile.TemporaryDirectory(prefix="accessline-bench-identity-") as tmp:
        identity = devpki.create(Path(tmp), clients=("admin",))
        jwks = devpki.JwksServer(identity.jwks)
        try:
            yield Secured(identity, jwks)
        finally:
            jwks.close()


def channel(address: str, security: Secured | None = None, *roles: str) -> Any:
    import grpc

    if security is None:
        return grpc.aio.insecure_channel(address)
    return security.channel(address, *roles)


@asynccontextmanager
async def embedded_etcd(security: Secured | None = None) -> AsyncIterator[EmbeddedEtcd]:
    """A real etcd (with fsync, as in production) in a temporary folder; serving TLS with
    client certificates required when `security` is given."""
    with tempfile.TemporaryDirectory(prefix="accessline-bench-") as tmp:
        etcd = EmbeddedEtcd(
            Path(tmp) / "etcd",
            free_port(),
            free_port(),
            extra_args=security.identity.etcd_server_args() if security else (),
            client_tls=security.identity.etcd_client("numberdistribution") if security else None,
        )
        etcd.start()
        try:
            await etcd.wait_ready()
            yield etcd
        finally:
            etcd.stop()


# The pid of each service process started by `service_process`, by service name.
SERVICE_PIDS: dict[str, int] = {}


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def etcd_requests(etcd: EmbeddedEtcd) -> Counter[str]:
    """gRPC requests and streams etcd has started so far, by method, from etcd's own
    metrics (its client URL's /metrics)."""
    url = f"http://{etcd.host}:{etcd.client_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith("grpc_server_started_total{"):
            method = re.search(r'grpc_method="(\w+)"', line)
            if method is not None:
                counts[method.group(1)] += int(float(line.rsplit(" ", 1)[1]))
    return counts


@dataclass
class Result:
    name: str
    count: int
    seconds: float
    latencies: list[float]

    @property
    def per_second(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return 0.0
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies) * 1000 if self.latencies else 0.0

    @property
    def p99_ms(self) -> float:
        return self.percentile(99) * 1000


async def measure(
    name: str, operation: Callable[[int], Awaitable[object]], count: int, concurrency: int
) -> Result:
    """Runs `operation(i)` for i in range(count) with `concurrency` workers. An operation
    that returns a float reports the latency to record itself (to leave out its own
    clean-up); otherwise its whole duration is recorded."""
    latencies: list[float] = []
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count:
            i = next_index
            next_index += 1
            started = time.perf_counter()
            reported = await operation(i)
            elapsed = time.perf_counter() - started
            latencies.append(reported if isinstance(reported, float) else elapsed)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Result(name, count, time.perf_counter() - started, latencies)


def print_table(title: str, results: list[Result], baseline: Result) -> None:
    print(f"\n{title}")
    print(f"{'operation':<48}{'ops/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'p50 / baseline':>16}")
    for r in results:
        ratio = r.p50_ms / baseline.p50_ms if baseline.p50_ms else float("nan")
        print(f"{r.name:<48}{r.per_second:>10.0f}{r.p50_ms:>10.2f}{r.p99_ms:>10.2f}{ratio:>16.2f}")


@asynccontextmanager
async def service_process(
    module: str, etcd: EmbeddedEtcd, prefix: str, security: Secured | None = None, **settings: str
) -> AsyncIterator[str]:
    """A service as its own process on a free port; yields its address."""
    port = free_port()
    name = module.rsplit(".", 1)[-1]
    env = {
        **(security.env(name) if security else PLAIN),
        "ACCESSLINE_PORT": str(port),
        "ACCESSLINE_METRICS_PORT": "0",
        "ACCESSLINE_ETCD_ENDPOINTS": etcd.endpoint,
        "ACCESSLINE_ETCD_PREFIX": prefix,
        "ACCESSLINE_LOG_LEVEL": "WARNING",
        **settings,
    }
    process = processes.spawn(module, env, stdout=subprocess.DEVNULL)
    SERVICE_PIDS[name] = process.pid
    probe = security.identity.credentials() if security else None
    try:
        await processes.wait_serving(f"127.0.0.1:{port}", process, module, 30.0, probe)
        yield f"127.0.0.1:{port}"
    finally:
        processes.stop([process], timeout=15)


async def simulated_team(
    presence: Any,
    group: str,
    subject: str,
    count: int,
    name: str,
    first_extension: int,
    presence_address: str,
    talk: float = 0.0,
) -> list[SimulatedAgent]:
    """Registers `count` agents of `group` (skill levels 1 to 10 in `subject`, French or
    English) and logs each in as a simulated app that accepts every offer and wraps up
    `talk` seconds later (at once by default)."""
    team = []
    for i in range(count):
        agent_id = f"{name}-{i:03d}"
        await presence.RegisterAgent(
            pr_pb2.RegisterAgentRequest(
                agent=pr_pb2.Agent(
                    agent_id=agent_id,
                    skills=[pr_pb2.Skill(name=subject, level=1 + i % 10)],
                    languages=["fr-FR"] if i % 2 else ["en-GB"],
                    resource_groups=[group],
                    channels=[
                        pr_pb2.ChannelConfig(
                            channel=common_pb2.CHANNEL_DESK_VOICE,
                            address=str(first_extension + i),
                            available_on_login=True,
                        )
                    ],
                )
            )
        )
        member = SimulatedAgent(
            channel(presence_address), agent_id, Tally(), decline=0.0, ignore=0.0, talk=talk
        )
        await member.start()
        team.append(member)
    return team


async def mortgage_pool_and_bank(nd: Any, cm: Any, pool_id: str, numbers: list[str]) -> None:
    """The pool of the mortgage team's numbers, without quarantine (numbers are reused
    at once, to measure throughput), and the bank's application matching by number."""
    pool = nd_pb2.Pool(pool_id=pool_id, subjects=["mortgage"], resource_group="mortgage-team")
    pool.quarantine.FromSeconds(0)
    await nd.CreatePool(nd_pb2.CreatePoolRequest(pool=pool))
    await nd.AddNumbers(nd_pb2.AddNumbersRequest(pool_id=pool_id, numbers=numbers))
    app = cm_pb2.Application(
        application_id="bank",
        match_schema=common_pb2.MATCH_SCHEMA_NUMBER,
        skip_ivr_on_match=True,
    )
    await cm.RegisterApplication(cm_pb2.RegisterApplicationRequest(application=app))


def costs(
    before: tuple[dict[str, float], Counter[str]],
    after: tuple[dict[str, float], Counter[str]],
    count: int,
    what: str,
) -> str:
    """What one operation (`what`) cost in a timed run of `count`, from two `sample`s:
    CPU milliseconds per process and etcd requests by method (streams counted once,
    when opened)."""
    cpu = {k: (after[0][k] - before[0][k]) * 1000 / count for k in after[0]}
    calls = after[1] - before[1]
    lines = [f"\nper {what}, CPU ms: {sum(cpu.values()):.1f} in all"]
    lines += [f"  {name:<20}{ms:6.1f}" for name, ms in sorted(cpu.items(), key=lambda i: -i[1])]
    lines.append(f"per {what}, etcd requests: {sum(calls.values()) / count:.1f} in all")
    lines += [
        f"  {method:<20}{n / count:6.2f}"
        for method, n in sorted(calls.items(), key=lambda i: -i[1])
    ]
    return "\n".join(lines)


def sample(etcd: EmbeddedEtcd) -> tuple[dict[str, float], Counter[str]]:
    """CPU seconds so far of etcd, the services started by `service_process` and this
    process, and etcd's requests so far by method."""
    assert etcd.process is not None
    pids = {**SERVICE_PIDS, "etcd": etcd.process.pid, "benchmark client": os.getpid()}
    return {name: cpu_seconds(pid) for name, pid in pids.items()}, etcd_requests(etcd)
