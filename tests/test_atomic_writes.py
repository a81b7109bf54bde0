"""Atomic writes give files and folders the mode a plain open()/mkdir() would (umask respected).

tempfile.mkstemp/mkdtemp create 0o600/0o700 and os.replace keeps it, which made bundles,
reports and training outputs unreadable to anyone but their owner (a service account running
``histosam serve`` got "Permission denied"). These tests pin the mode under two umasks, so the
fix neither leaves outputs private nor forces them world-readable.
"""

from __future__ import annotations

import ast
import copy
import os
import stat
from pathlib import Path

import pytest

from histosam.backend.bundles.bundle import MANIFEST, write_manifest
from histosam.backend.core.atomic import (
    atomic_write,
    is_temporary,
    mkdtemp_umask,
    mkstemp_umask,
    replace_dir,
    staged_dir,
    write_json,
)

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")

# umask -> (file mode, folder mode) that open()/mkdir() give under it
MODES = {0o022: (0o644, 0o755), 0o077: (0o600, 0o700), 0o027: (0o640, 0o750)}


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=sorted(MODES), ids=lambda m: f"umask{m:03o}")
def umask(request):
    """Set the process umask for the test (restored after); yields it."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_helpers_give_open_and_mkdir_modes(tmp_path, umask):
    file_mode, dir_mode = MODES[umask]
    fd, name = mkstemp_umask(tmp_path, prefix=".x.", suffix=".tmp")
    os.close(fd)
    folder = Path(mkdtemp_umask(tmp_path, prefix=".d."))
    assert mode(name) == file_mode
    assert mode(folder) == dir_mode
    # the same as what a plain open()/mkdir() gives here
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain").mkdir()
    assert mode(name) == mode(tmp_path / "plain.txt")
    assert mode(folder) == mode(tmp_path / "plain")
    assert Path(name).name.startswith(".x.") and name.endswith(".tmp") and os.path.isabs(name)
    assert folder.name.startswith(".d.")


def test_helpers_make_unique_names_and_never_reuse_one(tmp_path):
    names = set()
    for _ in range(50):
        fd, name = mkstemp_umask(tmp_path)
        os.close(fd)
        names.add(name)
        names.add(mkdtemp_umask(tmp_path))
    assert len(names) == 100 and len(list(tmp_path.iterdir())) == 100


def test_atomic_write_and_report_files_get_the_open_mode(tmp_path, umask):
    file_mode, _ = MODES[umask]
    old = tmp_path / "results.json"
    old.write_text("{}")
    os.chmod(old, 0o600)  # a file left by an older version: replaced, not kept private
    write_json(old, {"a": 1})
    atomic_write(tmp_path / "out" / "table.md", lambda tmp: tmp.write_text("| x |\n"))
    assert mode(old) == file_mode
    assert mode(tmp_path / "out" / "table.md") == file_mode
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out", "results.json", "table.md"]


def test_write_report_outputs_are_readable_under_umask_022(tmp_path):
    from histosam.backend.evaluation.report import write_report

    results = {
        "config": {"data": ["s"], "fraction": [0.2, 0.8], "max_clicks": 3, "target_iou": 0.9,
                   "full_curve": False},
        "n": 0, "n_kept": 0, "n_total": 0, "runs": {}, "parity": {},
    }
    old = os.umask(0o022)
    try:
        with pytest.warns(UserWarning):  # empty legend: no runs to plot
            paths = write_report(tmp_path / "eval", results)
    finally:
        os.umask(old)
    assert {name: mode(p) for name, p in paths.items()} == {"results": 0o644, "table": 0o644, "plot": 0o644}


def test_bundle_manifest_gets_the_open_mode(tmp_path, umask):
    file_mode, _ = MODES[umask]
    (tmp_path / "encoder.onnx").write_bytes(b"x")
    write_manifest(tmp_path, {"format": "histosam-bundle/1"})
    assert mode(tmp_path / MANIFEST) == file_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.onnx", MANIFEST]


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_exported_bundle_folder_and_files_follow_the_umask(tmp_path, tiny_model, mask):
    from histosam.export.exporter import export_bundle
    from histosam.training.models.registry import resolve_source

    file_mode, dir_mode = MODES[mask]
    out = tmp_path / "my_bundle"
    old = os.umask(mask)
    try:
        export_bundle(resolve_source("tiny_sam"), out, check=False, model=tiny_model, progress=False)
    finally:
        os.umask(old)
    assert mode(out) == dir_mode
    files = [p for p in out.rglob("*") if p.is_file()]
    assert MANIFEST in {p.name for p in files}
    assert {p.name: mode(p) for p in files} == {p.name: file_mode for p in files}
    assert [p.name for p in tmp_path.iterdir()] == ["my_bundle"]  # no temporary folder left


def test_training_writers_get_the_open_mode(tmp_path, tiny_model):
    torch = pytest.importorskip("torch")
    from histosam.training.data import atomic_torch_save
    from histosam.training.models.decoder_weights import save_decoder_weights
    from histosam.training.trainer import _atomic_text

    old = os.umask(0o022)
    try:
        atomic_torch_save({"x": torch.zeros(1)}, tmp_path / "checkpoint.pt")
        save_decoder_weights(tiny_model, tmp_path / "best.safetensors")
        _atomic_text(tmp_path / "config.json", "{}")
    finally:
        os.umask(old)
    assert {p.name: mode(p) for p in tmp_path.iterdir()} == {
        "checkpoint.pt": 0o644, "best.safetensors": 0o644, "config.json": 0o644,
    }


def test_training_run_outputs_are_readable_under_umask_022(tmp_path, tiny_model):
    pytest.importorskip("torch")
    from training_helpers import tiny_config, write_blob_dataset

    from histosam.training.trainer import train

    data = write_blob_dataset(tmp_path / "data", n=4, size=64)
    cfg = tiny_config(data, max_steps_per_epoch=1, epochs=1, holdout=1)
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        train(cfg, out, progress=False, model=copy.deepcopy(tiny_model), cache_dir=tmp_path / "cache")
    finally:
        os.umask(old)
    written = {p.name: mode(p) for p in out.iterdir() if p.is_file()}
    for name in ("best.safetensors", "checkpoint.pt", "config.json", "metrics.csv"):
        assert written.get(name) == 0o644, (name, written)
    assert all(m == 0o644 for m in written.values()), written
    assert not [p for p in tmp_path.rglob("*") if is_temporary(p)]


# --------------------------------------------------------------------------- failures, fsync, one module

REPO = Path(__file__).resolve().parents[1]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    write_json(target, {"old": True})

    def half_then_crash(tmp: Path) -> None:
        tmp.write_text('{"new": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_crash)
    assert target.read_text() == '{\n "old": true\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    with pytest.raises(ValueError):  # NaN is refused before anything is written
        write_json(target, {"x": float("nan")})
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_failed_staged_folder_keeps_the_old_one_and_a_finished_one_replaces_it(tmp_path):
    dest = tmp_path / "bundle"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_dir(dest) as stage:
        (stage / "new.txt").write_text("new")
        raise RuntimeError("export failed")
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"] and (dest / "old.txt").is_file()
    with staged_dir(dest, durable=True) as stage:
        (stage / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt"]


def test_replace_dir_keeps_a_named_backup(tmp_path):
    dest, stage, backup = tmp_path / "project", tmp_path / ".project.partial", tmp_path / "project.bak"
    dest.mkdir()
    (dest / "a").write_text("1")
    stage.mkdir()
    (stage / "a").write_text("2")
    replace_dir(stage, dest, backup=backup, durable=True)
    assert (dest / "a").read_text() == "2" and (backup / "a").read_text() == "1" and not stage.exists()


def test_durable_writes_fsync_the_data_before_the_rename(tmp_path, monkeypatch):
    """The data reaches the disk before the new name does (and the folder entry after)."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync:" + Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "checkpoint.pt"
    atomic_write(target, lambda tmp: tmp.write_bytes(b"weights"), durable=True)
    assert len(events) == 3 and events[1] == "replace"
    assert events[0].startswith("fsync:.checkpoint.pt.") and events[2] == f"fsync:{tmp_path.name}"
    events.clear()
    atomic_write(tmp_path / "table.md", lambda tmp: tmp.write_text("x"))
    assert events == ["replace"]  # reports are not worth a disk flush


def test_every_writer_goes_through_the_atomic_module():
    """No module but histosam.backend.core.atomic renames files into place or makes temporaries:
    a writer of its own would again miss the umask, the fsync or the clean-up on failure."""
    own = {"replace", "rename", "mkstemp", "mkdtemp", "NamedTemporaryFile", "mkstemp_umask", "mkdtemp_umask"}
    offenders = []
    for folder in ("backend", "export", "training", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.name == "atomic.py":
                continue
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in own:
                    base = node.func.value
                    if node.func.attr == "replace" and not (isinstance(base, ast.Name) and base.id == "os"):
                        continue  # str.replace and friends (a Path.replace reads like one: none are left)
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {node.func.attr}")
                elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in own:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {node.func.id}")
    assert not offenders, offenders
