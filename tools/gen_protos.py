"""Regenerates Accessline's stubs from protos/, or checks they are current: the Python
stubs in gen/ and the agent console's TypeScript stubs in console/src/gen/.

Messages, gRPC stubs and .pyi type stubs come from grpcio-tools' protoc with the
mypy-protobuf plugins; the TypeScript from buf with protoc-gen-es (console/buf.gen.yaml).
The output is deterministic so CI can compare it byte for byte.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import grpc_tools

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GEN = ROOT / "gen"
CONSOLE_GEN = ROOT / "console" / "src" / "gen"
BUF = ROOT / "node_modules" / ".bin" / "buf"


def _plugin(name: str) -> str:
    scripts = Path(sysconfig.get_path("scripts"))
    path = scripts / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            sys.exit(f"gen_protos: {name} not found; install the dev extras (make setup)")
        return found
    return str(path)


def generate(out: Path) -> None:
    protos = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    wkt_include = Path(grpc_tools.__file__).parent / "_proto"
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{wkt_include}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out}",
        f"--mypy_out=quiet:{out}",
        f"--grpc_python_out={out}",
        f"--mypy_grpc_out=quiet:{out}",
        *protos,
    ]
    subprocess.run(cmd, check=True, cwd=PROTOS)
    # Regular packages (not namespace packages) so `import accessline.<area>.v1` and
    # mypy resolve the same way everywhere.
    for directory in [
        out / "accessline",
        *(p for p in (out / "accessline").rglob("*") if p.is_dir()),
    ]:
        init = directory / "__init__.py"
        if not init.exists():
            init.write_text("")
    (out / "accessline" / "py.typed").write_text("")


def generate_console(out: Path) -> None:
    """The console's TypeScript stubs into `out` (buf runs from the repository root, where
    console/buf.gen.yaml names its input and plugin)."""
    if not BUF.exists():
        sys.exit("gen_protos: node_modules/.bin/buf not found; run `make setup`")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [str(BUF), "generate", "--template", "console/buf.gen.yaml", "-o", tmp],
            check=True,
            cwd=ROOT,
        )
        shutil.copytree(Path(tmp) / "console" / "src" / "gen", out, dirs_exist_ok=True)


def _tree(root: Path) -> set[str]:
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def _stale(fresh: Path, have: Path) -> list[str]:
    want, got = _tree(fresh), _tree(have) if have.exists() else set()
    return sorted(
        (want ^ got)
        | {f for f in want & got if not filecmp.cmp(fresh / f, have / f, shallow=False)}
    )


def check() -> int:
    stale: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "py"
        generate(fresh)
        stale += [f"gen/{f}" for f in _stale(fresh, GEN)]
        console = Path(tmp) / "ts"
        generate_console(console)
        stale += [f"console/src/gen/{f}" for f in _stale(console, CONSOLE_GEN)]
    if stale:
        print("generated stubs are stale; run `make gen` and commit the result. Differing files:")
        for f in stale:
            print(f"  {f}")
        return 1
    print("gen/ and console/src/gen/ are up to date with protos/")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when gen/ is stale")
    args = parser.parse_args()
    if args.check:
        return check()
    if GEN.exists():
        shutil.rmtree(GEN)
    generate(GEN)
    if CONSOLE_GEN.exists():
        shutil.rmtree(CONSOLE_GEN)
    generate_console(CONSOLE_GEN)
    print("regenerated gen/ and console/src/gen/ from protos/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
