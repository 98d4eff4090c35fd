"""Builds `accessline-api`, the slim client distribution: only the generated message
classes, gRPC stubs and type stubs of `gen/accessline` (no server code), depending on
`grpcio` and `protobuf` by lower bounds. The wheel lands in `dist/` (or `--out`).

    python tools/build_client.py [--out DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GEN = ROOT / "gen" / "accessline"
VERSION = "0.1.0"

# The generated code checks these at import: grpcio at least the version of the
# generator, protobuf of the generator's major version and at least its minor.
REQUIRES = ["grpcio>=1.85.1", "protobuf>=7.35.1,<8"]

PYPROJECT = f"""\
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "accessline-api"
version = "{VERSION}"
description = "Typed Python stubs of Accessline's gRPC contracts (messages and clients only)."
readme = "README.md"
requires-python = ">=3.9"
license = "Apache-2.0"
dependencies = {REQUIRES!r}

[project.optional-dependencies]
# Reading an error's rich details (BadRequest, RetryInfo, ErrorInfo).
status = ["grpcio-status>=1.85.1"]

[tool.setuptools.packages.find]
include = ["accessline*"]

[tool.setuptools.package-data]
accessline = ["py.typed", "**/*.pyi"]
"""

README = """\
# accessline-api

The messages and gRPC client stubs of Accessline's contracts (`accessline.*.v1`), with
type stubs, and nothing of the server. See Accessline's README for the contracts, their
authentication (a bearer token, and mutual TLS for services) and their errors.
"""


def build(out: Path) -> Path:
    """The wheel, built from a copy of gen/accessline with the client's own metadata."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        shutil.copytree(GEN, project / "accessline", ignore=shutil.ignore_patterns("__pycache__"))
        (project / "pyproject.toml").write_text(PYPROJECT)
        (project / "README.md").write_text(README)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--quiet",
                "--no-deps",
                "--no-build-isolation",
                "--wheel-dir",
                str(out),
                str(project),
            ],
            check=True,
        )
    wheels = sorted(out.glob(f"accessline_api-{VERSION}-*.whl"))
    if not wheels:
        sys.exit("build_client: no wheel was built")
    return wheels[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist")
    print(build(parser.parse_args().out))


if __name__ == "__main__":
    main()
