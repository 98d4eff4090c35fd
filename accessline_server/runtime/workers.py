"""Several worker processes of one service on one host (`ACCESSLINE_WORKERS`): the
process started becomes a supervisor that runs the same command once per worker and
does nothing else. Each worker is a replica of the service like any other (its own etcd
connection, leases and streams); they share the gRPC, health and web ports, which the
kernel balances between them by connection (SO_REUSEPORT), and worker N serves its
metrics on the metrics port + N.

The supervisor hands SIGTERM and SIGINT on to every worker and exits once they have all
stopped. A worker that exits on its own takes the others down with it and the supervisor
exits with its status (128 + N for a worker killed by signal N), so that the orchestrator
restarts the whole (a worker is never restarted behind its back)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from types import FrameType

log = logging.getLogger("accessline.workers")

# Set in a worker's environment: its index (0 to workers - 1).
WORKER_ENV = "ACCESSLINE_WORKER_INDEX"


def worker_index() -> int | None:
    """This process's worker index; None when it is not one of several workers."""
    value = os.environ.get(WORKER_ENV)
    return int(value) if value is not None and value.isdigit() else None


def supervise(workers: int) -> int:
    """Runs this process's command as `workers` workers until they stop; the exit
    status (0 once all stopped as asked)."""
    children: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in list(children.values()):
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for index in range(workers):
        child = subprocess.Popen(
            sys.orig_argv, env={**os.environ, WORKER_ENV: str(index)}, stdin=subprocess.DEVNULL
        )
        children[child.pid] = child
    log.info(
        "supervising workers",
        extra={"fields": {"workers": workers, "pids": sorted(children)}},
    )
    status = 0
    while children:
        try:
            pid, raw = os.wait()
        except ChildProcessError:
            break
        if children.pop(pid, None) is None:
            continue
        code = os.waitstatus_to_exitcode(raw)
        if not stopping:
            log.error(
                "a worker exited on its own; stopping the others",
                extra={"fields": {"pid": pid, "exit_code": code}},
            )
            # Killed by signal N: 128 + N, as a shell says it.
            stopping, status = True, (128 - code if code < 0 else code) or 1
            for other in list(children.values()):
                with contextlib.suppress(ProcessLookupError):
                    other.terminate()
    return status
