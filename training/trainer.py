"""The training loop: simulated clicks, Normalized Focal Loss, DDP, validation, checkpoints.

Per batch: a random interior first click (optionally a box), then 0..K correction rounds
without gradients, each clicking on the error of the previous prediction with the previous
low-res logits as the mask prompt, then one forward with gradients on which the loss is taken
(``loss_every_round`` takes it on every round instead). Validation runs the evaluator's own
loop (``histosam.backend.evaluation.loop``: the RITM clicks of ``histosam evaluate``) so the NoC
selecting the best checkpoint is the number users will measure. Ties (on hard tissue every
sample can sit at the click limit, NoC = max) go to the higher mIoU at the last validated
click, so ``best`` is not simply the first epoch validated.

Runs alone or under ``torchrun`` (PyTorch DDP, DistributedSampler; gloo on CPU, nccl on GPU).
Only rank 0 validates and writes; checkpoints are atomic and ``resume`` continues from the
last finished epoch.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from histosam.backend.core.atomic import atomic_write, write_text
from histosam.backend.core.errors import CheckpointError, HistosamError, InvalidInputError
from histosam.backend.evaluation.loop import (
    EvalConfig,
    EvalSample,
    aggregate,
    evaluate_predictor,
    select_samples,
)
from histosam.training.click_simulation import ClickState, box_of, prompt_batch
from histosam.training.config import TrainConfig, resolve_data_path, resolve_repo_path
from histosam.training.data import (
    EncoderFeatureCache,
    Patch,
    Sample,
    atomic_torch_save,
    default_cache_root,
    load_patches,
    make_sample,
    split_records,
)
from histosam.training.losses import click_consistency_loss, normalized_focal_loss
from histosam.training.models.decoder_weights import save_decoder_weights
from histosam.training.models.sam_model import HistoSam
from histosam.training.torch_predictor import TorchPredictor

CHECKPOINT = "checkpoint.pt"
BEST = "best.safetensors"
# What --resume may change: when to stop, the machine's resources, and what is validated.
RESUME_MAY_CHANGE = frozenset({"name", "epochs", "max_minutes", "num_threads", "cache_dir", "val_data",
                               "val_fraction", "val_limit", "val_max_clicks", "val_every"})
LAST = "last.safetensors"
METRICS = "metrics.csv"


def build_training_model(cfg: TrainConfig, model: HistoSam | None = None) -> HistoSam:
    """The base model (or ``model``) with the config's decoder variant and click disks."""
    from histosam.training.models.registry import build_model

    if model is None:
        model = build_model(cfg.base_model, click_disk_radius=cfg.click_disk_radius)
    if cfg.init_weights:
        from histosam.training.models.decoder_weights import apply_decoder_weights

        model = apply_decoder_weights(model, resolve_repo_path(cfg.init_weights))
    model.click_disk_radius = float(cfg.click_disk_radius)
    model.click_disk_mode = cfg.click_disk_mode
    variant = cfg.decoder.get("variant", "stock")
    if variant != "stock":
        from histosam.training.models.decoders import build_decoder

        model = build_decoder(model, cfg.decoder)
    return model


def trainable_prefixes(cfg: TrainConfig) -> tuple[str, ...]:
    parts = []
    if cfg.train_image_encoder:
        parts.append("image_encoder.")
    if cfg.train_prompt_encoder:
        parts.append("prompt_encoder.")
    if cfg.train_decoder:
        parts.append("mask_decoder.")
    return tuple(parts)


def set_trainable(model: HistoSam, cfg: TrainConfig) -> list[nn.Parameter]:
    prefixes = trainable_prefixes(cfg)
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
        if p.requires_grad:
            params.append(p)
    return params


def set_train_mode(model: HistoSam, cfg: TrainConfig) -> None:
    """Train mode for trained parts only: a frozen encoder's BatchNorms must keep their stats."""
    model.train()
    if not cfg.train_image_encoder:
        model.image_encoder.eval()
    if not cfg.train_prompt_encoder:
        model.prompt_encoder.eval()


class DecodeStep(nn.Module):
    """The differentiable step DDP wraps: features (cached embedding + trainable extras) -> decode."""

    def __init__(self, model: HistoSam, encoder_frozen: bool) -> None:
        super().__init__()
        self.model = model
        self.encoder_frozen = encoder_frozen

    def features(self, image: torch.Tensor, embedding: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if embedding is None or not self.encoder_frozen:
            return self.model.encode(image)
        feats = {"image_embeddings": embedding}
        stem = getattr(self.model.mask_decoder, "stem_features", None)
        if stem is not None:
            feats.update(stem(image))
        return feats

    def forward(self, image, embedding, coords, labels, mask_input, has_mask):
        feats = self.features(image, embedding)
        return self.model.decode(feats, coords, labels, mask_input, has_mask)


class CachedTorchPredictor(TorchPredictor):
    """TorchPredictor whose frozen image-encoder output comes from the embedding cache.

    Validation re-encodes the same images every epoch; with a frozen encoder that is wasted
    time. Decoding (and any trainable encoder-side stem) is the live model's.
    """

    def __init__(self, model: HistoSam, cache: EncoderFeatureCache, model_sha: str) -> None:
        super().__init__(model)
        self.cache = cache
        self.model_sha = model_sha

    @torch.inference_mode()
    def set_image(self, image: np.ndarray) -> None:
        from histosam.backend.core.transforms import validate_rgb

        image = validate_rgb(image)
        start = time.perf_counter()
        x = torch.from_numpy(self.transform.apply_image(image)).to(self.device)
        key = hashlib.sha256(image.tobytes() + f"|{image.shape}|val|{self.model_sha}".encode()).hexdigest()
        emb = self.cache.get(key)
        if emb is None:
            emb = self.cache.put(key, self.model.image_encoder(x))
        feats = {"image_embeddings": emb.float().to(self.device)}
        stem = getattr(self.model.mask_decoder, "stem_features", None)
        if stem is not None:
            feats.update(stem(x))
        self._features = feats
        self._hw = image.shape[:2]
        self.last_encode_seconds = time.perf_counter() - start


def _atomic_text(path: Path, text: str) -> None:
    write_text(path, text)


def summarise_eval(agg: dict[str, Any]) -> dict[str, float | None]:
    """The few numbers a metrics row keeps from an evaluator summary."""
    m = agg["miou_per_click"]
    return {
        "noc85": agg["noc"]["85"], "noc90": agg["noc"]["90"],
        "miou1": m.get("1"), "miou5": m.get("5"), "miou10": m.get("10"),
        "miou_last": m[max(m, key=int)] if m else None,  # the checkpoint tie-break
        "obey_pos": agg["obedience"]["positive"], "obey_neg": agg["obedience"]["negative"],
        # Refinement that does not punish a good first click (None when validation stops before 10 clicks).
        "error_closed": agg["refinement"]["error_closed"],
    }


class Trainer:
    """One training run (see the module docstring). ``model`` overrides the registry build (tests)."""

    def __init__(self, cfg: TrainConfig, out: Path, resume: bool = False, progress: bool = True,
                 model: HistoSam | None = None, cache_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.out = Path(out)
        self.resume = resume
        if resume and not (self.out / CHECKPOINT).is_file():
            raise CheckpointError(f"--resume: no checkpoint at {self.out / CHECKPOINT}")
        self.progress = progress
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.distributed = self.world > 1
        # num_threads is the run's CPU budget: under torchrun the ranks on one machine share it
        # (2 ranks x 2 threads on 2 cores ran 4-6x slower per epoch than one process).
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
        torch.set_num_threads(max(1, cfg.num_threads // max(1, local_world)))
        if self.distributed and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend=backend)
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            self.device = torch.device(f"cuda:{local}")
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        torch.manual_seed(cfg.seed)
        self.model = build_training_model(cfg, model).to(self.device)
        self.params = set_trainable(self.model, cfg)
        from histosam.training.models.registry import source_sha256

        base_sha = source_sha256(self.model.spec.name, None) if model is None else None
        if base_sha is None:  # a seeded or caller-given model: hash its encoder weights
            h = hashlib.sha256()
            for k, v in sorted(self.model.image_encoder.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().numpy().tobytes())
            base_sha = h.hexdigest()
        self.model_sha = base_sha
        self.cache = EncoderFeatureCache(Path(cache_dir or cfg.cache_dir or default_cache_root()))
        train_recs, held_recs = split_records(cfg)
        self.patches: list[Patch] = load_patches(train_recs, cfg)
        if not self.patches:
            raise InvalidInputError("no training patch has foreground")
        self.holdout = [EvalSample(name=r.stem, dataset="internal", mask_path=Path(r.mask_path),
                                   image_path=Path(r.image_path)) for _, r in held_recs]
        self.val_sets: dict[str, list[EvalSample]] = {}
        if self.holdout:
            self.val_sets["internal"] = self.holdout
        for folder in cfg.val_data:
            path = resolve_data_path(folder)
            sel = select_samples([path], cfg.val_fraction, cfg.val_limit, part="validation")
            self.val_sets[path.resolve().name] = sel.samples
        for samples in self.val_sets.values():  # now, not after an epoch of training
            for sample in samples:
                sample.pair()
        self.step_module = DecodeStep(self.model, cfg.encoder_frozen)
        if self.distributed:
            self.ddp: nn.Module = DistributedDataParallel(self.step_module, find_unused_parameters=True)
        else:
            self.ddp = self.step_module
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=list(cfg.lr_milestones), gamma=cfg.lr_gamma)
        self.start_epoch = 0
        self.best: float | None = None  # validation NoC@85 of best.safetensors
        self.best_miou: float | None = None  # its mIoU at the last validated click (tie-break)
        self.history: list[dict[str, Any]] = []
        self.rng = np.random.default_rng([cfg.seed, self.rank])  # reseeded per epoch in run()
        if resume:
            self._load_checkpoint()
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)

    # -- checkpoints --------------------------------------------------------------------------
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        prefixes = trainable_prefixes(self.cfg)
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items() if k.startswith(prefixes)}

    def _load_checkpoint(self) -> None:
        path = self.out / CHECKPOINT
        if not path.is_file():
            raise CheckpointError(f"--resume: no checkpoint at {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"checkpoint {path} could not be read: {exc}") from None
        if state.get("config", {}).get("decoder") != self.cfg.decoder:
            raise CheckpointError(f"checkpoint {path} was made with another decoder config")
        revalidated = self._check_same_recipe(path, state.get("config", {}))
        self.model.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch = int(state["epoch"]) + 1
        self.best = state.get("best")
        self.best_miou = state.get("best_miou")
        if revalidated:  # scores on other validation patches do not compare: the next validation sets best
            self.best = self.best_miou = None
        self.history = list(state.get("history", []))

    def _check_same_recipe(self, path: Path, saved: dict[str, Any]) -> bool:
        """--resume continues the run it finds; a different recipe (another lr, other trainable
        parts, other losses) would be silently mixed into it, or fail deep in the optimizer.
        True when what is validated changed (then best-checkpoint scores start afresh)."""
        now = json.loads(json.dumps(self.cfg.to_dict()))
        then = json.loads(json.dumps(saved, default=str))
        for cfg in (now, then):  # the same folders spelled differently are the same data
            cfg["train_data"] = [_same_folder(d) for d in cfg.get("train_data", [])]
        changed = sorted(k for k in now.keys() & then.keys() if k not in RESUME_MAY_CHANGE and now[k] != then[k])
        if changed:
            diffs = "; ".join(f"{k}: {then[k]!r} -> {now[k]!r}" for k in changed[:4])
            more = f" (+{len(changed) - 4} more)" if len(changed) > 4 else ""
            raise CheckpointError(
                f"checkpoint {path} was made with another recipe ({diffs}{more}); --resume may change only "
                f"{', '.join(sorted(RESUME_MAY_CHANGE))}. To train on from it with a new recipe, start a new "
                f"run with init_weights: {path.parent / LAST}"
            )
        validated = ("val_data", "val_fraction", "val_limit", "val_max_clicks")
        return any(now.get(k) != then.get(k) for k in validated if k in now and k in then)

    def _save_checkpoint(self, epoch: int) -> None:
        state = {
            "epoch": epoch, "model": self._trainable_state(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "best": self.best, "best_miou": self.best_miou,
            # Plain JSON values (numpy scalars -> float), so resume loads with weights_only=True.
            "history": json.loads(json.dumps(self.history, default=float)),
            "config": self.cfg.to_dict(),
        }
        atomic_torch_save(state, self.out / CHECKPOINT)

    def _metadata(self, epoch: int, row: dict[str, Any]) -> dict[str, str]:
        return {"train_config": json.dumps(self.cfg.to_dict()), "epoch": str(epoch),
                "metrics": json.dumps(row), "base_weights_sha256": self.model_sha}

    # -- data ---------------------------------------------------------------------------------
    def _sample(self, index: int, variant: int) -> tuple[Sample, torch.Tensor | None]:
        s = make_sample(self.patches[index], variant, self.transform, self.model_sha)
        if not self.cfg.encoder_frozen:
            return s, None
        emb = self.cache.get(s.key)
        if emb is None:
            with torch.no_grad():
                emb = self.cache.put(s.key, self.model.image_encoder(s.image[None].to(self.device))[0])
        return s, emb

    @property
    def transform(self):
        from histosam.backend.core.transforms import ImageTransform

        spec = self.model.spec
        return ImageTransform(spec.input_size, spec.mean, spec.std)

    def fill_cache(self) -> None:
        """Every (patch, variant) embedding, split over ranks, then a barrier."""
        if not self.cfg.encoder_frozen:
            return
        from tqdm import tqdm

        jobs = [(i, v) for i in range(len(self.patches)) for v in range(self.cfg.aug_variants)]
        mine = [j for n, j in enumerate(jobs) if n % self.world == self.rank]
        self.model.image_encoder.eval()
        for i, v in tqdm(mine, desc="embedding cache", unit="img", disable=not (self.progress and self.rank == 0)):
            self._sample(i, v)
        if self.distributed:
            dist.barrier()

    # -- one batch ----------------------------------------------------------------------------
    def train_batch(self, indices: list[int]) -> float:
        cfg = self.cfg
        rng = self.rng
        samples, embs = [], []
        for i in indices:
            s, e = self._sample(i, int(rng.integers(cfg.aug_variants)))
            samples.append(s)
            embs.append(e)
        states = [ClickState(s.gt, s.valid) for s in samples]
        for st in states:
            st.add_first(rng)
            if cfg.box_probability and rng.random() < cfg.box_probability:
                st.box = box_of(st.gt, rng)
        dev = self.device
        images = torch.stack([s.image for s in samples]).to(dev)
        emb = torch.stack(embs).float().to(dev) if embs[0] is not None else None
        gt = torch.from_numpy(np.stack([s.gt for s in samples])[:, None].astype(np.float32)).to(dev)
        valid = torch.from_numpy(np.stack([s.valid for s in samples])[:, None].astype(np.float32)).to(dev)
        b = len(samples)
        prev = torch.zeros(b, 1, 256, 256, device=dev)
        has = torch.zeros(b, device=dev)
        n_rounds = int(rng.integers(cfg.max_extra_clicks + 1))
        size = self.model.spec.input_size
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        with torch.no_grad():
            feats = self.step_module.features(images, emb)
        for r in range(n_rounds + 1):
            last = r == n_rounds
            coords, labels = (torch.from_numpy(a).to(dev) for a in prompt_batch(states, size))
            if last or cfg.loss_every_round:
                sync = nullcontext() if (last or not self.distributed) else self.ddp.no_sync()
                with sync:
                    logits, iou = self.ddp(images, emb, coords, labels, prev, has)
                    loss = self._loss(logits, iou, gt, valid)
                    if cfg.click_loss_weight > 0:
                        pos, neg = self.model.disk_maps(coords, labels, cfg.click_loss_radius * size / 256)
                        loss = loss + cfg.click_loss_weight * click_consistency_loss(logits, pos - neg)
                    if cfg.loss_every_round:
                        loss = loss / (n_rounds + 1)
                    loss.backward()
                total += float(loss.detach())
                logits = logits.detach()
            else:
                with torch.no_grad():
                    logits, _ = self.model.decode(feats, coords, labels, prev, has)
            if last:
                break
            prev = logits
            has = torch.ones(b, device=dev)
            if cfg.mask_drop_probability:
                drop = torch.from_numpy(rng.random(b) < cfg.mask_drop_probability).to(dev)
                has = has * (~drop).float()
            pred = (logits[:, 0] > 0).cpu().numpy()
            for st, p in zip(states, pred, strict=True):
                st.add_correction(p, rng, ritm=bool(rng.random() < cfg.ritm_click_probability))
        self.optimizer.step()
        return total

    def _loss(self, logits, iou, gt, valid) -> torch.Tensor:
        cfg = self.cfg
        loss = normalized_focal_loss(logits, gt, valid, cfg.alpha, cfg.gamma)
        stock = getattr(self.model.mask_decoder, "last_stock_logits", None)
        if stock is not None and cfg.aux_stock_loss > 0:
            loss = loss + cfg.aux_stock_loss * normalized_focal_loss(stock, gt, valid, cfg.alpha, cfg.gamma)
            self.model.mask_decoder.last_stock_logits = None
        with torch.no_grad():
            pred = (logits > 0).float() * valid
            inter = (pred * gt).sum(dim=(1, 2, 3))
            union = ((pred + gt) > 0).float().mul(valid).sum(dim=(1, 2, 3)).clamp(min=1)
            true_iou = (inter / union).unsqueeze(1)
        return loss + torch.nn.functional.mse_loss(iou, true_iou)

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> dict[str, Any]:
        self.model.eval()
        predictor: TorchPredictor
        if self.cfg.encoder_frozen:
            predictor = CachedTorchPredictor(self.model, self.cache, self.model_sha)
        else:
            predictor = TorchPredictor(self.model)
        ecfg = EvalConfig(max_clicks=self.cfg.val_max_clicks)
        out = {}
        for name, samples in self.val_sets.items():
            results = evaluate_predictor(predictor, samples, ecfg, desc=f"val {name}", progress=False)
            out[name] = summarise_eval(aggregate(results, ecfg))
        set_train_mode(self.model, self.cfg)
        return out

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from tqdm import tqdm

        cfg = self.cfg
        t_start = time.monotonic()
        if not self.val_sets and self.rank == 0:
            print(f"histosam train: warning: no validation set (holdout {cfg.holdout} per training folder "
                  "leaves none, no val_data): best.safetensors will be the last epoch", file=sys.stderr, flush=True)
        self.fill_cache()
        if self.rank == 0:
            _atomic_text(self.out / "config.json", json.dumps(cfg.to_dict(), indent=2))
        # Each patch listed as often as its folder's ``repeat`` asks: the sampler shuffles the lot.
        listed = [i for i, p in enumerate(self.patches) for _ in range(cfg.repeat.get(p.dataset, 1))]
        sampler = DistributedSampler(listed, num_replicas=self.world, rank=self.rank,
                                     shuffle=True, seed=cfg.seed)
        stopped = False
        for epoch in range(self.start_epoch, cfg.epochs):
            set_train_mode(self.model, cfg)
            sampler.set_epoch(epoch)
            # Clicks, rounds and augmentation variants drawn from a stream of this epoch alone, so a
            # resumed run draws what an uninterrupted one would have (it replayed epoch 1's before).
            self.rng = np.random.default_rng([cfg.seed, self.rank, epoch])
            order = [listed[j] for j in sampler]
            batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
            if cfg.max_steps_per_epoch:
                batches = batches[: cfg.max_steps_per_epoch]
            t0 = time.monotonic()
            losses = []
            bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                       disable=not (self.progress and self.rank == 0))
            for batch in bar:
                losses.append(self.train_batch(batch))
                bar.set_postfix(loss=f"{np.mean(losses):.4f}")
                if cfg.max_minutes is not None and self._agree_stop(time.monotonic() - t_start > cfg.max_minutes * 60):
                    stopped = True
                    break
            self.scheduler.step()
            row: dict[str, Any] = {"epoch": epoch + 1, "loss": self._mean_over_ranks(losses),
                                   "lr": self.optimizer.param_groups[0]["lr"], "seconds": time.monotonic() - t0}
            last_epoch = epoch == cfg.epochs - 1 or stopped
            if self.rank == 0:
                if (epoch + 1) % cfg.val_every == 0 or last_epoch:
                    for name, vals in self.validate().items():
                        row.update({f"{name}_{k}": v for k, v in vals.items()})
                self.history.append(row)
                self._after_epoch(epoch, row)
            if self.distributed:
                dist.barrier()
            if stopped:
                break
        return {"history": self.history, "best": self.best, "out": str(self.out), "stopped_early": stopped}

    def _mean_over_ranks(self, losses: list[float]) -> float | None:
        """The epoch's mean loss over every rank's batches (rank 0's alone under DDP before)."""
        # On self.device: nccl reduces CUDA tensors only (a CPU tensor fails there; gloo takes both).
        total = torch.tensor([float(np.sum(losses)), float(len(losses))], dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(total)
        total = total.cpu()
        return float(total[0] / total[1]) if total[1] > 0 else None

    def _agree_stop(self, mine: bool) -> bool:
        if not self.distributed:
            return mine
        flag = torch.tensor([1.0 if mine else 0.0], device=self.device)  # nccl: CUDA tensors only
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _after_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        key = f"{self.cfg.select_on}_noc85"
        if key not in row and self.cfg.select_on not in self.val_sets:
            key = next((k for k in row if k.endswith("_noc85")), key)
        score = row.get(key)
        miou = row.get(key.removesuffix("noc85") + "miou_last")
        meta = self._metadata(epoch + 1, row)
        save_decoder_weights(self.model, self.out / LAST, include_encoder=self.cfg.train_image_encoder,
                             extra_metadata=meta)
        if score is not None and self._improves(float(score), miou):
            self.best = float(score)
            self.best_miou = None if miou is None else float(miou)
            row["best"] = True
            save_decoder_weights(self.model, self.out / BEST, include_encoder=self.cfg.train_image_encoder,
                                 extra_metadata=meta)
        elif not (self.out / BEST).is_file():
            save_decoder_weights(self.model, self.out / BEST, include_encoder=self.cfg.train_image_encoder,
                                 extra_metadata=meta)
        self._save_checkpoint(epoch)
        self._write_metrics()

    def _improves(self, noc85: float, miou: float | None) -> bool:
        """Fewer clicks wins; at equal NoC@85, a higher mIoU at the last validated click."""
        if self.best is None or noc85 < self.best:
            return True
        return noc85 == self.best and miou is not None and (self.best_miou is None or miou > self.best_miou)

    def _write_metrics(self) -> None:
        keys: list[str] = []
        for row in self.history:
            keys += [k for k in row if k not in keys]
        def write(tmp: Path) -> None:
            with tmp.open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=keys)
                writer.writeheader()
                writer.writerows(self.history)

        atomic_write(self.out / METRICS, write)
        try:
            self._plot()
        except Exception:  # a plot must never stop a training run
            pass

    def _plot(self) -> None:
        from matplotlib.figure import Figure  # not pyplot: the caller's backend stays as it was

        ep = [r["epoch"] for r in self.history]
        fig = Figure(figsize=(9, 3.5))
        axes = fig.subplots(1, 2)
        axes[0].plot(ep, [r.get("loss") for r in self.history], "o-")
        axes[0].set_title("training loss (NFL + IoU-head MSE)")
        axes[0].set_xlabel("epoch")
        for key in sorted({k for r in self.history for k in r if k.endswith("_noc85")}):
            pts = [(r["epoch"], r[key]) for r in self.history if r.get(key) is not None]
            if pts:
                axes[1].plot(*zip(*pts, strict=True), "o-", label=key)
        axes[1].set_title("validation NoC@85 (lower is better)")
        axes[1].set_xlabel("epoch")
        if axes[1].get_legend_handles_labels()[1]:  # no validation yet (val_every > epochs so far)
            axes[1].legend(fontsize=7)
        fig.tight_layout()
        atomic_write(self.out / "metrics.png", lambda tmp: fig.savefig(tmp, dpi=90, format="png"))

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _same_folder(folder: str) -> str:
    try:
        return str(resolve_data_path(folder).resolve())
    except HistosamError:
        return folder


def train(cfg: TrainConfig, out: Path, resume: bool = False, progress: bool = True, **kwargs) -> dict[str, Any]:
    trainer = Trainer(cfg, out, resume=resume, progress=progress, **kwargs)
    try:
        return trainer.run()
    finally:
        trainer.close()
