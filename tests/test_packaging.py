"""What the container image installs: the project's wheel carries every service, the
generated contracts with their type stubs, and the `accessline` command the Deployments
run. (No Docker engine runs here, so the wheel the Dockerfile builds is checked.)"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from accessline_server.cli import SERVICES
from tests.conftest import ROOT


def test_the_wheel_holds_every_service_the_contracts_and_the_command(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "--wheel-dir",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("accessline-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "accessline = accessline_server.cli:main" in archive.read(entry_points).decode()
    for service in SERVICES:
        assert f"accessline_server/{service}/__main__.py" in names
    assert "accessline_server/runtime/server.py" in names
    # The agent console, built by `make setup` (and by the image's console stage).
    for page in ("index.html", "app.js", "console.css"):
        assert f"accessline_server/presence/console/{page}" in names
    assert "accessline/py.typed" in names
    for area, module in (
        ("callmatching", "call_matching"),
        ("numberdistribution", "number_distribution"),
    ):
        assert f"accessline/{area}/v1/{module}_pb2.py" in names
        assert f"accessline/{area}/v1/{module}_pb2.pyi" in names
    assert not any(n.startswith("tests/") for n in names)
    # No top-level package a host application may have a module of its own by (such as
    # `services`): the server's code is under `accessline_server` only.
    assert {n.split("/")[0] for n in names if not n.startswith("accessline-")} == {
        "accessline",
        "accessline_server",
    }


def test_the_image_builds_the_console_into_the_wheel() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    built = dockerfile.index("RUN node console/build.mjs")
    copied = dockerfile.index("COPY --from=console /src/accessline_server/presence/console")
    assert built < copied < dockerfile.index("RUN pip wheel")


def test_the_image_runs_the_command_as_a_non_root_user() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text().splitlines()
    final_stage = dockerfile[
        max(i for i, line in enumerate(dockerfile) if line.startswith("FROM ")) :
    ]
    assert any(line.startswith("USER 10001") for line in final_stage)
    assert 'ENTRYPOINT ["accessline"]' in final_stage
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "node_modules", "tests"} <= set(ignored)
