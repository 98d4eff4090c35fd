"""Regenerates Accessline's Python stubs in gen/ from protos/, or checks they are current.

Messages, gRPC stubs and .pyi type stubs come from grpcio-tools' protoc with the
mypy-protobuf plugins; the output is deterministic so CI can compare it byte for byte.
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


def _tree(root: Path) -> set[str]:
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        want, have = _tree(fresh), _tree(GEN)
        stale = sorted(
            (want ^ have)
            | {f for f in want & have if not filecmp.cmp(fresh / f, GEN / f, shallow=False)}
        )
    if stale:
        print("gen/ is stale; run `make gen` and commit the result. Differing files:")
        for f in stale:
            print(f"  gen/{f}")
        return 1
    print("gen/ is up to date with protos/")
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
    print(f"regenerated {GEN.relative_to(ROOT)}/ from {PROTOS.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
