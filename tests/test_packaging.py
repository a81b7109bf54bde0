"""The README's test command on a fresh machine: every module a test imports is installed by
``pip install -e ".[test]"`` (the package, its dependencies and the test extra), not by
whatever else the developer's machine happens to hold."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11, what the README sets up

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
# Imported only inside tests that skip without them, because they need more than pip can give
# (paquo needs a QuPath installation, PAQUO_QUPATH_DIR; shapely comes with paquo).
NEEDS_MORE_THAN_PIP = {"paquo", "shapely"}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _extras(requirement: str) -> list[str]:
    m = re.match(r"[^\[]*\[([^\]]*)\]", requirement)
    return [e.strip() for e in m.group(1).split(",")] if m else []


def declared_closure() -> set[str]:
    """Distributions `pip install -e ".[test]"` installs: the declared ones and what they require."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    todo = list(project["dependencies"])
    seen_extras: set[str] = set()
    stack = ["test"]
    while stack:  # histosam[torch] inside the test extra
        extra = stack.pop()
        if extra in seen_extras:
            continue
        seen_extras.add(extra)
        for req in extras[extra]:
            if _name(req) == "histosam":
                stack.extend(_extras(req))
            else:
                todo.append(req)
    out: set[str] = set()
    while todo:
        req = todo.pop()
        name = _name(req)
        if ";" in req and "extra ==" in req:  # a dependency's own optional extra
            continue
        if name in out:
            continue
        out.add(name)
        try:
            todo.extend(r for r in (md.requires(name) or []) if "extra ==" not in r)
        except md.PackageNotFoundError:
            pass  # not installed here: nothing to follow (the import check below reports it)
    return out


def imports_of_tests() -> dict[str, str]:
    """Top-level modules the test files import, outside the standard library and the project."""
    # the tests' own helpers, the repository's development tools (tools/protogen.py) and the package
    local = {p.stem for p in TESTS.glob("*.py")} | {p.stem for p in (TESTS.parent / "tools").glob("*.py")} | {"histosam"}
    found: dict[str, str] = {}
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "importorskip" and node.args:
                arg = node.args[0]
                names = [arg.value] if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else []
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    found.setdefault(top, path.name)
    return found


def test_every_module_the_tests_import_comes_with_the_test_extra():
    providers = md.packages_distributions()
    closure = declared_closure()
    missing = []
    for module, where in sorted(imports_of_tests().items()):
        if module in NEEDS_MORE_THAN_PIP:
            continue
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
        if not dists & closure:
            missing.append(f"{module} ({where}; from {', '.join(sorted(dists)) or 'an unknown distribution'})")
    assert not missing, f"tests import modules no extra installs: {'; '.join(missing)}"
