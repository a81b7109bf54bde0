"""The evaluation loop, aggregates, parity and the `histosam evaluate` CLI.

The predictors defined here are test doubles of the *model* only (a perfect one that returns
the ground truth, an empty one, ...); the loop, clicker, metrics and report are the real code.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from histosam.backend.cli import build_parser, main
from histosam.backend.core.errors import InvalidInputError, NotFoundError
from histosam.backend.core.predictor import Prediction, Predictor
from histosam.backend.core.transforms import ImageTransform, mask_to_prompt_logits
from histosam.backend.evaluation.loop import (
    EvalConfig,
    EvalSample,
    SampleResult,
    aggregate,
    evaluate_pair,
    evaluate_predictor,
    load_samples,
    parity_summary,
    select_samples,
    summarise_run,
)
from histosam.backend.evaluation.report import render_table, write_report

FRAME = ImageTransform(1024, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def synthetic_samples(n: int = 4, shape: tuple[int, int] = (48, 64)) -> list[EvalSample]:
    """Random images (all different) with one blob each, of varying size and place."""
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        mask = np.zeros(shape, np.uint8)
        cv2.circle(mask, (15 + 8 * i, 20 + 3 * i), 8 + 2 * i, 1, -1)
        out.append(EvalSample(name=f"s{i}", dataset="synthetic", mask_array=mask, image_array=image))
    return out


class OraclePredictor:
    """Looks up the current image's ground truth; ``respond(gt, n_clicks)`` makes the mask."""

    def __init__(self, samples: list[EvalSample], respond, name: str = "oracle") -> None:
        self.name = name
        self._truth = {s.image().tobytes(): s.mask for s in samples}
        self._respond = respond
        self._gt: np.ndarray | None = None

    def set_image(self, image: np.ndarray) -> None:
        self._gt = self._truth[np.ascontiguousarray(image).tobytes()]

    def predict(self, points=None, labels=None, box=None, mask_logits=None) -> Prediction:
        mask = np.asarray(self._respond(self._gt, len(points)), bool)
        return Prediction(mask, mask_to_prompt_logits(mask, FRAME).astype(np.float32), 1.0)


def perfect(samples):
    return OraclePredictor(samples, lambda gt, k: gt, "perfect")


def empty(samples):
    return OraclePredictor(samples, lambda gt, k: np.zeros_like(gt), "empty")


def test_test_doubles_satisfy_the_predictor_protocol():
    assert isinstance(perfect(synthetic_samples(1)), Predictor)


def test_perfect_predictor_needs_one_click_everywhere():
    samples = synthetic_samples()
    config = EvalConfig(max_clicks=20)
    results = evaluate_predictor(perfect(samples), samples, config, progress=False)
    agg = aggregate(results, config)
    assert agg["noc"] == {"80": 1.0, "85": 1.0, "90": 1.0}
    assert agg["nof"]["90"] == {"count": 0, "fraction": 0.0}
    assert all(len(r.clicks) == 1 for r in results)
    assert agg["miou_per_click"] == {str(k): 1.0 for k in (1, 2, 3, 5, 10, 20)}
    assert agg["obedience"] == {"positive": 1.0, "negative": None}


def test_empty_predictor_fails_everywhere():
    samples = synthetic_samples()
    config = EvalConfig(max_clicks=20)
    results = evaluate_predictor(empty(samples), samples, config, progress=False)
    agg = aggregate(results, config)
    n = len(samples)
    assert agg["noc"] == {"80": 20.0, "85": 20.0, "90": 20.0}
    assert agg["nof"]["85"] == {"count": n, "fraction": 1.0}
    assert agg["nof"]["90"] == {"count": n, "fraction": 1.0}
    for r in results:
        assert len(r.clicks) == 20
        assert len({(c.y, c.x) for c in r.clicks}) == 20  # never the same pixel twice
        assert all(c.positive for c in r.clicks)
    assert agg["obedience"]["positive"] == 0.0
    assert agg["miou_per_click"]["20"] == 0.0


class RecordingPredictor:
    """Returns an empty mask and logits filled with the call number; records every call."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.images = 0

    def set_image(self, image):
        self.images += 1
        self.calls.clear()

    def predict(self, points=None, labels=None, box=None, mask_logits=None):
        self.calls.append({
            "points": np.array(points), "labels": np.array(labels), "box": box,
            "mask_logits": None if mask_logits is None else np.array(mask_logits),
        })
        n = len(self.calls)
        return Prediction(np.zeros((48, 64), bool), np.full((256, 256), n, np.float32), 0.0)


def test_loop_sends_every_click_so_far_and_the_previous_logits():
    sample = synthetic_samples(1)[0]
    pred = RecordingPredictor()
    results = evaluate_predictor(pred, [sample], EvalConfig(max_clicks=4), progress=False)
    clicks = results[0].clicks
    assert pred.images == 1 and len(pred.calls) == 4
    assert pred.calls[0]["mask_logits"] is None  # first click: no mask prompt
    for i, call in enumerate(pred.calls):
        assert call["box"] is None
        np.testing.assert_array_equal(call["points"], [[c.x, c.y] for c in clicks[: i + 1]])
        np.testing.assert_array_equal(call["labels"], [c.label for c in clicks[: i + 1]])
        if i:
            assert np.all(call["mask_logits"] == i)  # the logits of the previous call


def almost(gt: np.ndarray, k: int) -> np.ndarray:
    """Empty after the first click, then the ground truth minus its middle row (a blob of
    radius >= 8: IoU just above 0.9, and at least 17 error pixels left to click)."""
    if k == 1:
        return np.zeros_like(gt)
    out = gt.copy()
    ys, _ = np.nonzero(gt)
    out[(ys.min() + ys.max()) // 2] = False
    return out


def test_stops_at_target_unless_full_curve():
    samples = synthetic_samples(2)
    short = evaluate_predictor(OraclePredictor(samples, almost), samples, EvalConfig(10), progress=False)
    assert [len(r.ious) for r in short] == [2, 2]
    assert all(0.9 <= r.ious[-1] < 1.0 for r in short)
    config = EvalConfig(10, full_curve=True)
    full = evaluate_predictor(OraclePredictor(samples, almost), samples, config, progress=False)
    assert [len(r.ious) for r in full] == [10, 10]
    # Same NoC either way; mIoU of the stopped curves is padded with the last IoU.
    short_agg = aggregate(short, EvalConfig(10))
    full_agg = aggregate(full, config)
    assert short_agg["noc"] == full_agg["noc"] == {"80": 2.0, "85": 2.0, "90": 2.0}
    assert short_agg["miou_per_click"]["10"] == pytest.approx(full_agg["miou_per_click"]["10"])


def test_a_target_below_the_highest_noc_threshold_does_not_cut_curves_short():
    def left_half_then_almost(gt: np.ndarray, k: int) -> np.ndarray:
        if k >= 3:
            return almost(gt, k)  # IoU just above 0.9
        return gt & (np.arange(gt.shape[1]) < gt.nonzero()[1].mean())  # IoU about 0.5

    samples = synthetic_samples(2)
    # IoU 0.5 after click 1 is above the target, but NoC@90 needs the curve up to 0.90
    half = OraclePredictor(samples, left_half_then_almost)
    config = EvalConfig(10, target_iou=0.3)
    results = evaluate_predictor(half, samples, config, progress=False)
    assert [len(r.ious) for r in results] == [3, 3]
    assert aggregate(results, config)["noc"]["90"] == 3.0


def test_refinement_reports_gain_and_error_closed_between_clicks_1_and_10():
    config = EvalConfig(max_clicks=20)
    rising = SampleResult(name="a", dataset="d", ious=[0.6 + 0.03 * k for k in range(10)])  # stops at 0.87
    flat = SampleResult(name="b", dataset="d", ious=[0.8] * 20)
    out = aggregate([rising, flat], config)["refinement"]
    assert out["from_click"] == 1 and out["to_click"] == 10
    assert out["miou_gain"] == pytest.approx((0.87 - 0.6) / 2)
    assert out["error_closed"] == pytest.approx(((0.87 + 0.8) / 2 - 0.7) / (1 - 0.7))
    short = aggregate([rising], EvalConfig(max_clicks=5))["refinement"]
    assert short["miou_gain"] is None and short["error_closed"] is None


def test_wrong_mask_shape_from_a_predictor_is_a_clear_error():
    samples = synthetic_samples(1)
    bad = OraclePredictor(samples, lambda gt, k: np.zeros((3, 3), bool))
    with pytest.raises(InvalidInputError, match="mask"):
        evaluate_predictor(bad, samples, EvalConfig(3), progress=False)


# --------------------------------------------------------------------------- parity


def test_parity_of_two_identical_predictors():
    samples = synthetic_samples()
    config = EvalConfig(5)
    a, b, diffs = evaluate_pair(perfect(samples), perfect(samples), samples, config, progress=False)
    p = parity_summary(a, b, diffs, config, "m/torch", "m/onnx")
    assert p["n_noc_different"] == 0 and not p["flagged"]
    assert p["identical_click_sequences"] == len(samples)
    assert p["max_low_res_logit_difference"] == 0.0
    assert p["spc_ratio"]["amortised"] > 0
    assert all(r.logits is None for r in a + b)  # dropped after comparison


def test_parity_flags_predictors_that_differ():
    samples = synthetic_samples()
    config = EvalConfig(5)
    a, b, diffs = evaluate_pair(perfect(samples), OraclePredictor(samples, almost), samples, config, progress=False)
    p = parity_summary(a, b, diffs, config, "m/torch", "m/onnx")
    n = len(samples)
    assert p["noc_difference"]["90"]["per_sample"] == [1] * n
    assert p["n_noc_different"] == n and p["flagged"]
    assert p["identical_click_sequences"] == 0  # one click vs two
    # Only the shared first click is compared: ground truth (+8 inside) vs empty (-8).
    assert p["max_low_res_logit_difference"] == pytest.approx(16.0)
    results = {
        "config": {"data": ["x"], "fraction": None, "max_clicks": 5, "target_iou": 0.9, "full_curve": False},
        "n": n, "n_kept": n, "n_total": n,
        "runs": {"m/torch": summarise_run(a, config), "m/onnx": summarise_run(b, config)},
        "parity": {"m": p},
    }
    table = render_table(results)
    assert f"FLAGGED: m: ONNX and PyTorch NoC differ on {n}/{n} samples" in table
    assert "| m/onnx | 2.00 | 2.00 | 2.00 |" in table


# --------------------------------------------------------------------------- data


def test_fraction_filter_and_limit_on_real_data(data_dir):
    ocdc = data_dir / "patches" / "ocdc"
    fractions = [
        float((cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) > 127).mean())
        for p in sorted((ocdc / "masks").iterdir())
    ]
    expected = sum(0.2 <= f <= 0.8 for f in fractions)
    assert 0 < expected < len(fractions)  # the filter does something here
    sel = select_samples([ocdc], (0.2, 0.8))
    assert (sel.n_total, sel.n_kept, len(sel.samples)) == (len(fractions), expected, expected)
    assert all(0.2 <= s.foreground_fraction <= 0.8 for s in sel.samples)
    both = select_samples([ocdc, data_dir / "patches" / "glas"], (0.2, 0.8), limit=2)
    assert [s.dataset for s in both.samples] == ["ocdc", "ocdc", "glas", "glas"]
    img = both.samples[0].image()
    assert img.dtype == np.uint8 and img.shape[:2] == both.samples[0].mask.shape


def test_bad_data_is_a_clear_error(tmp_path):
    with pytest.raises(NotFoundError):
        load_samples(tmp_path / "missing")
    with pytest.raises(InvalidInputError):
        load_samples(tmp_path)  # no images/ and masks/
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(InvalidInputError):
        load_samples(tmp_path)  # image without a mask
    cv2.imwrite(str(tmp_path / "masks" / "a.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(InvalidInputError, match="no sample left"):
        select_samples([tmp_path])  # the only mask is empty
    cv2.imwrite(str(tmp_path / "masks" / "a.png"), np.full((8, 9), 255, np.uint8))
    (sample,) = select_samples([tmp_path]).samples
    with pytest.raises(InvalidInputError, match="mask"):
        sample.image()  # 8x8 image, 9x8 mask
    with pytest.raises(InvalidInputError):
        select_samples([tmp_path], (0.8, 0.2))


# --------------------------------------------------------------------------- CLI


def test_cli_end_to_end_with_a_baseline_on_real_patches(data_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main([
        "evaluate", "--backend", "grabcut", "--data", str(data_dir / "patches" / "ocdc"),
        "--fraction", "0.2", "0.8", "--limit", "2", "--max-clicks", "3", "--out", str(out),
        "--no-progress",
    ])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    run = results["runs"]["grabcut"]
    assert set(run["noc"]) == {"80", "85", "90"}
    assert set(run["nof"]) == {"85", "90"} and set(run["nof"]["90"]) == {"count", "fraction"}
    assert set(run["spc"]) == {"amortised", "decoder"} and run["spc"]["amortised"] > 0
    assert set(run["miou_per_click"]) == {"1", "2", "3"}
    assert set(run["obedience"]) == {"positive", "negative"}
    made = sum(len(s["ious"]) - 1 for s in run["samples"])
    assert run["setbacks"]["clicks"] == made and 0 <= run["setbacks"]["count"] <= made
    assert run["n"] == 2 and run["n_total"] == 10 and 2 <= run["n_kept"] < 10
    assert run["encoder_ms"] >= 0
    for s in run["samples"]:
        assert 1 <= len(s["clicks"]) <= 3 and len(s["ious"]) == len(s["clicks"])
        assert all(0.0 <= v <= 1.0 for v in s["ious"])
    table = (out / "table.md").read_text()
    assert "| grabcut |" in table and "NoC@90" in table
    assert f"- grabcut: {run['setbacks']['count']} of {made} clicks" in table
    assert "| mIoU@1 | mIoU@3 |" in table  # the last click gets a column even off the 1/5/10/20 grid
    assert (out / "miou_per_click.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["miou_per_click.png", "results.json", "table.md"]
    assert "| grabcut |" in capsys.readouterr().out


def test_cli_bad_input_is_one_line_and_an_exit_code(tmp_path, capsys):
    assert main(["evaluate", "--backend", "grabcut", "--data", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "o")]) == 3
    # No --model: the default model, as the help says; the data is what is wrong here.
    assert main(["evaluate", "--backend", "onnx", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "needs images/ and masks/" in err[1] and "--model" not in err[1]
    assert build_parser().parse_args(["evaluate", "--data", "d", "--out", "o"]).model == "default"


@pytest.mark.slow
def test_cli_both_backends_agree_on_a_tiny_bundle(tiny_bundle, data_dir, tmp_path):
    out = tmp_path / "both"
    rc = main([
        "evaluate", "--model", str(tiny_bundle), "--backend", "both",
        "--data", str(data_dir / "patches" / "ocdc"), "--limit", "2", "--max-clicks", "3",
        "--propagation", "all", "--out", str(out), "--no-progress",
    ])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    label = tiny_bundle.name
    suffixes = ("", "+propagation", "+auto-propagation")
    assert set(results["runs"]) == {f"{label}/{b}{s}" for b in ("torch", "onnx") for s in suffixes}
    assert results["config"]["propagation_settings"]["gamma"] > 0
    assert results["config"]["propagation"] == ["off", "on", "auto"]
    for key in (label + s for s in suffixes):
        p = results["parity"][key]
        assert p["flagged"] is False and p["n_noc_different"] == 0
        assert p["identical_click_sequences"] == 2
        assert p["max_low_res_logit_difference"] < 1e-2
    assert "ONNX / PyTorch parity" in (out / "table.md").read_text()


def test_propagation_words_expand_to_modes_in_a_fixed_order():
    from histosam.backend.cli.commands.evaluate import propagation_modes

    assert propagation_modes(["off"]) == ["off"]
    assert propagation_modes(["both"]) == ["off", "on"]
    assert propagation_modes(["auto", "both", "on"]) == ["off", "on", "auto"]
    assert propagation_modes(["all"]) == ["off", "on", "auto"]


def test_write_report_leaves_no_temporary_files(tmp_path):
    samples = synthetic_samples(2)
    config = EvalConfig(3)
    run = summarise_run(evaluate_predictor(perfect(samples), samples, config, progress=False), config)
    results = {
        "config": {"data": ["s"], "fraction": [0.2, 0.8], "max_clicks": 3, "target_iou": 0.9, "full_curve": False},
        "n": 2, "n_kept": 2, "n_total": 2, "runs": {"perfect": run}, "parity": {},
    }
    write_report(tmp_path, results)
    write_report(tmp_path, results)  # overwriting works too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["miou_per_click.png", "results.json", "table.md"]


def test_cli_refuses_what_it_could_only_fail_on_after_the_run(data_dir, tmp_path, capsys):
    """Bad --out, --target-iou and settings files are refused before any sample is evaluated."""
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("band: [1, 2\nbeta: 3\n")
    base = ["evaluate", "--backend", "grabcut", "--data", str(data_dir / "patches" / "ocdc"), "--limit", "1",
            "--max-clicks", "1", "--no-progress"]
    cases = [
        (["--out", str(not_a_folder)], "not a folder"),
        (["--out", str(not_a_folder / "sub")], "cannot be created"),
        (["--out", str(tmp_path / "o"), "--target-iou", "0.5"], "--target-iou"),
        (["--out", str(tmp_path / "o"), "--edge-snap", "off", "--edge-snap-config", str(tmp_path / "typo.yaml")],
         "typo.yaml"),
        (["--out", str(tmp_path / "o"), "--edge-snap-config", str(bad_yaml)], "line 2, column 5"),
        (["--out", str(tmp_path / "o"), "--propagation-config", str(bad_yaml)], "not valid YAML"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()
