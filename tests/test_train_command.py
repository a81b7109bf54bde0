"""`histosam train`: a shipped recipe pointed at a user's own folders from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("torch")

from training_helpers import write_blob_dataset  # noqa: E402


def _recipe(tmp_path, **overrides):
    raw = {
        "name": "tiny", "base_model": "tiny_sam", "train_data": [str(tmp_path / "not_here")], "holdout": 0,
        "val_data": [], "epochs": 1, "batch_size": 2, "aug_variants": 1, "num_threads": 1,
        "max_extra_clicks": 1, "val_max_clicks": 2, "val_fraction": None, "cache_dir": str(tmp_path / "cache"),
    }
    raw.update(overrides)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_train_data_and_val_data_replace_the_recipes_folders(tmp_path, capsys):
    from safetensors import safe_open

    from histosam.backend.cli import main

    mine = write_blob_dataset(tmp_path / "mine", n=4)
    held = write_blob_dataset(tmp_path / "held_out", n=2, seed=1)
    out = tmp_path / "run"
    rc = main(["train", "--config", str(_recipe(tmp_path)), "--train-data", str(mine), "--val-data", str(held),
               "--out", str(out), "--no-progress"])
    assert rc == 0
    with safe_open(str(out / "last.safetensors"), "pt") as f:
        meta = f.metadata()
    cfg = json.loads(meta["train_config"])
    assert cfg["train_data"] == [str(mine)] and cfg["val_data"] == [str(held)]
    # The validation folder given on the command line was evaluated (and never trained on).
    assert "held_out_noc85" in json.loads(meta["metrics"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["out"] == str(out)


def test_a_missing_training_folder_is_one_line_and_a_nonzero_exit(tmp_path, capsys):
    from histosam.backend.cli import main

    rc = main(["train", "--config", str(_recipe(tmp_path)), "--train-data", str(tmp_path / "typo"),
               "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "typo" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "last.safetensors").exists()


def test_own_tissue_recipe_trains_on_the_shipped_default_and_exports(tmp_path, monkeypatch):
    """The README's fine-tune workflow with the real LiteMedSAM and the shipped weights, one step."""
    from histosam.backend.bundles.onnx_predictor import OnnxPredictor
    from histosam.backend.cli import main

    monkeypatch.setenv("HISTOSAM_HOME", str(tmp_path / "home"))  # embedding cache
    recipe = Path(__file__).resolve().parents[1] / "training" / "configs" / "own_tissue.yaml"
    mine = write_blob_dataset(tmp_path / "mine", n=4, size=128)
    out = tmp_path / "run"
    assert main(["train", "--config", str(recipe), "--train-data", str(mine), "--epochs", "1",
                 "--out", str(out), "--no-progress"]) == 0
    bundle = tmp_path / "bundle"
    assert main(["export", "--model", "lite_medsam", "--decoder-weights", str(out / "best.safetensors"),
                 "--out", str(bundle)]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["parity"]["passed"]
    predictor = OnnxPredictor.from_bundle(bundle)
    predictor.set_image(np.full((128, 128, 3), 200, np.uint8))
    assert predictor.predict(points=np.array([[64.0, 64.0]]), labels=np.array([1])).mask.shape == (128, 128)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_resume_continues_exactly_and_refuses_another_recipe(tmp_path, capsys):
    from histosam.backend.cli import main

    data = write_blob_dataset(tmp_path / "mine", n=4)
    recipe = _recipe(tmp_path, train_data=[str(data)], epochs=2, lr=1e-3, max_extra_clicks=2, train_prompt_encoder=True)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", "--config", str(recipe), "--out", str(straight), "--no-progress"]) == 0
    assert main(["train", "--config", str(recipe), "--out", str(resumed), "--epochs", "1", "--no-progress"]) == 0
    assert main(["train", "--config", str(recipe), "--out", str(resumed), "--resume", "--no-progress"]) == 0
    a, b = _weights(straight / "last.safetensors"), _weights(resumed / "last.safetensors")
    assert a.keys() == b.keys()
    # The same clicks, rounds and augmentation variants in epoch 2 whether or not the run stopped after epoch 1.
    assert all(torch_equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    other = _recipe(tmp_path, train_data=[str(data)], epochs=3, lr=5e-4, max_extra_clicks=2, train_prompt_encoder=False)
    before = (resumed / "checkpoint.pt").read_bytes()
    assert main(["train", "--config", str(other), "--out", str(resumed), "--resume", "--no-progress"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another recipe" in err[0] and "lr: 0.001 -> 0.0005" in err[0]
    assert "train_prompt_encoder: True -> False" in err[0] and "init_weights" in err[0]
    assert (resumed / "checkpoint.pt").read_bytes() == before
    # More epochs is what --resume is for.
    more = _recipe(tmp_path, train_data=[str(data)], epochs=3, lr=1e-3, max_extra_clicks=2, train_prompt_encoder=True)
    assert main(["train", "--config", str(more), "--out", str(resumed), "--resume", "--no-progress"]) == 0


def torch_equal(x, y) -> bool:
    import torch

    return bool(torch.equal(x, y))


def test_bad_runs_fail_before_anything_is_written(tmp_path, capsys):
    from histosam.backend.cli import main

    data = write_blob_dataset(tmp_path / "mine", n=4)
    skewed = write_blob_dataset(tmp_path / "skewed", n=2, seed=3)
    import cv2

    cv2.imwrite(str(skewed / "masks" / "p00.png"), np.full((40, 50), 255, np.uint8))
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    out = tmp_path / "run"
    cases = [
        (["--val-data", str(skewed)], "image is 96x96 but its mask is 50x40"),
        (["--val-data", str(data / "images" / "p00.png")], "is a file, not a folder"),
        (["--train-data", str(tmp_path / "empty")], "no patches in"),
        (["--resume"], "no checkpoint"),
    ]
    for extra, message in cases:
        args = ["train", "--config", str(_recipe(tmp_path)), "--out", str(out), "--no-progress"]
        if "--train-data" not in extra:
            args += ["--train-data", str(data)]
        assert main([*args, *extra]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not out.exists()


def test_relative_config_works_from_any_folder(tmp_path, monkeypatch):
    from histosam.training.config import load_config

    monkeypatch.chdir(tmp_path)
    assert load_config("training/configs/md.yaml").name == "md"


def test_resume_on_other_validation_patches_restarts_the_best_checkpoint(tmp_path):
    """Scores on other validation patches do not compare with the old best: selection starts afresh."""
    import dataclasses

    from histosam.backend.cli import main
    from histosam.training.config import load_config
    from histosam.training.trainer import Trainer

    data = write_blob_dataset(tmp_path / "mine", n=3)
    first, second = write_blob_dataset(tmp_path / "val_a", n=2, seed=5), write_blob_dataset(tmp_path / "val_b", n=2, seed=6)
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, train_data=[str(data)], epochs=2, val_max_clicks=2)
    assert main(["train", "--config", str(recipe), "--val-data", str(first), "--epochs", "1", "--out", str(out),
                 "--no-progress"]) == 0
    cfg = load_config(recipe)
    same = Trainer(dataclasses.replace(cfg, val_data=[str(first)]), out, resume=True, progress=False)
    other = Trainer(dataclasses.replace(cfg, val_data=[str(second)]), out, resume=True, progress=False)
    assert same.best is not None and other.best is None and other.best_miou is None
