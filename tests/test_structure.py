"""The shape of the code between services: a service reaches another through its gRPC
contract or through the modules that service publishes (`PUBLISHED` in its package),
never through its private modules (its `keys.py`, its domain); the runtime every
service stands on imports no service."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "accessline_server"
SERVICES = ("callmatching", "numberdistribution", "presence", "routing", "notification")


def published(service: str) -> set[str]:
    package = importlib.import_module(f"accessline_server.{service}")
    return set(package.PUBLISHED)


def imported_modules(source: str) -> list[tuple[int, str]]:
    """Every `accessline_server.x.y` module a source imports, with its line."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from accessline_server.presence import offers` reaches the module
            # accessline_server.presence.offers; `from accessline_server.presence.offers
            # import X` reaches X in it (a module or a name: either way, inside it).
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name.startswith("accessline_server.")]


def trespasses(owner: str, source: str, allowed: dict[str, set[str]]) -> list[str]:
    """The imports of a module of `owner` (a service, or "runtime") that reach another
    service's private modules (or, from the runtime, any service at all)."""
    wrong = []
    for line, name in imported_modules(source):
        parts = name.split(".")
        target = parts[1] if len(parts) > 1 else ""
        if target not in SERVICES or target == owner:
            continue
        # A published module may sit in a subpackage (`journey.records`).
        module = ".".join(parts[2:])
        public = any(module == p or module.startswith(p + ".") for p in allowed[target])
        if owner == "runtime" or not public:
            wrong.append(f"line {line}: {name}")
    return wrong


def test_services_import_only_what_other_services_publish() -> None:
    allowed = {service: published(service) for service in SERVICES}
    found = {}
    for owner in (*SERVICES, "runtime"):
        for path in sorted((ROOT / owner).rglob("*.py")):
            wrong = trespasses(owner, path.read_text(), allowed)
            if wrong:
                found[str(path.relative_to(ROOT.parent))] = wrong
    assert found == {}


@pytest.mark.parametrize(
    ("owner", "source"),
    [
        ("callmatching", "from accessline_server.numberdistribution import keys as nd_keys\n"),
        ("routing", "from accessline_server.presence.session import AgentSession\n"),
        ("routing", "import accessline_server.presence.keys\n"),
        ("runtime", "from accessline_server.presence import roster\n"),
    ],
)
def test_the_contract_check_catches_a_private_import(owner: str, source: str) -> None:
    allowed = {service: published(service) for service in SERVICES}
    assert trespasses(owner, source, allowed) != []


def test_published_modules_exist_and_say_who_uses_them() -> None:
    for service in SERVICES:
        for module in published(service):
            loaded = importlib.import_module(f"accessline_server.{service}.{module}")
            assert "published module" in (loaded.__doc__ or ""), module


MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
CODE = ("accessline_server", "tests", "bench", "tools")


def oversized(path: Path) -> list[str]:
    """What in a source file is over the project's sizes: the module, its functions."""
    text = path.read_text()
    found = []
    if text.count("\n") > MAX_MODULE_LINES:
        found.append(f"{path}: {text.count(chr(10))} lines")
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{path}:{node.lineno} {node.name}: {length} lines")
    return found


def test_no_module_is_over_500_lines_and_no_function_over_80() -> None:
    top = ROOT.parent
    sources = [p for folder in CODE for p in sorted((top / folder).rglob("*.py"))]
    assert len(sources) > 100
    assert [o for p in sources for o in oversized(p)] == []
