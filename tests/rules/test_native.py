"""The rules engine and the batch code run compiled by mypyc (`make native`, part of `make setup`; the list
and the guard: shared/native.py).

- The compiled code is what runs whenever its build matches the sources, and always under `make test`
  (LOYALTY_NATIVE=1); a build that does not match is never used (the guard's cases, on a project of its own).
- The compiled engine computes exactly what the interpreted source computes: a stream of events that
  exercises every rule kind is replayed here and in a child process that runs the source interpreted
  (LOYALTY_NATIVE=0), and every visible result must be equal.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import rules.engine
from rules import ruleset as rs
from rules.engine import (
    AwardRecord,
    CompiledRuleset,
    CustomerSnapshot,
    apply_event,
    evaluate,
    plan_clawbacks,
    review_tier,
)
from shared import native
from shared.events import CloudEvent
from tests.rules.samples import T0, TIERS, doc, line, order, review

ROOT = Path(__file__).resolve().parents[2]

DOCUMENT = doc(
    {"id": "base", "kind": "points_per_unit", "priority": 100},
    {"id": "first", "kind": "bonus", "points": 100, "when": "customer.purchase_count == 0"},
    {"id": "third", "kind": "bonus", "points": 30, "when": "customer.purchase_count == 2"},
    {
        "id": "cross",
        "kind": "bonus",
        "points": 40,
        "when": "customer.purchase_count > 0 && size(event.new_categories) > 0",
    },
    {"id": "up", "kind": "bonus", "points": 50, "when": "event.net_amount >= 500.0"},
    {"id": "winback", "kind": "bonus", "points": 80, "when": "customer.days_since_last_purchase > 30"},
    {"id": "cat", "kind": "line_multiplier", "categories": ["paint"], "multiplier": "1.5"},
    {"id": "hero", "kind": "line_multiplier", "skus": ["S-1"], "multiplier": "3", "max_points": 400},
    {"id": "bulk", "kind": "line_multiplier", "line_when": "line.quantity >= 10.0", "multiplier": "1.2"},
    {"id": "promo", "kind": "bonus", "points": 25, "campaign": "spring", "stop": True, "priority": -50},
    {"id": "tier", "kind": "tier_multiplier", "priority": -10},
    {
        "id": "review",
        "kind": "engagement",
        "on": "review.posted",
        "points": 15,
        "limit": {"count": 2, "period": "month"},
    },
    currencies={"EUR": {"points_per_unit": "1"}, "USD": {"points_per_unit": "2", "spend_factor": "0.9"}},
    rounding="half_up",
    pending_days=7,
    exclusions={"gift_cards": True, "shipping": True},
    caps={"per_order": 3000, "per_customer": {"points": 5000, "period": "month"}},
    campaigns={"spring": {"starts_at": "2026-03-20T00:00:00Z", "ends_at": "2026-05-01T00:00:00Z", "budget": 2000}},
    tiers=TIERS,
)


def _events(tenant: str, count: int) -> list[CloudEvent[Any]]:
    """The same stream in every process: ids (of events and orders) are numbered, not random."""
    rng = random.Random(20261204)
    out: list[CloudEvent[Any]] = []
    for i in range(count):
        customer = f"c-{rng.randrange(12)}"
        at = T0 + timedelta(hours=7 * i)
        if rng.random() < 0.15:
            out.append(review(tenant, customer, at=at).model_copy(update={"id": f"ev-{i}"}))
            continue
        lines = [
            line(
                rng.choice(["S-1", "S-2", "S-3", "GC-1"]),
                rng.choice(["paint", "tools", "safety", "gift_card", "shipping"]),
                str(rng.choice([1, 2, 10, 25])),
                f"{rng.randint(100, 90000) / 100:.2f}",
            )
            for _ in range(rng.randint(1, 4))
        ]
        currency = rng.choice(["EUR", "EUR", "USD"])
        placed = order(tenant, customer, lines, at=at, currency=currency, order_id=f"SO-{i}")
        out.append(placed.model_copy(update={"id": f"ev-{i}"}))
    return out


def replay(events: list[CloudEvent[Any]]) -> list[tuple[Any, ...]]:
    """Evaluates the stream with state, campaign spend and tier reviews carried along; returns every
    visible result: commands (ids, points, breakdowns), the whole trace and the state after each event."""
    compiled = CompiledRuleset.compile("main", 1, rs.parse(DOCUMENT))
    tiers = compiled.document.tiers
    assert tiers is not None
    states: dict[str, CustomerSnapshot] = {}
    spent: dict[str, int] = {}
    out: list[tuple[Any, ...]] = []
    for event in events:
        cid = event.data.customer_id
        state = states.setdefault(cid, CustomerSnapshot(cid))
        ev = evaluate(compiled, event, state, campaign_spent=spent)
        for campaign, points in ev.campaign_points.items():
            spent[campaign] = spent.get(campaign, 0) + points
        apply_event(
            state,
            event,
            spend_factor=compiled.spend_factor(getattr(event.data, "currency", "EUR")),
            points=ev.points_by_customer.get(cid, 0),
            counters=ev.counters.get(cid, {}),
        )
        change = review_tier(state, tiers, event.time)
        out.append(
            (
                ev.total_points,
                [(c.command_id, c.customer_id, c.points, c.matures_at, c.breakdown) for c in ev.commands],
                [(o.rule_id, o.fired, o.points, o.explanation, o.customer_id) for o in ev.trace],
                (state.purchase_count, state.spend_12m(event.time), sorted(state.categories), state.tier),
                (change.previous, change.tier, change.reason) if change else None,
            )
        )
    return out


def clawbacks() -> list[tuple[str, str, str, int]]:
    records = [AwardRecord("earn-a", "c-1", 120, 0), AwardRecord("earn-b", "c-2", 33, 10)]
    plan = plan_clawbacks(
        "t", "refund-1", records, order_net=Decimal(300), refunded_before=Decimal(50), refunded_now=Decimal(70)
    )
    return [(p.command_id, p.customer_id, p.original_command_id, p.points) for p in plan]


def results() -> str:
    """Everything the replay and a clawback plan give, as text (what the child process prints)."""
    return repr((replay(_events("t-native", 600)), clawbacks()))


def _interpreted_results() -> str:
    script = (
        "import rules.engine.evaluation as e, tests.rules.test_native as t;"
        "assert e.__file__.endswith('.py'), e.__file__;"
        "print(t.results())"
    )
    env = {**os.environ, "LOYALTY_NATIVE": "0", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


class TestSameResults:
    def test_compiled_and_interpreted_engines_agree_on_every_result(self) -> None:
        here = results()
        assert here == _interpreted_results()
        # The stream reaches every kind of outcome, so the comparison covers them.
        for fragment in ("per-order cap", "per-customer cap", "tier Silver", "tier Gold", "limit", "condition not met"):
            assert fragment in here, fragment
        assert "upgrade: " in here, "tier changes happened"
        assert "claw-" in here, "the refund claws something back"

    def test_the_engine_imported_here_is_the_package(self) -> None:
        assert rules.engine.evaluate.__module__ == "rules.engine.evaluation"


def _module_name(source: Path) -> str:
    parts = source.relative_to(ROOT / "services" / "rules").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


class TestCompiledInUse:
    def test_every_listed_module_runs_compiled_exactly_when_its_build_is_current(self) -> None:
        listed = native.listed()
        assert {_module_name(p) for p in listed} >= {"rules.engine", "rules.engine.evaluation", "rules.batch"}
        current = not native.stale() and os.environ.get("LOYALTY_NATIVE") != "0"
        if os.environ.get("LOYALTY_NATIVE") == "1":  # make test, run, bench
            assert current, native.stale()
        for source in listed:
            module = importlib.import_module(_module_name(source))
            where = Path(module.__file__ or "")
            if current:
                assert where.suffix == ".so", f"{module.__name__} runs interpreted"
                assert where.is_relative_to(native.native_dir()), where
            else:
                assert where == source, f"{module.__name__}: {where} is not its source"


def _project(root: Path) -> None:
    """A project of two modules compiled (pkg/fast.py, and pkg/sub/ whole) and one they import (pkg/types.py)."""
    (root / "pyproject.toml").write_text(
        '[tool.setuptools]\npackage-dir = { "pkg" = "src/pkg" }\n'
        '[tool.loyalty]\nmypyc = ["src/pkg/fast.py", "src/pkg/sub"]\n'
    )
    package = root / "src" / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "types.py").write_text("X = 1\n")
    (package / "fast.py").write_text("from pkg.types import X\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "a.py").write_text("A = 1\n")


def _built(root: Path) -> None:
    """What `make native` leaves: the compiled tree and the manifest of the sources it read."""
    (native.native_dir(root) / "pkg").mkdir(parents=True)
    (native.native_dir(root) / native.MANIFEST).write_text(json.dumps(native.manifest(root)))


class TestGuard:
    @pytest.fixture
    def root(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        monkeypatch.delenv("LOYALTY_NATIVE", raising=False)
        monkeypatch.setattr(sys, "path", list(sys.path))
        _project(tmp_path)
        return tmp_path

    def _path(self, root: Path) -> list[str]:
        return native.overlay("pkg", [str(root / "src" / "pkg")], root)

    def test_a_current_build_goes_first(self, root: Path) -> None:
        _built(root)
        assert native.manifest(root)["compiled"] == ["src/pkg/fast.py", "src/pkg/sub/__init__.py", "src/pkg/sub/a.py"]
        assert set(native.manifest(root)["sources"]) == {
            "src/pkg/fast.py",
            "src/pkg/sub/__init__.py",
            "src/pkg/sub/a.py",
            "src/pkg/types.py",  # imported by a compiled module
        }
        before = list(sys.path)
        assert self._path(root) == [str(root / ".local" / "native" / "pkg"), str(root / "src" / "pkg")]
        assert sys.path == before, "the build is never a path entry (its packages would shadow the sources')"

    @pytest.mark.parametrize(
        ("change", "reason"),
        [
            (lambda r: (r / "src/pkg/fast.py").write_text("from pkg.types import X\nY = 2\n"), "fast.py changed"),
            (lambda r: (r / "src/pkg/types.py").write_text("X = 2\n"), "types.py changed"),
            (lambda r: (r / "src/pkg/sub/b.py").write_text(""), "list of compiled modules changed"),
            (lambda r: (r / "src/pkg/sub/a.py").unlink(), "a.py changed"),
            (lambda r: (r / "src/pkg/fast.cpython-311-x86_64-linux-gnu.so").write_bytes(b""), "beside its source"),
        ],
        ids=["edited", "an-import-edited", "module-added", "module-removed", "so-beside-source"],
    )
    def test_a_build_older_than_the_sources_is_not_used(
        self, root: Path, monkeypatch: pytest.MonkeyPatch, change: Any, reason: str
    ) -> None:
        _built(root)
        change(root)
        assert any(reason in problem for problem in native.stale(root)), native.stale(root)
        with pytest.warns(native.StaleNative, match=reason):
            assert self._path(root) == [str(root / "src" / "pkg")]
        monkeypatch.setenv("LOYALTY_NATIVE", "1")
        with pytest.raises(ImportError, match=reason):
            self._path(root)

    def test_never_built_runs_interpreted_quietly_unless_required(
        self, root: Path, monkeypatch: pytest.MonkeyPatch, recwarn: pytest.WarningsRecorder
    ) -> None:
        assert self._path(root) == [str(root / "src" / "pkg")]
        assert not recwarn.list
        monkeypatch.setenv("LOYALTY_NATIVE", "1")
        with pytest.raises(ImportError, match="never built"):
            self._path(root)

    def test_interpreted_on_request(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        _built(root)
        monkeypatch.setenv("LOYALTY_NATIVE", "0")
        assert self._path(root) == [str(root / "src" / "pkg")]

    def test_another_python_is_not_used(self, root: Path) -> None:
        _built(root)
        manifest_file = native.native_dir(root) / native.MANIFEST
        recorded = json.loads(manifest_file.read_text())
        manifest_file.write_text(json.dumps({**recorded, "python": "cpython-310"}))
        with pytest.warns(native.StaleNative, match="built for cpython-310"):
            assert self._path(root) == [str(root / "src" / "pkg")]
