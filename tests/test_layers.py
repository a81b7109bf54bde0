"""The layer rule: every import in the package runs downward (or stays in its own layer).

Written by the restructure of issue 19. Each sub-package has a rank; a module may import its
own sub-package and sub-packages of a LOWER rank, never a higher one nor a sibling of the same
rank. A new module belongs to one of these sub-packages; a new sub-package needs a line here.
Every import counts, also those inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]

# sub-package -> rank (lowest first): who may import whom.
LAYERS: dict[str, int] = {
    "histosam.v1": 0,  # generated protobuf/gRPC code
    "histosam.qupath_scripts": 0,  # the QuPath scripts (data)
    "histosam.backend.core": 0,  # errors, atomic writes, the settings loader, geometry, transforms, the working grid, the predictor protocol: what every layer may use
    "histosam.backend.bundles": 1,  # what serving needs to run a model: the catalog of names and weights, bundle files, the onnxruntime predictor
    "histosam.backend.wsi": 1,  # whole-slide images: slides, annotations, patch extraction
    "histosam.backend.postprocess": 2,  # mask post-processing: edge snapping, click propagation and their YAML settings
    "histosam.backend.evaluation": 3,  # the simulated user and its numbers: clicker, metrics, the evaluation loop, baselines, report, data splits
    "histosam.backend.serving": 3,  # the gRPC server, sessions, wire format, image sources, model store, and the Python client
    "histosam.backend.qupath": 3,  # QuPath: project sync and script install
    "histosam.training": 4,  # torch: models, training
    "histosam.export": 5,  # torch -> ONNX bundles
    "histosam.benchmarks": 6,  # `histosam bench`: speed and memory measurements (torch ones too)
    "histosam.backend.cli": 7,  # the `histosam` command and its subcommands
}
ROOT_MODULES = {"histosam.backend"}  # the package root: __version__ only, importable by all


def layer_of(module: str) -> str | None:
    best = None
    for name in LAYERS:
        if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best)):
            best = name
    return best


def package_modules() -> dict[str, Path]:
    """Every installed module -> its file, from pyproject's package-dir."""
    dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    out: dict[str, Path] = {}
    for package, folder in dirs.items():
        for path in sorted((REPO / folder).glob("*.py")):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported histosam module) for every import in ``path``, lazy ones included."""
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in known else base))
    return [(line, name) for line, name in found if name.startswith("histosam")]


def upward_imports(modules: dict[str, Path]) -> list[str]:
    known = set(modules)
    problems = []
    for module, path in sorted(modules.items()):
        if module in ROOT_MODULES:
            continue
        source = layer_of(module)
        if source is None:
            problems.append(f"{module}: in no layer (put it in a sub-package listed in LAYERS)")
            continue
        for line, target in imports_of(module, path, known):
            if target in ROOT_MODULES:
                continue
            layer = layer_of(target)
            if layer is None or layer == source:
                continue
            if LAYERS[layer] >= LAYERS[source]:
                where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
                problems.append(f"{where}:{line}: {module} ({source}, layer {LAYERS[source]}) "
                                f"imports {target} ({layer}, layer {LAYERS[layer]})")
    return problems


def test_every_import_runs_downward():
    problems = upward_imports(package_modules())
    assert not problems, "\n".join(problems)


def test_every_module_is_in_a_layer_and_backend_holds_only_sub_packages():
    modules = package_modules()
    assert all(layer_of(m) or m in ROOT_MODULES for m in modules)
    loose = sorted(p.name for p in (REPO / "backend").glob("*.py") if p.name != "__init__.py")
    assert not loose, f"modules directly in backend/: {loose}; each belongs to a sub-package"


def test_the_check_catches_an_upward_import(tmp_path):
    low = tmp_path / "low.py"
    low.write_text("from histosam.backend.cli import main\n")
    problems = [p for p in upward_imports({**package_modules(), "histosam.backend.core.low": low})
                if "histosam.backend.core.low" in p]
    assert problems and "histosam.backend.cli" in problems[0]


@pytest.mark.parametrize("lower, higher", [("histosam.backend.core", "histosam.backend.serving"),
                                           ("histosam.backend.serving", "histosam.export"),
                                           ("histosam.training", "histosam.export")])
def test_serving_never_reaches_training_or_export(lower, higher):
    assert LAYERS[lower] < LAYERS[higher]
