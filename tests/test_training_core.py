"""Training building blocks: the loss, the click simulator, augmentation, config, one step."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from training_helpers import tiny_config, write_blob_dataset  # noqa: E402

from histosam.backend.core.errors import InvalidInputError, NotFoundError  # noqa: E402
from histosam.training.augment import apply_aug, identity, sample_aug  # noqa: E402
from histosam.training.click_simulation import ClickState, prompt_batch  # noqa: E402
from histosam.training.config import config_from_dict, load_config  # noqa: E402
from histosam.training.losses import click_consistency_loss, normalized_focal_loss  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"


def test_nfl_matches_hand_computation():
    # Two pixels: p = 0.5 (target 1), p = 0.75 (target 0); alpha 0.5, gamma 2.
    logits = torch.tensor([0.0, math.log(3.0)]).reshape(1, 1, 1, 2)
    target = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    pt = [0.5, 0.25]
    beta = [(1 - p) ** 2 for p in pt]
    scale = 2 / sum(beta)  # focal weights rescaled to sum to the number of pixels
    expected = sum(-0.5 * b * scale * math.log(p) for b, p in zip(beta, pt, strict=True)) / 2
    got = float(normalized_focal_loss(logits, target, alpha=0.5, gamma=2.0))
    assert got == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.586512, rel=1e-4)


def test_nfl_weight_excludes_pixels_and_scale_is_detached():
    logits = torch.tensor([0.3, -1.0, 2.0, 0.0]).reshape(1, 1, 2, 2).requires_grad_(True)
    target = torch.tensor([1.0, 0.0, 0.0, 1.0]).reshape(1, 1, 2, 2)
    weight = torch.tensor([1.0, 1.0, 1.0, 0.0]).reshape(1, 1, 2, 2)
    full = normalized_focal_loss(logits, target, weight)
    first3 = normalized_focal_loss(logits.reshape(1, 1, 1, 4)[..., :3], target.reshape(1, 1, 1, 4)[..., :3])
    assert float(full.detach()) == pytest.approx(float(first3.detach()), rel=1e-6)
    full.backward()
    assert logits.grad[0, 0, 1, 1] == 0  # the excluded pixel gets no gradient
    # With the scale detached, the gradient is that of the plain focal term times the scale.
    x = logits.detach().reshape(-1)[:3].clone().requires_grad_(True)
    t = target.reshape(-1)[:3]
    p = torch.sigmoid(x)
    pt = torch.where(t > 0.5, p, 1 - p)
    beta = (1 - pt) ** 2
    s = (3 / beta.sum()).detach()
    (-(0.5 * beta * s * torch.log(pt)).sum() / 3).backward()
    assert torch.allclose(logits.grad.reshape(-1)[:3], x.grad, atol=1e-6)


def test_click_consistency_loss_matches_hand_computation():
    # Image 0: a positive disk pixel with logit 0 and a negative one with logit log 3 (p = 0.75);
    # the unclicked pixel (logit 5) is ignored. Image 1 has no clicks and contributes zero.
    logits = torch.tensor([[0.0, math.log(3.0), 5.0], [1.0, 2.0, 3.0]]).reshape(2, 1, 1, 3)
    clicks = torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 0.0]]).reshape(2, 1, 1, 3)
    expected = ((-math.log(0.5) - math.log(0.25)) / 2 + 0.0) / 2
    assert float(click_consistency_loss(logits, clicks)) == pytest.approx(expected, rel=1e-6)
    logits.requires_grad_(True)
    click_consistency_loss(logits, clicks).backward()
    assert logits.grad[0, 0, 0, 2] == 0 and float(logits.grad[1].abs().sum()) == 0
    assert logits.grad[0, 0, 0, 0] < 0 < logits.grad[0, 0, 0, 1]  # raise the positive, lower the negative


def test_click_loss_target_is_signed_disks_in_the_low_res_grid(tiny_model):
    # The loss target is the model's own click raster (low-res (y, x) -> input frame as prompt_batch does).
    state = ClickState(np.zeros((256, 256), bool), np.ones((256, 256), bool))
    state.clicks = [(10, 10, True), (14, 30, False), (0, 255, True)]
    size = tiny_model.spec.input_size
    coords, labels = (torch.from_numpy(a) for a in prompt_batch([state], size))
    pos, neg = tiny_model.disk_maps(coords, labels, 2.0 * size / 256)
    m = (pos - neg)[0, 0].numpy()
    assert m.shape == (256, 256)
    # The raster tests pixel centres (i + 0.5) against the click coordinate: rows 8..11 for y=10.
    assert m[8, 10] == 1 and m[11, 10] == 1 and m[12, 30] == -1 and m[15, 30] == -1
    assert m[0, 255] == 1 and m[1, 255] == 1 and m[2, 255] == 0  # clipped at the border
    assert m[12, 10] == 0 and m[16, 30] == 0 and m[14, 32] == 0  # radius 2
    assert int((m != 0).sum()) == int((np.abs(m) == 1).sum())
    assert (m[100:, :200] == 0).all()


@pytest.mark.parametrize("ritm", [False, True])
def test_correction_clicks_always_lie_in_the_error_region(ritm):
    rng = np.random.default_rng(1)
    for _ in range(25):
        gt = np.zeros((256, 256), bool)
        y, x = rng.integers(20, 200, 2)
        gt[y:y + rng.integers(10, 50), x:x + rng.integers(10, 50)] = True
        pred = np.zeros_like(gt)
        y, x = rng.integers(0, 220, 2)
        pred[y:y + rng.integers(5, 60), x:x + rng.integers(5, 60)] = True
        state = ClickState(gt, np.ones_like(gt))
        assert state.add_first(rng)
        cy, cx, pos = state.clicks[0]
        assert pos and gt[cy, cx]
        click = state.add_correction(pred, rng, ritm=ritm)
        assert click is not None
        cy, cx, pos = click
        if pos:
            assert gt[cy, cx] and not pred[cy, cx]
        else:
            assert pred[cy, cx] and not gt[cy, cx]


def test_prompt_batch_pads_and_scales():
    gt = np.zeros((256, 256), bool)
    gt[10:20, 10:20] = True
    a, b = ClickState(gt, np.ones_like(gt)), ClickState(gt, np.ones_like(gt))
    a.clicks = [(15, 12, True), (3, 4, False)]
    b.clicks = [(11, 11, True)]
    coords, labels = prompt_batch([a, b], 1024)
    assert coords.shape == (2, 3, 2)
    assert labels.tolist() == [[1, 0, -1], [1, -1, -1]]
    assert coords[0, 0].tolist() == pytest.approx([(12 + 0.5) * 4 - 0.5, (15 + 0.5) * 4 - 0.5])


def test_augmentation_is_deterministic_and_keeps_image_and_mask_aligned():
    rng = np.random.default_rng(0)
    mask = np.zeros((100, 80), bool)
    mask[30:70, 20:50] = True
    image = np.zeros((100, 80, 3), np.uint8)
    image[mask] = 200
    p1 = sample_aug(mask, np.random.default_rng(5), colour_jitter=0.0)
    p2 = sample_aug(mask, np.random.default_rng(5), colour_jitter=0.0)
    assert p1 == p2 and p1.signature() == p2.signature()
    for _ in range(10):
        p = sample_aug(mask, rng, colour_jitter=0.0)
        img, msk = apply_aug(image, mask, p)
        assert img.shape[:2] == msk.shape
        assert np.array_equal(img[..., 0] == 200, msk)
    img, msk = apply_aug(image, mask, identity(mask.shape))
    assert np.array_equal(img, image) and np.array_equal(msk, mask)


def test_shipped_configs_load():
    names = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert {"md", "ie_md", "whole", "refine", "refine_lite", "refine_hq"} <= names
    recipes = {"own_tissue"}  # data folders come from `histosam train --train-data`
    assert recipes <= names
    for name in names - recipes:
        cfg = load_config(CONFIGS / f"{name}.yaml")
        assert cfg.name == name
    for name in recipes:
        with pytest.raises(InvalidInputError, match="--train-data"):
            load_config(CONFIGS / f"{name}.yaml")
        cfg = load_config(CONFIGS / f"{name}.yaml", validate=False)
        assert cfg.name == name and cfg.init_weights  # grows on the shipped default


def test_bad_configs_are_clear_errors(tmp_path):
    with pytest.raises(InvalidInputError, match="unknown config key"):
        config_from_dict({"learning_rate": 1})
    with pytest.raises(InvalidInputError, match="lr"):
        config_from_dict({"lr": -1})
    bad = tmp_path / "bad.yaml"
    bad.write_text("[1, 2")
    with pytest.raises(InvalidInputError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(NotFoundError):
        load_config(tmp_path / "missing.yaml")


def test_one_training_step_lowers_the_loss_on_a_fixed_batch(tmp_path, tiny_model):

    data = write_blob_dataset(tmp_path / "data", n=4)
    cfg = tiny_config(data, aug_variants=1, max_extra_clicks=0, lr=1e-3, train_prompt_encoder=True)
    _three_steps_lower_the_loss(cfg, tmp_path, tiny_model)


def test_a_step_with_the_click_loss_lowers_the_loss(tmp_path, tiny_model):
    # No correction rounds: later clicks depend on the predictions, so the batch would change.
    data = write_blob_dataset(tmp_path / "data", n=4)
    cfg = tiny_config(data, aug_variants=1, max_extra_clicks=0, lr=3e-4, train_prompt_encoder=True,
                      loss_every_round=True, click_loss_weight=1.0, click_loss_radius=3.0, click_disk_radius=8.0)
    _three_steps_lower_the_loss(cfg, tmp_path, tiny_model)


def _three_steps_lower_the_loss(cfg, tmp_path, tiny_model):
    import copy

    from histosam.training.trainer import Trainer

    trainer = Trainer(cfg, tmp_path / "out", progress=False, model=copy.deepcopy(tiny_model),
                      cache_dir=tmp_path / "cache")
    from histosam.training.trainer import set_train_mode

    set_train_mode(trainer.model, cfg)
    losses = []
    for _ in range(3):
        trainer.rng = np.random.default_rng(0)  # same variants and clicks: a fixed batch
        losses.append(trainer.train_batch([0, 1, 2]))
    assert losses[1] < losses[0] and losses[2] < losses[1]


def test_init_weights_starts_training_from_a_fine_tune(tmp_path, tiny_model):
    import copy

    from histosam.training.models.decoder_weights import save_decoder_weights
    from histosam.training.trainer import build_training_model

    tuned = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in tuned.mask_decoder.parameters():
            p.add_(0.5)
    tuned.click_disk_radius = 4.0
    path = save_decoder_weights(tuned, tmp_path / "tuned.safetensors")
    data = write_blob_dataset(tmp_path / "data", n=2)
    cfg = tiny_config(data, init_weights=str(path), click_disk_radius=6.0,
                      decoder={"variant": "refine_hq", "stem_256": 4, "stem_128": 8, "width": 8})
    model = build_training_model(cfg, copy.deepcopy(tiny_model))
    grown, tuned_state = model.mask_decoder.state_dict(), tuned.mask_decoder.state_dict()
    shared = [k for k in tuned_state if k in grown]  # refine_hq reuses the stock modules by name
    assert any(k.startswith("transformer.") for k in shared) and "iou_token.weight" in shared
    for k in shared:
        assert torch.equal(grown[k], tuned_state[k]), k
    assert model.click_disk_radius == 6.0  # the config wins over the file's metadata
    with pytest.raises(NotFoundError):
        build_training_model(tiny_config(data, init_weights=str(tmp_path / "missing.safetensors")),
                             copy.deepcopy(tiny_model))


def test_best_checkpoint_rule_breaks_noc_ties_by_the_last_miou():
    from types import SimpleNamespace

    from histosam.training.trainer import Trainer

    first = SimpleNamespace(best=None, best_miou=None)
    assert Trainer._improves(first, 8.0, 0.3)
    held = SimpleNamespace(best=8.0, best_miou=0.40)  # every sample at the click limit
    assert Trainer._improves(held, 8.0, 0.45)  # same NoC, better masks at the last click
    assert not Trainer._improves(held, 8.0, 0.40) and not Trainer._improves(held, 8.0, 0.35)
    assert Trainer._improves(held, 7.5, 0.10)  # fewer clicks wins whatever the mIoU
    assert not Trainer._improves(held, 8.5, 0.99)
    assert not Trainer._improves(held, 8.0, None)


def test_validation_rows_keep_the_miou_at_the_last_validated_click():
    from histosam.training.trainer import summarise_eval

    agg = {"noc": {"85": 8.0, "90": 8.0}, "miou_per_click": {"1": 0.2, "5": 0.3, "8": 0.45},
           "obedience": {"positive": 1.0, "negative": 0.5}, "refinement": {"error_closed": None}}
    row = summarise_eval(agg)
    assert row["miou_last"] == 0.45 and row["miou10"] is None


def test_config_values_are_typed_or_one_clear_error():
    cfg = config_from_dict({"lr": "1e-4", "epochs": 3.0, "val_fraction": [0.2, 0.8]})  # YAML 1.1 reads 1e-4 as text
    assert cfg.lr == 1e-4 and cfg.epochs == 3 and isinstance(cfg.epochs, int) and cfg.val_fraction == (0.2, 0.8)
    for raw, message in [({"epochs": 1.5}, "whole number"), ({"val_every": 0}, "val_every must be at least 1"),
                         ({"lr": "fast"}, "lr must be a number"), ({"train_prompt_encoder": "yes"}, "true or false"),
                         ({"train_data": "a/folder"}, "list of folders"), ({"lr_milestones": ["x"]}, "list of numbers"),
                         ({"holdout": -1}, "holdout must be >= 0"), ({"scale_range": [0.6]}, "two numbers"),
                         ({"lr": "nan"}, "finite"), ({"lr_milestones": [20.7]}, "whole epochs"),
                         ({"decoder": "stock"}, "mapping")]:
        with pytest.raises(InvalidInputError, match=message):
            config_from_dict(raw)
