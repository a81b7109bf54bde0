"""histosam.backend.evaluation.compare and `histosam compare`: runs paired image by image."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histosam.backend.cli import main
from histosam.backend.core.errors import InvalidInputError
from histosam.backend.evaluation.compare import bootstrap_interval, compare_runs, pair_samples


def sample(dataset: str, name: str, ious: list[float]) -> dict:
    return {"dataset": dataset, "name": name, "ious": ious}


def curve_reaching(click: int, top: float = 0.92, max_clicks: int = 20) -> list[float]:
    """An IoU curve that crosses 0.80, 0.85 and 0.90 at ``click`` (never, when click > max_clicks)."""
    return [0.5 if k < click else top for k in range(1, max_clicks + 1)]


def test_a_run_better_on_every_image_is_settled_and_a_few_images_are_not():
    rng = np.random.default_rng(1)
    slow = rng.integers(8, 15, 30)
    a = [sample("glas", f"g{i}", curve_reaching(int(c) - 3)) for i, c in enumerate(slow)]
    b = [sample("glas", f"g{i}", curve_reaching(int(c))) for i, c in enumerate(slow)]
    (glas,) = compare_runs(a, b, 20)
    noc85 = next(d for d in glas.differences if d.metric == "NoC@85")
    assert glas.n == 30 and noc85.mean == pytest.approx(-3.0) and noc85.settled and noc85.high < 0
    # One image of 30 differs (by 10 clicks): a mean difference of 0.33, and not settled.
    b2 = [sample("glas", f"g{i}", curve_reaching(15)) for i in range(30)]
    a2 = [sample("glas", f"g{i}", curve_reaching(5 if i == 7 else 15)) for i in range(30)]
    (one,) = compare_runs(a2, b2, 20)
    d = next(d for d in one.differences if d.metric == "NoC@85")
    assert d.mean == pytest.approx(-10 / 30) and not d.settled and d.low <= 0 <= d.high
    assert d.deciding == (("glas/g7", -10.0),)


def test_curves_that_stop_early_are_padded_and_datasets_pool_into_groups():
    a = [sample("bcss", "x", [0.6, 0.95]), sample("ocdc", "y", [0.4] * 20), sample("glas", "z", [0.91])]
    b = [sample("bcss", "x", [0.6] * 20), sample("ocdc", "y", [0.4] * 19 + [0.9]), sample("glas", "z", [0.91])]
    rows = {g.group: g for g in compare_runs(a, b, 20, {"tumour": ["bcss", "ocdc"]})}
    assert list(rows) == ["bcss", "ocdc", "glas", "tumour", "all"]
    m20 = {g: next(d for d in rows[g].differences if d.metric == "mIoU@20") for g in rows}
    assert m20["bcss"].mean == pytest.approx(0.35)  # A stopped at 0.95 after two clicks: padded with it
    assert m20["tumour"].mean == pytest.approx((0.35 - 0.5) / 2)
    assert rows["tumour"].n == 2 and rows["all"].n == 3
    assert not m20["tumour"].settled  # two images: never settled, whatever the interval


def test_pairing_keeps_shared_images_and_refuses_runs_without_any():
    a = [sample("bcss", "x", [0.5]), sample("bcss", "only_a", [0.5])]
    b = [sample("bcss", "x", [0.7]), sample("glas", "x", [0.7])]
    assert [k for k, _, _ in pair_samples(a, b)] == ["bcss/x"]
    with pytest.raises(InvalidInputError, match="no image in common"):
        pair_samples(a, [sample("glas", "q", [0.5])])
    with pytest.raises(InvalidInputError, match="group 'tumour' names datasets"):
        compare_runs(a, b, 20, {"tumour": ["bcss", "panda"]})


def test_bootstrap_interval_is_reproducible_and_covers_the_mean():
    values = np.array([0, 0, 0, 0, 10.0])
    low, high = bootstrap_interval(values)
    assert (low, high) == bootstrap_interval(values) and low <= 2.0 <= high and low >= 0
    assert bootstrap_interval(np.full(7, 3.0)) == (3.0, 3.0)


def test_bootstrap_memory_is_bounded_by_chunks_with_the_same_interval(monkeypatch):
    from histosam.backend.evaluation import compare

    values = np.random.default_rng(3).normal(size=40)
    whole = bootstrap_interval(values, draws=2000)
    monkeypatch.setattr(compare, "BOOTSTRAP_CHUNK", 100)  # 2 resamples of 40 images per chunk
    assert bootstrap_interval(values, draws=2000) == whole


def write_results(path, runs: dict[str, list[dict]], max_clicks: int = 20) -> None:
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(
        {"config": {"max_clicks": max_clicks}, "runs": {k: {"samples": v} for k, v in runs.items()}}))


def test_compare_command_writes_table_json_and_plot(tmp_path, capsys):
    a = [sample("bcss", f"b{i}", curve_reaching(4)) for i in range(6)]
    b = [sample("bcss", f"b{i}", curve_reaching(9)) for i in range(6)]
    write_results(tmp_path / "new", {"default/onnx+auto-propagation": a, "default/onnx": b})
    write_results(tmp_path / "old", {"random_walker": b})
    out = tmp_path / "cmp"
    rc = main(["compare", str(tmp_path / "new"), str(tmp_path / "old"), "--run-a", "auto", "--group", "tumour=bcss",
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| bcss | 6 | NoC@85 | -5.00 | [-5.00, -5.00] | yes |" in printed
    saved = json.loads((out / "comparison.json").read_text())
    assert [g["group"] for g in saved["groups"]] == ["bcss", "tumour"]
    assert saved["groups"][0]["differences"][1]["settled"] is True
    assert (out / "comparison.md").read_text().startswith("A = ")
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The same file on both sides: two of its runs.
    assert main(["compare", str(tmp_path / "new"), str(tmp_path / "new" / "results.json"), "--run-a", "auto",
                 "--run-b", "default/onnx"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["{new}", "{old}"], "holds 2 runs, choose one with --run-a"),
    (["{new}", "{old}", "--run-a", "onnx"], "names 2 runs"),
    (["{new}", "{tmp}/nowhere", "--run-a", "auto"], "no such evaluation"),
    (["{new}", "{old}", "--run-a", "auto", "--group", "tumour"], "--group must be NAME=DATASET"),
    (["{new}", "{short}", "--run-a", "auto"], "different --max-clicks"),
    (["{new}", "{broken}", "--run-a", "auto"], "not a readable results.json"),
    (["{new}", "{old}", "--run-a", "auto", "--draws", "5"], "--draws must be between"),
    (["{new}", "{odd}", "--run-a", "auto"], "sample 0 needs a name, a dataset"),
])
def test_compare_command_refuses_bad_input_with_one_line(tmp_path, capsys, argv, message):
    runs = [sample("bcss", "b", [0.5])]
    write_results(tmp_path / "new", {"x/onnx+auto-propagation": runs, "x/onnx": runs})
    write_results(tmp_path / "old", {"random_walker": runs})
    write_results(tmp_path / "short", {"random_walker": runs}, max_clicks=5)
    write_results(tmp_path / "odd", {"random_walker": [{"dataset": "bcss", "name": "b", "ious": ["x"]}]})
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    names = {k: str(tmp_path / k) for k in ("new", "old", "short", "broken", "odd")} | {"tmp": str(tmp_path)}
    rc = main(["compare", *[a.format(**names) for a in argv]])
    err = capsys.readouterr().err
    assert rc != 0 and message in err and len(err.strip().splitlines()) == 1
