"""A PostgreSQL server from Debian's packages for the history tests."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from accessline_server.runtime.embedded_etcd import free_port
from tests.support.waiting import eventually


@dataclass
class Postgres:
    """A PostgreSQL server from Debian's packages, on a free loopback port."""

    port: int
    data_dir: Path
    bin_dir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def as_owner(self, *command: str) -> list[str]:
        # PostgreSQL refuses to run as root, and CI runs as root.
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *command]
        return list(command)

    def start(self) -> None:
        with (self.data_dir.parent / "postgres.log").open("ab") as log:
            self.process = subprocess.Popen(
                self.as_owner(
                    str(self.bin_dir / "postgres"),
                    *("-D", str(self.data_dir), "-p", str(self.port), "-h", "127.0.0.1"),
                    *("-k", str(self.data_dir.parent), "-c", "fsync=off"),
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def wait_ready(self) -> None:
        import asyncpg

        async def accepting() -> bool:
            try:
                conn = await asyncpg.connect(
                    host="127.0.0.1", port=self.port, user="postgres", timeout=1
                )
            except (TimeoutError, OSError, asyncpg.PostgresError):
                return False
            await conn.close()
            return True

        await eventually(accepting, timeout=30, what="postgres accepting connections")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # Through pg_ctl: a signal to `runuser` would not reach the server.
        subprocess.run(
            self.as_owner(
                str(self.bin_dir / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "fast"
            ),
            capture_output=True,
            check=False,
            timeout=30,
        )
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def postgres_bin_dir() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    found = candidates[0] if candidates else shutil.which("initdb")
    if not found:
        pytest.fail(
            "PostgreSQL server binaries not found; `make check` installs Debian's postgresql"
        )
    return Path(found).resolve().parent


@asynccontextmanager
async def running_postgres() -> AsyncIterator[Postgres]:
    """A PostgreSQL server of its own, stopped and removed after. Its folder is made
    directly under the system temp folder: pytest's own is private to root, and
    PostgreSQL runs as its own user."""
    root = Path(tempfile.mkdtemp(prefix="accessline-postgres-"))
    server = Postgres(free_port(), root / "data", postgres_bin_dir())
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    initdb = [str(server.bin_dir / "initdb"), "-D", str(server.data_dir), "-U", "postgres"]
    subprocess.run(  # noqa: ASYNC221 - once, before anything else runs
        server.as_owner(*initdb, "--auth=trust"), check=True, capture_output=True
    )
    server.start()
    try:
        await server.wait_ready()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
