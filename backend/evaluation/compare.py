"""Is one evaluated run better than another, or is the difference a few images' noise?

Why. The validation sets this project chooses defaults on are small (the tumour-region set has
23 patches, and on 15 of them every method fails 85 % IoU), so a mean NoC can move by half a
click when two or three images cross a threshold a click earlier or later. Choosing the shipped
variant on such a difference is tuning to noise. This module pairs two runs image by image (the
same image, the same simulated user) and gives, per dataset and for pooled groups of datasets,
the mean NoC and mIoU differences with a paired bootstrap 95 % interval over images (Efron &
Tibshirani 1993, percentile interval), and the images that decide the difference.

Pure numpy on results.json records (``histosam evaluate``'s ``runs[key]["samples"]``), so it is
testable on constructed curves and runs on a serving-only install.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from histosam.backend.core.errors import InvalidInputError
from histosam.backend.evaluation.metrics import NOC_THRESHOLDS, noc, padded_curve, threshold_key
from histosam.backend.evaluation.report import TABLE_MIOU_CLICKS

BOOTSTRAP_DRAWS = 10_000
# Fewer paired images than this and a bootstrap interval says more about the resampling than about
# the images (two images give three possible means): the interval is shown, never called settled.
MIN_SETTLED_IMAGES = 5
BOOTSTRAP_CHUNK = 1_000_000  # resampled values held at once, whatever the draws and images (8 MB)


@dataclass(frozen=True)
class Difference:
    """``a - b`` of one metric over paired images (for NoC, negative = A needs fewer clicks)."""

    metric: str
    n: int
    mean: float
    low: float  # 2.5th percentile of the bootstrap means
    high: float  # 97.5th percentile
    # Images where the two differ, largest difference first: (dataset/name, a - b).
    deciding: tuple[tuple[str, float], ...]

    @property
    def settled(self) -> bool:
        """The interval excludes 0 (over enough images): the sign of the difference holds beyond
        these images' noise."""
        return self.n >= MIN_SETTLED_IMAGES and (self.low > 0 or self.high < 0)

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "mean": self.mean, "ci95": [self.low, self.high], "settled": self.settled,
                "deciding": [{"image": k, "difference": d} for k, d in self.deciding]}


@dataclass(frozen=True)
class GroupComparison:
    group: str
    n: int
    differences: tuple[Difference, ...]

    def to_json(self) -> dict[str, Any]:
        return {"group": self.group, "n": self.n, "differences": [d.to_json() for d in self.differences]}


def sample_key(sample: Mapping[str, Any]) -> str:
    return f"{sample['dataset']}/{sample['name']}"


def pair_samples(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]
                 ) -> list[tuple[str, Mapping[str, Any], Mapping[str, Any]]]:
    """(key, sample of A, sample of B) for every image both runs evaluated, in A's order.

    Raises when the runs share no image (two evaluations of different data cannot be paired).
    """
    by_key = {sample_key(s): s for s in b}
    pairs = [(sample_key(s), s, by_key[sample_key(s)]) for s in a if sample_key(s) in by_key]
    if not pairs:
        raise InvalidInputError("the two runs evaluated no image in common: nothing to pair")
    return pairs


def bootstrap_interval(values: np.ndarray, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean of ``values`` resampled with replacement."""
    values = np.asarray(values, np.float64)
    if len(values) == 0:
        raise InvalidInputError("no values to bootstrap")
    rng = np.random.default_rng(seed)
    rows = max(1, BOOTSTRAP_CHUNK // len(values))  # resamples per chunk, so memory stays bounded
    means = np.concatenate([values[rng.integers(0, len(values), (min(rows, draws - start), len(values)))].mean(axis=1)
                            for start in range(0, draws, rows)])
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def _difference(metric: str, keys: list[str], a: np.ndarray, b: np.ndarray, draws: int, seed: int) -> Difference:
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    low, high = bootstrap_interval(d, draws, seed)
    order = np.argsort(-np.abs(d), kind="stable")
    deciding = tuple((keys[i], float(d[i])) for i in order if abs(d[i]) > 1e-9)
    return Difference(metric, len(d), float(d.mean()), low, high, deciding)


def compare_pairs(group: str, pairs: Sequence[tuple[str, Mapping[str, Any], Mapping[str, Any]]], max_clicks: int,
                  draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> GroupComparison:
    """NoC@80/85/90 and mIoU@1/5/10/20 differences (A - B) over the paired images of one group."""
    keys = [k for k, _, _ in pairs]
    out: list[Difference] = []
    for t in NOC_THRESHOLDS:
        na = np.array([noc(sa["ious"], t, max_clicks) for _, sa, _ in pairs])
        nb = np.array([noc(sb["ious"], t, max_clicks) for _, _, sb in pairs])
        out.append(_difference(f"NoC@{threshold_key(t)}", keys, na, nb, draws, seed))
    ca = np.stack([padded_curve(sa["ious"], max_clicks) for _, sa, _ in pairs])
    cb = np.stack([padded_curve(sb["ious"], max_clicks) for _, _, sb in pairs])
    for k in TABLE_MIOU_CLICKS:
        if k <= max_clicks:
            out.append(_difference(f"mIoU@{k}", keys, ca[:, k - 1], cb[:, k - 1], draws, seed))
    return GroupComparison(group, len(pairs), tuple(out))


def compare_runs(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]], max_clicks: int,
                 groups: Mapping[str, Sequence[str]] | None = None, draws: int = BOOTSTRAP_DRAWS, seed: int = 0
                 ) -> list[GroupComparison]:
    """Per dataset, then each named group of datasets, then every paired image ("all")."""
    pairs = pair_samples(a, b)
    datasets = list(dict.fromkeys(str(sa["dataset"]) for _, sa, _ in pairs))
    result = [compare_pairs(ds, [p for p in pairs if p[1]["dataset"] == ds], max_clicks, draws, seed)
              for ds in datasets]
    for name, members in (groups or {}).items():
        unknown = sorted(set(members) - set(datasets))
        if unknown:
            raise InvalidInputError(f"group {name!r} names datasets the runs do not share: {', '.join(unknown)} "
                                    f"(shared: {', '.join(datasets)})")
        wanted = set(members)
        result.append(compare_pairs(name, [p for p in pairs if p[1]["dataset"] in wanted], max_clicks, draws, seed))
    if len(datasets) > 1:
        result.append(compare_pairs("all", pairs, max_clicks, draws, seed))
    return result


def render_comparison(label_a: str, label_b: str, comparisons: Sequence[GroupComparison], shown: int = 5) -> str:
    """A Markdown table (one row per group and metric) and the images that decide each NoC."""
    lines = [f"A = {label_a}", f"B = {label_b}", "",
             "Differences A - B over paired images, 95 % paired-bootstrap interval; NoC: negative = A needs fewer "
             f"clicks; 'settled' = the interval excludes 0 (never with fewer than {MIN_SETTLED_IMAGES} images).", "",
             "| group | n | metric | A - B | 95 % interval | settled | deciding images (A - B) |",
             "|---|---|---|---|---|---|---|"]
    for g in comparisons:
        for d in g.differences:
            digits = 2 if d.metric.startswith("NoC") else 3
            deciding = ", ".join(f"{k.split('/', 1)[-1]} {v:+.{digits}f}" for k, v in d.deciding[:shown])
            more = f" (+{len(d.deciding) - shown} more)" if len(d.deciding) > shown else ""
            shown_deciding = (deciding + more) if d.metric.startswith("NoC") else ""
            lines.append(f"| {g.group} | {g.n} | {d.metric} | {d.mean:+.{digits}f} | [{d.low:+.{digits}f}, "
                         f"{d.high:+.{digits}f}] | {'yes' if d.settled else 'no'} | {shown_deciding} |")
    return "\n".join(lines) + "\n"
