"""Imports point one way: a service imports `shared` and itself, `ops` imports the services and `shared`,
`shared` imports only itself; tests and benchmarks import anything. Read from the source with `ast` (static
imports, also inside functions and TYPE_CHECKING blocks, and `importlib.import_module("…")` / `__import__("…")`
with a literal name); a dynamic import whose name is not a literal cannot be checked, so it is refused too.
Pure: nothing is imported or started."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICES = tuple(sorted(p.name for p in (ROOT / "services").iterdir() if (p / p.name / "__init__.py").is_file()))
FIRST_PARTY = frozenset({"shared", "ops", "tests", *SERVICES})
ALLOWED: dict[str, frozenset[str]] = {
    "shared": frozenset({"shared"}),
    "ops": frozenset({"ops", "shared", *SERVICES}),
    **{service: frozenset({service, "shared"}) for service in SERVICES},
}
DYNAMIC_IMPORTS = frozenset({"import_module", "__import__"})


def room_files(room: str) -> list[Path]:
    # A service's room is its whole directory: the package and its alembic migrations.
    base = ROOT / "services" / room if room in SERVICES else ROOT / room
    return sorted(p for p in base.rglob("*.py") if "__pycache__" not in p.parts)


def package_of(path: Path) -> list[str]:
    """The dotted package a module lives in, for resolving relative imports ([] outside a package)."""
    rel = path.relative_to(ROOT).parts[:-1]
    if rel[:1] == ("services",):
        rel = rel[2:]  # services/<svc>/<svc>/… is the package <svc>…; services/<svc>/migrations is none
    parts: list[str] = []
    for i in range(len(rel)):
        if not (path.parents[len(rel) - 1 - i] / "__init__.py").is_file():
            return []
        parts.append(rel[i])
    return parts


def imported_modules(source: str, package: list[str]) -> list[tuple[int, str | None]]:
    """(line, module) for every import in the source; module is None when it cannot be read statically."""
    found: list[tuple[int, str | None]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append((node.lineno, node.module))
            elif node.level - 1 < len(package):
                base = package[: len(package) - (node.level - 1)]
                found.append((node.lineno, ".".join([*base, *([node.module] if node.module else [])])))
            else:
                found.append((node.lineno, None))  # climbs out of its package
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            if name in DYNAMIC_IMPORTS:
                arg = node.args[0] if node.args else None
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not arg.value.startswith("."):
                    found.append((node.lineno, arg.value))
                else:
                    found.append((node.lineno, None))
    return found


def violations(room: str, source: str, *, package: list[str], where: str = "<source>") -> list[str]:
    out = []
    for line, module in imported_modules(source, package):
        if module is None:
            out.append(f"{where}:{line}: a relative or dynamic import the layering check cannot read")
            continue
        top = module.split(".", 1)[0]
        if top in FIRST_PARTY and top not in ALLOWED[room]:
            out.append(f"{where}:{line}: {room} imports {module}")
    return out


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_room_imports_only_what_it_may(room: str) -> None:
    files = room_files(room)
    assert files, f"no modules found for {room}: the check would pass vacuously"
    found = [
        v
        for path in files
        for v in violations(
            room, path.read_text(encoding="utf-8"), package=package_of(path), where=str(path.relative_to(ROOT))
        )
    ]
    assert found == [], f"{room} may import only {sorted(ALLOWED[room])}:\n" + "\n".join(found)


def test_the_services_are_found() -> None:
    assert {"ledger", "rules", "metrics"} <= set(SERVICES)


class TestTheCheckBites:
    @pytest.mark.parametrize(
        ("room", "source"),
        [
            ("shared", "from ledger.config import settings"),
            ("shared", "import ops.cli"),
            ("shared", "def f():\n    from metrics import models"),
            ("shared", "import importlib\nimportlib.import_module('rules.config')"),
            ("shared", "from importlib import import_module\nimport_module('ledger')"),
            ("shared", "__import__('metrics.models', fromlist=['api_keys'])"),
            ("shared", "from tests.conftest import tenant"),
            ("ledger", "from rules.engine import evaluate"),
            ("ledger", "from ops.cli import app"),
            ("rules", "import metrics"),
            ("metrics", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ledger.models import Entry"),
            ("shared", "import importlib\nimportlib.import_module(f'{name}.config')"),
            ("ledger", "__import__(name)"),
        ],
    )
    def test_a_forbidden_or_unreadable_import_is_reported(self, room: str, source: str) -> None:
        assert len(violations(room, source, package=[room])) == 1

    @pytest.mark.parametrize(
        ("room", "source"),
        [
            ("shared", "from shared.db import transaction\nimport json\nfrom . import events"),
            ("ledger", "from ledger.config import settings\nfrom shared.kafka import EventProducer\nimport sqlalchemy"),
            ("ops", "from ledger.cli import app\nfrom rules.config import settings\nfrom metrics import models"),
            ("ops", "import importlib\nimportlib.import_module('shared.settings')"),
        ],
    )
    def test_an_allowed_import_passes(self, room: str, source: str) -> None:
        assert violations(room, source, package=[room]) == []

    def test_relative_imports_resolve_within_the_package(self) -> None:
        source = "from . import domain\nfrom .config import settings\nfrom .. import rules"
        assert imported_modules(source, ["ledger"]) == [(1, "ledger"), (2, "ledger.config"), (3, None)]
        assert package_of(ROOT / "services" / "ledger" / "ledger" / "cli.py") == ["ledger"]
        assert package_of(ROOT / "services" / "ledger" / "migrations" / "env.py") == []
        assert package_of(ROOT / "shared" / "db.py") == ["shared"]
