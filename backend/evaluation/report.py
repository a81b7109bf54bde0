"""Evaluation outputs: results.json, table.md and miou_per_click.png, written atomically.

``table.md`` is laid out like the reference paper's tables (rows = model/backend; NoC@80/85/90,
seconds per click, NoF/n@85/90, then mIoU after 1/5/10/20 clicks), and the PNG like its Fig. 3
(mIoU against the number of clicks, one line per model/backend). Each file is written
atomically (histosam.backend.core.atomic), so a reader never sees half a report and an interrupted
run leaves the previous one intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from histosam.backend.core.atomic import atomic_write, write_json, write_text
from histosam.backend.evaluation.metrics import (
    NOC_THRESHOLDS,
    NOF_THRESHOLDS,
    REFINEMENT_SPAN,
    threshold_key,
)

TABLE_MIOU_CLICKS = (1, 5, 10, 20)
_A, _B = REFINEMENT_SPAN
ERROR_CLOSED_HEADER = f"error closed @{_A}->{_B}"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.1f}"


def _metrics_table(runs: dict[str, dict[str, Any]], max_clicks: int) -> list[str]:
    # The fixed columns, and always the last click (a 3-click run still shows where it ended).
    miou_cols = sorted({k for k in TABLE_MIOU_CLICKS if k <= max_clicks} | {max_clicks})
    head = (
        ["Model / backend"]
        + [f"NoC@{threshold_key(t)}" for t in NOC_THRESHOLDS]
        + ["SPC ms (amort.)", "SPC ms (dec.)"]
        + [f"NoF/n@{threshold_key(t)}" for t in NOF_THRESHOLDS]
        + [f"mIoU@{k}" for k in miou_cols]
        + [ERROR_CLOSED_HEADER]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, run in runs.items():
        cells = [key]
        cells += [_fmt(run["noc"][threshold_key(t)]) for t in NOC_THRESHOLDS]
        cells += [_ms(run["spc"]["amortised"]), _ms(run["spc"]["decoder"])]
        cells += [f"{run['nof'][threshold_key(t)]['count']}/{run['n']}" for t in NOF_THRESHOLDS]
        cells += [_fmt(run["miou_per_click"].get(str(k)), 3) for k in miou_cols]
        cells += [_fmt(run.get("refinement", {}).get("error_closed"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _parity_lines(parity: dict[str, dict[str, Any]]) -> list[str]:
    head = [
        "Model", "NoC differs (n)", "identical click sequences", "max low-res logit diff",
        "SPC ratio ONNX/PyTorch (amort.)", "SPC ratio (dec.)", "flagged",
    ]
    lines = ["", "## ONNX / PyTorch parity", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    flags = []
    for model, p in parity.items():
        n = p["n"]
        lines.append(
            "| " + " | ".join([
                model,
                f"{p['n_noc_different']}/{n}",
                f"{p['identical_click_sequences']}/{n}",
                "–" if p["max_low_res_logit_difference"] is None
                else f"{p['max_low_res_logit_difference']:.2e}",
                _fmt(p["spc_ratio"]["amortised"]),
                _fmt(p["spc_ratio"]["decoder"]),
                "**yes**" if p["flagged"] else "no",
            ]) + " |"
        )
        if p["flagged"]:
            flags.append(flag_line(model, p))
    return lines + ([""] + flags if flags else [])


def flag_line(model: str, parity: dict[str, Any]) -> str:
    """The one-line warning printed and written when a bundle disagrees with PyTorch."""
    return (
        f"FLAGGED: {model}: ONNX and PyTorch NoC differ on {parity['n_noc_different']}/"
        f"{parity['n']} samples ({parity['fraction_noc_different']:.1%} > "
        f"{parity['flag_threshold']:.0%})"
    )


def render_table(results: dict[str, Any]) -> str:
    """table.md: one row per model/backend, per dataset when several, then parity."""
    cfg = results["config"]
    m = cfg["max_clicks"]
    frac = cfg["fraction"]
    kept = (
        f"{results['n_kept']} kept with foreground fraction in [{frac[0]:g}, {frac[1]:g}]"
        if frac
        else f"{results['n_kept']} with foreground"
    )
    lines = [
        "# Interactive segmentation evaluation",
        "",
        f"Data: {', '.join(cfg['data'])}: {results['n_total']} samples found, {kept}, "
        f"{results['n']} evaluated.",
        f"Protocol: RITM clicker, up to {m} clicks, "
        + ("full curves" if cfg["full_curve"] else f"stop at IoU >= {cfg.get('stop_iou', cfg['target_iou']):g}")
        + "; NoF counts NoC == max clicks (RITM); mIoU pads stopped curves with their last IoU;"
        " SPC = seconds per click in ms, amortised over encoder + decoder or decoder only;"
        f" {ERROR_CLOSED_HEADER} = (mIoU@{_B} - mIoU@{_A}) / (1 - mIoU@{_A}).",
        "",
    ]
    runs = results["runs"]
    lines += _metrics_table(runs, m)
    by_ds = {
        ds for run in runs.values() for ds in run.get("by_dataset", {})
    }
    for ds in sorted(by_ds):
        lines += ["", f"## {ds}", ""]
        lines += _metrics_table(
            {k: r["by_dataset"][ds] for k, r in runs.items() if ds in r.get("by_dataset", {})}, m
        )
    obey = [
        f"- {k}: positive {_fmt(r['obedience']['positive'], 3)}, "
        f"negative {_fmt(r['obedience']['negative'], 3)}"
        for k, r in runs.items()
    ]
    lines += ["", "## Click obedience (fraction of clicks whose pixel got the clicked label)", ""]
    lines += obey
    setback_lines = [
        f"- {k}: {r['setbacks']['count']} of {r['setbacks']['clicks']} clicks ({_fmt(r['setbacks']['share'], 3)})"
        for k, r in runs.items() if r.get("setbacks")
    ]
    if setback_lines:
        drop = next(r["setbacks"]["drop"] for r in runs.values() if r.get("setbacks"))
        lines += ["", f"## Setbacks (clicks after the first whose answer lost more than {drop:g} IoU)", ""]
        lines += setback_lines
    if results.get("parity"):
        lines += _parity_lines(results["parity"])
    return "\n".join(lines) + "\n"


def plot_miou(results: dict[str, Any], path: Path) -> None:
    """miou_per_click.png: mIoU after k clicks, one line per run (one panel per dataset)."""
    from matplotlib.figure import Figure  # not pyplot: the caller's backend stays as it was
    from matplotlib.ticker import MaxNLocator

    runs = results["runs"]
    datasets = sorted({ds for r in runs.values() for ds in r.get("by_dataset", {})})
    panels: list[tuple[str, dict[str, list[float]]]] = [
        ("all samples", {k: r["miou_curve"] for k, r in runs.items()})
    ]
    panels += [
        (ds, {k: r["by_dataset"][ds]["miou_curve"] for k, r in runs.items() if ds in r.get("by_dataset", {})})
        for ds in datasets
    ]
    fig = Figure(figsize=(5.5 * len(panels), 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels, strict=True):
        for key, curve in curves.items():
            ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label=key)
        for t in NOC_THRESHOLDS:
            ax.axhline(t, color="grey", linewidth=0.5, linestyle=":")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("number of clicks")
        ax.set_ylabel("mIoU")
        ax.set_ylim(0.0, 1.0)
        ax.set_xlim(1, max(2, results["config"]["max_clicks"]))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def write_report(out_dir: Path, results: dict[str, Any]) -> dict[str, Path]:
    """All three outputs into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    paths = {
        "results": out_dir / "results.json",
        "table": out_dir / "table.md",
        "plot": out_dir / "miou_per_click.png",
    }
    write_json(paths["results"], results)
    table = render_table(results)
    write_text(paths["table"], table)
    plot_miou(results, paths["plot"])
    return paths

