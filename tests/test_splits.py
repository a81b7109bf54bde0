"""Training / validation splits of the shared patch sets, by source image (backend/evaluation/splits.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from histosam.backend.core.errors import InvalidInputError
from histosam.backend.evaluation.loop import select_samples
from histosam.backend.evaluation.splits import load_splits, select_part
from histosam.backend.wsi.patches import load_patch_dataset


def test_no_source_image_is_on_both_sides(data_dir):
    """Every patch of a split set is on exactly one side, and a source image never on both."""
    splits = load_splits()
    assert {"bcss", "ocdc"} <= set(splits)
    for name, split in splits.items():
        stems = [r.stem for r in load_patch_dataset(data_dir / "patches" / name)]
        train, val = select_part(name, stems, "train", splits), select_part(name, stems, "validation", splits)
        assert train and val, name
        assert sorted(train + val) == sorted(stems)
        sources = {side: {split.source_of(s) for s in part} for side, part in (("train", train), ("val", val))}
        assert not sources["train"] & sources["val"], name
        assert sources["val"] == set(split.validation), f"{name}: a validation source matches no patch"
    bcss = splits["bcss"]
    assert bcss.source_of("bcss_1019_x512_y0") == "bcss_1019" and bcss.source_of("bcss512_5068") == "bcss512"


def test_training_never_sees_a_validation_patch_and_evaluate_sees_only_them(data_dir):
    pytest.importorskip("torch")
    from histosam.training.config import TrainConfig
    from histosam.training.data import split_records

    folders = [str(data_dir / "patches" / n) for n in ("bcss", "ocdc")]
    cfg = TrainConfig(train_data=folders, holdout=1, val_data=[])
    train, held = split_records(cfg)
    used = {(name, r.stem) for name, r in train + held}
    validation = select_samples(folders, part="validation")
    assert validation.samples and all((s.dataset, s.name) not in used for s in validation.samples)
    everything = select_samples(folders)
    assert len(used) + len(validation.samples) == len(everything.samples)
    assert all(s.name.startswith(("bcss_1019", "bcss512", "1009009_r31c1", "1009009_r35c4"))
               for s in validation.samples)
    # A folder the splits do not name (glas) is wholly on both sides.
    glas = str(data_dir / "patches" / "glas")
    assert len(select_samples([glas], part="validation").samples) == len(select_samples([glas]).samples)


def test_bad_splits_files_are_one_line(tmp_path: Path):
    bad = tmp_path / "s.yaml"
    bad.write_text("bcss: {source: '(', validation: [a]}\n")
    with pytest.raises(InvalidInputError, match="not a regex"):
        load_splits(bad)
    bad.write_text("bcss: {validation: a}\n")
    with pytest.raises(InvalidInputError, match="must be a list"):
        load_splits(bad)
    bad.write_text("bcss: {source: x, valdation: [a]}\n")
    with pytest.raises(InvalidInputError, match="exactly 'source'"):
        load_splits(bad)
    with pytest.raises(InvalidInputError, match="split must be one of"):
        select_part("bcss", ["a"], "test", {})


def test_repeat_and_max_patches_balance_the_training_folders(data_dir):
    pytest.importorskip("torch")
    from histosam.training.config import TrainConfig, config_from_dict
    from histosam.training.data import split_records

    folders = [str(data_dir / "patches" / n) for n in ("bcss", "ocdc")]
    cfg = TrainConfig(train_data=folders, holdout=0, val_data=[], max_patches={"bcss": 5})
    train, _ = split_records(cfg)
    bcss = [r.stem for name, r in train if name == "bcss"]
    assert len(bcss) == 5 and len({r for r in bcss}) == 5
    assert bcss == [r.stem for name, r in split_records(cfg)[0] if name == "bcss"]  # seeded
    for key in ("repeat", "max_patches"):
        with pytest.raises(InvalidInputError, match=f"{key}.ocdc must be a whole number"):
            config_from_dict({key: {"ocdc": 0}, "train_data": folders})
