"""Modules compiled by mypyc: one list, a build kept apart from the sources, and a guard against stale builds.

The list is `[tool.loyalty] mypyc` in pyproject.toml: source files and package directories (every module
in them). Two builds compile it:

- the source tree: `make native` (`python -m shared.native`) compiles the list into `.local/native/`, with a
  manifest of the sha256 of every source the build read (the compiled modules and the project modules they
  import). Nothing compiled lies beside a source.
- a wheel (the image): `LOYALTY_MYPYC=1 pip wheel .` (setup.py) compiles the same list into the wheel,
  beside the sources it was built with.

A package holding listed modules calls `overlay` in its `__init__` (rules does): in a source tree, the
compiled directory goes first on the package's path only while the manifest matches the sources as they
are now. An edited source, a new module in a listed package, another Python or a changed list make the
package run interpreted, with a warning that names what changed. LOYALTY_NATIVE=1 (make run, test, bench)
turns that into an ImportError, as it does a missing build or a compiled file lying beside its source;
LOYALTY_NATIVE=0 runs interpreted on purpose.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tomllib
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = "manifest.json"
GROUP = "loyalty_native"  # mypyc's shared library: loyalty_native__mypyc, at the top of the build


class StaleNative(UserWarning):
    """Compiled modules exist but were built from other sources: the package runs interpreted."""


def native_dir(root: Path = ROOT) -> Path:
    return root / ".local" / "native"


def _project(root: Path) -> dict[str, Any]:
    with (root / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def listed(root: Path = ROOT) -> list[Path]:
    """The source files to compile, as the list names them (a directory: every module in it), sorted."""
    out: set[Path] = set()
    for entry in _project(root)["tool"]["loyalty"]["mypyc"]:
        path = root / entry
        out.update(path.rglob("*.py") if path.is_dir() else [path])
    return sorted(out)


def _package_dirs(root: Path) -> dict[str, Path]:
    """Top-level package -> its source directory (pyproject's package-dir)."""
    return {name: root / where for name, where in _project(root)["tool"]["setuptools"]["package-dir"].items()}


def _module_file(name: str, packages: dict[str, Path]) -> Path | None:
    top, _, rest = name.partition(".")
    if top not in packages:
        return None
    base = packages[top].joinpath(*rest.split(".")) if rest else packages[top]
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(source: Path, packages: dict[str, Path]) -> set[Path]:
    """The project modules `source` imports (the compiled code relies on their types)."""
    out: set[Path] = set()
    for node in ast.walk(ast.parse(source.read_bytes())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from a.b import c` may import the module a.b.c or a name of a.b: both are looked for.
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        for name in names:
            found = _module_file(name, packages)
            if found is not None:
                out.add(found)
    return out


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(root: Path = ROOT) -> dict[str, Any]:
    """What a build of the current sources records: the interpreter, the compiled modules, and the
    sha256 of every source the build reads."""
    compiled = listed(root)
    packages = _package_dirs(root)
    inputs = set(compiled)
    for source in compiled:
        inputs |= _imports(source, packages)
    return {
        "python": sys.implementation.cache_tag,
        "compiled": [str(p.relative_to(root)) for p in compiled],
        "sources": {str(p.relative_to(root)): _digest(p) for p in sorted(inputs)},
    }


def stale(root: Path = ROOT) -> list[str]:
    """Why the build in `root` cannot be used for the sources as they are ([] when it can)."""
    recorded_file = native_dir(root) / MANIFEST
    if not recorded_file.is_file():
        return ["never built (make native)"]
    recorded = json.loads(recorded_file.read_text())
    out = []
    if recorded.get("python") != sys.implementation.cache_tag:
        out.append(f"built for {recorded.get('python')}, running {sys.implementation.cache_tag}")
    compiled = [str(p.relative_to(root)) for p in listed(root)]
    if recorded.get("compiled") != compiled:
        out.append("the list of compiled modules changed")
    for name, digest in recorded.get("sources", {}).items():
        path = root / name
        if not path.is_file() or _digest(path) != digest:
            out.append(f"{name} changed")
    out.extend(f"{p.relative_to(root)} lies beside its source (delete it)" for p in _beside_sources(root))
    return out


def _beside_sources(root: Path) -> list[Path]:
    """Compiled files in the source tree (an old in-place build), which Python would import before the
    source next to them."""
    return sorted(p for d in _package_dirs(root).values() for p in d.rglob("*.so"))


def overlay(package: str, path: list[str], root: Path = ROOT) -> list[str]:
    """The `__path__` of `package`: its compiled directory first when the build matches the sources."""
    mode = os.environ.get("LOYALTY_NATIVE", "")
    if mode == "0" or not (root / "pyproject.toml").is_file():
        return path  # interpreted on purpose, or an installed wheel (compiled in place)
    problems = stale(root)
    if problems:
        message = f"{package}: compiled modules not used, running interpreted: {'; '.join(problems)}"
        if mode == "1":
            raise ImportError(f"{message} (LOYALTY_NATIVE=1: run `make native`)")
        if native_dir(root).exists() or _beside_sources(root):
            warnings.warn(message, StaleNative, stacklevel=2)
        return path
    _load_group(native_dir(root))
    return [str(native_dir(root) / package.replace(".", os.sep)), *path]


def _load_group(native: Path) -> None:
    """Loads mypyc's shared library of the group, which each compiled module imports by its top-level name.
    Not by putting the build on sys.path: there its package directories would be namespace packages that
    shadow the source packages of a process finding them through an editable install (and sys.path passes
    to child processes)."""
    for library in native.glob(f"{GROUP}__mypyc.*"):
        name = library.name.split(".")[0]
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, library)
            assert spec is not None
            assert spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)


def extensions(root: Path = ROOT, build_dir: Path | None = None) -> list[Any]:
    """The listed modules as setuptools extensions, compiled by mypyc (run from `root`: mypy reads its
    configuration, and names the modules, from there)."""
    from mypyc.build import mypycify

    sources = [str(p.relative_to(root)) for p in listed(root)]
    target = str(build_dir or root / "build" / "mypyc")
    return list(mypycify(sources, opt_level="3", group_name=GROUP, target_dir=target))


def build(root: Path = ROOT) -> bool:
    """Compiles the list into `.local/native` unless the build there matches the sources; True when it
    compiled. The old build stays until the new one is complete."""
    if not stale(root):
        return False
    from setuptools import Distribution

    work = root / ".local" / "native-build"
    fresh = work / "lib"
    shutil.rmtree(fresh, ignore_errors=True)
    current = manifest(root)  # before compiling: an edit during the build makes it stale, not wrong
    cwd = os.getcwd()
    os.chdir(root)
    try:
        dist = Distribution({"name": "loyalty-native", "ext_modules": extensions(root, work / "c")})
        command = dist.get_command_obj("build_ext")
        command.build_lib = str(fresh)
        command.build_temp = str(work / "temp")
        command.parallel = os.cpu_count() or 1
        dist.run_command("build_ext")
    finally:
        os.chdir(cwd)
    for leftover in _beside_sources(root):
        leftover.unlink()
    (fresh / MANIFEST).write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    shutil.rmtree(native_dir(root), ignore_errors=True)
    fresh.rename(native_dir(root))
    return True


if __name__ == "__main__":
    print("mypyc: compiled" if build() else "mypyc: up to date", f"({native_dir()})")  # noqa: T201
