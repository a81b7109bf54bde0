"""`histosam compare`: two evaluated runs paired image by image, with bootstrap intervals.

See histosam.backend.evaluation.compare for why: on small validation sets a mean NoC moves by
half a click when a few images cross a threshold, and a default should not be chosen on that.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from histosam.backend.core.errors import InvalidInputError, NotFoundError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="compare two `histosam evaluate` runs image by image (NoC / mIoU differences, bootstrap intervals)",
        description=(
            "Pair two evaluated runs by image and report, per dataset and for pooled groups, the mean NoC@80/85/90 "
            "and mIoU@1/5/10/20 differences A - B with a 95 % paired-bootstrap interval and the images that "
            "decide them."
        ),
    )
    p.add_argument("a", type=Path, metavar="A", help="an evaluation folder (or its results.json)")
    p.add_argument("b", type=Path, metavar="B", help="the evaluation to compare against (may be A itself)")
    p.add_argument("--run-a", metavar="KEY",
                   help="which run of A (a run key of its results.json, or a part of one that names a single run; "
                   "needed when A holds several)")
    p.add_argument("--run-b", metavar="KEY", help="which run of B (as --run-a)")
    p.add_argument("--group", action="append", default=[], metavar="NAME=DS1,DS2",
                   help="also pool these datasets (folder names) into one row, e.g. tumour=bcss,ocdc,panda20_q "
                   "(repeatable)")
    p.add_argument("--draws", type=int, default=10_000, help="bootstrap resamples (default: %(default)s)")
    p.add_argument("--out", type=Path,
                   help="also write comparison.json, comparison.md and comparison.png (NoC@85 intervals) here")
    p.set_defaults(func=run)


def read_results(path: Path) -> dict[str, Any]:
    """results.json of an evaluation folder (or the file itself)."""
    file = path / "results.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise NotFoundError(f"{file}: no such evaluation (run `histosam evaluate --out ...` first)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"{file}: not a readable results.json ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), dict) or not data["runs"]:
        raise InvalidInputError(f"{file}: holds no evaluated runs")
    return data


def pick_run(results: dict[str, Any], wanted: str | None, where: Path) -> tuple[str, list[dict[str, Any]]]:
    """(run key, its per-image samples): the only run, the key itself, or the one key containing ``wanted``."""
    runs: dict[str, Any] = results["runs"]
    if wanted is None:
        if len(runs) > 1:
            raise InvalidInputError(f"{where} holds {len(runs)} runs, choose one with --run-a/--run-b: "
                                    f"{', '.join(runs)}")
        key = next(iter(runs))
    elif wanted in runs:
        key = wanted
    else:
        hits = [k for k in runs if wanted in k]
        if len(hits) != 1:
            raise InvalidInputError(f"{where}: {wanted!r} names {len(hits)} runs; its runs are {', '.join(runs)}")
        key = hits[0]
    run = runs[key]
    samples = run.get("samples") if isinstance(run, dict) else None
    if not isinstance(samples, list) or not samples:
        raise InvalidInputError(f"{where}: run {key!r} has no per-image samples")
    for i, s in enumerate(samples):
        ious = s.get("ious") if isinstance(s, dict) else None
        if (not isinstance(ious, list) or not ious or not all(isinstance(v, int | float) for v in ious)
                or not isinstance(s.get("name"), str) or not isinstance(s.get("dataset"), str)):
            raise InvalidInputError(f"{where}: run {key!r}, sample {i} needs a name, a dataset and a non-empty "
                                    f"list of IoUs")
    return key, samples


def parse_groups(specs: list[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, members = spec.partition("=")
        datasets = [m.strip() for m in members.split(",") if m.strip()]
        if not sep or not name.strip() or not datasets:
            raise InvalidInputError(f"--group must be NAME=DATASET[,DATASET...], got {spec!r}")
        groups[name.strip()] = datasets
    return groups


def plot_noc85(comparisons, label_a: str, label_b: str, path: Path) -> None:
    """One row per group: NoC@85 difference A - B and its interval (left of 0: A needs fewer clicks)."""
    from matplotlib.figure import Figure  # not pyplot: the caller's backend stays as it was

    from histosam.backend.core.atomic import atomic_write

    rows = [(g.group, g.n, next(d for d in g.differences if d.metric == "NoC@85")) for g in comparisons]
    fig = Figure(figsize=(7, 0.5 * len(rows) + 1.6))
    ax = fig.add_subplot()
    for i, (_, _, d) in enumerate(rows):
        ax.plot([d.low, d.high], [i, i], color="tab:blue" if d.settled else "grey", lw=2)
        ax.plot([d.mean], [i], "o", color="black")
    ax.axvline(0, color="red", lw=1)
    ax.set_yticks(range(len(rows)), [f"{g} (n={n})" for g, n, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel("NoC@85 difference A - B (clicks; < 0: A better), 95 % paired bootstrap")
    ax.set_title(f"A = {label_a}\nB = {label_b}", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def run(args: argparse.Namespace) -> int:
    from histosam.backend.core.atomic import write_json, write_text
    from histosam.backend.evaluation.compare import compare_runs, render_comparison

    if args.draws < 100 or args.draws > 1_000_000:
        raise InvalidInputError(f"--draws must be between 100 and 1000000, got {args.draws}")
    results_a, results_b = read_results(args.a), read_results(args.b)
    key_a, samples_a = pick_run(results_a, args.run_a, args.a)
    key_b, samples_b = pick_run(results_b, args.run_b, args.b)
    max_a, max_b = (int(r.get("config", {}).get("max_clicks", 20)) for r in (results_a, results_b))
    if max_a != max_b:
        raise InvalidInputError(f"the runs used different --max-clicks ({max_a} vs {max_b}): NoC is not comparable")
    comparisons = compare_runs(samples_a, samples_b, max_a, parse_groups(args.group), draws=args.draws)
    label_a, label_b = f"{args.a} :: {key_a}", f"{args.b} :: {key_b}"
    table = render_comparison(label_a, label_b, comparisons)
    print(table, end="")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "comparison.json", {"a": label_a, "b": label_b, "max_clicks": max_a,
                                                  "groups": [c.to_json() for c in comparisons]})
        write_text(args.out / "comparison.md", table)
        plot_noc85(comparisons, label_a, label_b, args.out / "comparison.png")
        print(f"wrote {args.out / 'comparison.json'}, {args.out / 'comparison.md'}, {args.out / 'comparison.png'}")
    return 0
