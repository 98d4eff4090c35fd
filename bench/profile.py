"""Where a benchmark's CPU goes inside each service: the CPU of each process's main thread
(its event loop) and of its other threads (gRPC's, the history database driver's), read
from /proc, and a py-spy profile of the main thread split by what the code was doing.

py-spy (a dev dependency) samples each service only while it holds Python's GIL, 50 times
a second; a sample is put in the first of these it matches, by the files on its stack
(above the event loop's own frame):

- history database: SQLAlchemy, the SQLite or PostgreSQL driver, the journey's modules;
- tracing, metrics, logs: OpenTelemetry, logging, the access log;
- etcd client: Accessline's store, its watches, group commit and leases (with the gRPC
  client code under them);
- calls to other services: the gRPC client under Accessline's code;
- Accessline's own work: any other stack with Accessline's code on it (the handlers, the
  matching and routing logic, the interceptor's admission and identity checks);
- event loop and gRPC machinery: stacks with none of the above, where the time is in the
  event loop and gRPC's compiled code (reading and writing HTTP/2 frames, completing
  calls), which Python's profiler cannot see into.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

HISTORY = ("/sqlalchemy/", "/aiosqlite/", "/asyncpg/", "/journey/", "/history.py", "/journal.py")
TELEMETRY = ("/opentelemetry/", "/logging/", "/telemetry.py", "/logs.py", "/access.py")
ETCD_CLIENT = tuple(
    f"/runtime/{name}.py"
    for name in ("store", "etcdlink", "groupcommit", "kv", "watchmux", "leases", "prefixview")
)
GRPC_CLIENT = ("/grpc/aio/_call.py", "/grpc/aio/_channel.py", "/grpc/aio/_interceptor.py")
CATEGORIES = (
    "event loop and gRPC machinery",
    "etcd client",
    "calls to other services",
    "history database",
    "tracing, metrics, logs",
    "Accessline's own work",
)


def classify(paths: list[str]) -> str | None:
    """The category of one main-thread stack (its files, outermost first); None for a
    stack of another thread."""
    loop = [i for i, path in enumerate(paths) if path.endswith("asyncio/runners.py")]
    if not loop:
        return None
    above = paths[loop[-1] + 1 :]
    ours = [p for p in above if "/accessline_server/" in p]
    if any(key in p for p in above for key in HISTORY):
        return "history database"
    if any(key in p for p in above for key in TELEMETRY):
        return "tracing, metrics, logs"
    if any(p.endswith(ETCD_CLIENT) for p in ours):
        return "etcd client"
    if ours and any(p.endswith(GRPC_CLIENT) for p in above):
        return "calls to other services"
    if ours:
        return "Accessline's own work"
    return "event loop and gRPC machinery"


def main_thread_shares(raw: str) -> Counter[str]:
    """Samples by category from py-spy's raw output (a stack and its count a line)."""
    shares: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        paths = [frame.rpartition(" (")[2].split(":", 1)[0] for frame in stack.split(";")]
        category = classify(paths)
        if category is not None:
            shares[category] += int(count)
    return shares


def threads_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds so far of a process's main thread and of all its other threads (those
    that ended too: the process's own count has them)."""
    tick = os.sysconf("SC_CLK_TCK")

    def used(stat: Path) -> float:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    main = used(Path(f"/proc/{pid}/task/{pid}/stat"))
    return main, used(Path(f"/proc/{pid}/stat")) - main


@dataclass
class Profiles:
    """py-spy on each service for the timed run, and each one's threads' CPU."""

    pids: dict[str, int]
    folder: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="accessline-prof-")))
    spies: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    before: dict[str, tuple[float, float]] = field(default_factory=dict)
    after: dict[str, tuple[float, float]] = field(default_factory=dict)

    def start(self) -> None:
        spy = str(Path(sys.executable).parent / "py-spy")
        for name, pid in self.pids.items():
            command = [spy, "record", "--pid", str(pid), "--rate", "50", "--gil"]
            command += [
                "--nonblocking",
                "--full-filenames",
                "--format",
                "raw",
                "--output",
                str(self.folder / name),
            ]
            self.spies[name] = subprocess.Popen(
                command,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        self.before = {name: threads_cpu(pid) for name, pid in self.pids.items()}

    def stop(self) -> None:
        self.after = {name: threads_cpu(pid) for name, pid in self.pids.items()}
        for spy in self.spies.values():
            spy.send_signal(signal.SIGINT)
        for spy in self.spies.values():
            spy.wait(timeout=60)

    def report(self, count: int, what: str) -> str:
        """CPU ms per operation of each service: its main thread split by category (in
        the profile's proportions), and its other threads."""
        head = ["service", "all", *CATEGORIES, "other threads"]
        rows, unseen = [], []
        for name in self.pids:
            main = (self.after[name][0] - self.before[name][0]) * 1000 / count
            others = (self.after[name][1] - self.before[name][1]) * 1000 / count
            path = self.folder / name
            shares = main_thread_shares(path.read_text() if path.exists() else "")
            samples = sum(shares.values())
            if not samples:
                unseen.append(name)  # py-spy could not attach (it needs ptrace)
            split = [main * shares[c] / (samples or 1) for c in CATEGORIES]
            rows.append([name, main + others, *split, others])
        rows.append(["all services", *(sum(r[i] for r in rows) for i in range(1, len(head)))])
        shutil.rmtree(self.folder, ignore_errors=True)
        lines = [f"\nper {what}, CPU ms of each service's threads (main thread by profile)"]
        lines.append(" | ".join(head))
        lines += [" | ".join([str(r[0]), *(f"{v:.2f}" for v in r[1:])]) for r in rows]
        if unseen:
            lines.append(f"no profile of {', '.join(unseen)}: py-spy needs ptrace permission")
        return "\n".join(lines)
