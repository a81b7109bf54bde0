"""Two gloo ranks training the tiny model end with identical weights (DDP really syncs)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from training_helpers import tiny_config, write_blob_dataset  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, data: str, out: str, cache: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    import torch

    from histosam.training.models.registry import build_model
    from histosam.training.trainer import Trainer

    cfg = tiny_config(Path(data), epochs=1, max_steps_per_epoch=3, batch_size=1, lr=1e-3,
                      train_prompt_encoder=True, max_extra_clicks=2)
    trainer = Trainer(cfg, Path(out), progress=False, model=build_model("tiny_sam"), cache_dir=Path(cache))
    try:
        trainer.run()
        torch.save(trainer._trainable_state(), Path(out) / f"rank{rank}.pt")
    finally:
        trainer.close()


@pytest.mark.slow
def test_two_gloo_ranks_end_with_identical_weights(tmp_path):
    import torch.multiprocessing as mp

    data = write_blob_dataset(tmp_path / "data", n=6)
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_rank_main, args=(2, _free_port(), str(data), str(out), str(tmp_path / "cache")), nprocs=2, join=True)
    a = torch.load(out / "rank0.pt", weights_only=True)
    b = torch.load(out / "rank1.pt", weights_only=True)
    from histosam.training.models.registry import build_model

    start = build_model("tiny_sam").state_dict()
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], start[k]) for k in a), "training changed nothing"
    assert (out / "best.safetensors").is_file() and (out / "checkpoint.pt").is_file()
