"""The `accessline numbers` CLI against a real NumberDistribution process: a pool is
created and a CSV of 100,000 numbers imported, then the stats printed."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.conftest import ROOT, ServiceProcess, identity, wait_serving


def accessline(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'gen'}"}
    return subprocess.run(
        [sys.executable, "-m", "accessline_server.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def printed_stats(output: str) -> dict[str, str]:
    return dict(
        line.split()
        for line in output.splitlines()
        if line.startswith("  ") and len(line.split()) == 2
    )


async def test_the_cli_imports_100000_numbers_into_a_pool(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    service = service_factory("accessline_server.numberdistribution")
    await wait_serving(service)
    # The test session's identity, as `make up`'s: its admin token is minted for the tool.
    address = ["--address", service.address, "--identity", str(identity().files.folder)]

    created = accessline(
        "numbers", *address, "create-pool", "--pool", "paris-main", "--city", "Paris"
    )
    assert created.returncode == 0, created.stderr
    assert "created pool paris-main (Paris 48.85" in created.stdout

    csv_file = tmp_path / "numbers.csv"
    rows = ["number,label"] + [f"+33 1 4{i:07d},line {i}" for i in range(100_000)]
    rows.insert(500, "")  # blank lines are skipped
    csv_file.write_text("\n".join(rows) + "\n")
    imported = accessline("numbers", *address, "import", "--pool", "paris-main", str(csv_file))
    assert imported.returncode == 0, imported.stderr
    assert "100000 added, 0 already present, 0 in another pool" in imported.stdout
    print(imported.stdout.splitlines()[0])
    stats = printed_stats(imported.stdout)
    assert (stats["total"], stats["free"], stats["reserved"]) == ("100000", "100000", "0")

    again = accessline("numbers", *address, "import", "--pool", "paris-main", str(csv_file))
    assert "0 added, 100000 already present" in again.stdout


async def test_the_cli_reports_bad_numbers_by_row(
    service_factory: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    service = service_factory("accessline_server.numberdistribution")
    await wait_serving(service)
    # The test session's identity, as `make up`'s: its admin token is minted for the tool.
    address = ["--address", service.address, "--identity", str(identity().files.folder)]
    assert accessline("numbers", *address, "create-pool", "--pool", "p1").returncode == 0
    csv_file = tmp_path / "numbers.csv"
    csv_file.write_text("+33140000001\nnot-a-number\n+33140000002\n")
    imported = accessline("numbers", *address, "import", "--pool", "p1", str(csv_file))
    assert imported.returncode == 1
    assert "INVALID_ARGUMENT" in imported.stderr
    assert "numbers[1]: not a phone number" in imported.stderr
    assert "Traceback" not in imported.stderr
    # Without credentials the tool says what it needs, and nothing reaches the service.
    bare = accessline(
        "numbers",
        "--address",
        service.address,
        "--identity",
        "/nonexistent",
        "stats",
        "--pool",
        "p1",
    )
    assert bare.returncode == 1
    assert "--ca-file, --cert-file, --key-file and --token" in bare.stderr
    stats = accessline("numbers", *address, "stats", "--pool", "p1")
    assert printed_stats(stats.stdout)["total"] == "0"
