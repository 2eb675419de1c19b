"""PNG plots of runs and sweeps (matplotlib, optional: without it plots are skipped with a note)."""
from __future__ import annotations

import sys
from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        print("note: matplotlib is not installed (pip install 'lorakit[plot]'); skipping plots", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def smooth(values: list[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard-style), for noisy per-step losses."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


BOUNDED = ("accuracy", "f1", "macro_f1", "majority_class_rate", "generation_accuracy", "unparseable")  # in [0, 1]


def _loss_line(ax, steps, losses, **kw):
    """Raw per-step loss, thin and faint, under its smoothed curve in the same colour (a lone point: a marker)."""
    marker = {"marker": "o"} if len(steps) == 1 else {}
    line, = ax.plot(steps, losses, lw=0.6, alpha=0.3, **{k: v for k, v in kw.items() if k == "color"})
    ax.plot(steps, smooth(losses), lw=1.6, color=line.get_color(), **marker,
            **{k: v for k, v in kw.items() if k != "color"})
    return line.get_color()


def _step_axis(ax, last: int) -> None:
    """Optimizer steps from 0 to just past `last`, with integer ticks."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlim(0, last + max(1.0, 0.03 * last))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _value_limits(values: list[float], bounded: bool) -> tuple[float, float] | None:
    """y limits that show `values` with a margin, even a single one; within [0, 1] (plus room) for `bounded`."""
    values = [v for v in values if v == v and abs(v) != float("inf")]
    if not values:
        return None
    lo, hi = min(values), max(values)
    pad = max(0.1 * (hi - lo), 0.05 if bounded else 0.1 * max(abs(lo), abs(hi)) or 0.1)
    lo, hi = lo - pad, hi + pad
    return (max(lo, 0.0), min(hi, 1.05)) if bounded else (lo, hi)


def majority_rate(record: dict, key: str) -> float | None:
    """The majority-class rate of the split an accuracy `key` of `record` was measured on (None for other
    metrics, or when the record has none): `eval_accuracy` → `eval_majority_class_rate`."""
    if key.rsplit("_", 1)[-1] != "accuracy":
        return None
    return record.get(key.removesuffix("accuracy") + "majority_class_rate")


def _majority_line(ax, rate: float) -> None:
    ax.axhline(rate, linestyle="--", color="gray", lw=1.2, zorder=1, label=f"majority class ({rate:.4g})")


def _save(fig, path: str | Path) -> None:
    if fig is None:
        return
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_run(history: list[dict], path: str | Path, metric: str) -> None:
    """Training loss per step and, when evaluated, the validation metric (`run_figure`), as a PNG."""
    _save(run_figure(history, metric), path)


def run_figure(history: list[dict], metric: str):
    """The figure of `plot_run`: the loss panel and, when evaluated, the validation panel (with the majority-class
    rate as a dashed line under an accuracy); None without matplotlib or history."""
    plt = _pyplot()
    if plt is None or not history:
        return None
    evals = [r for r in history if f"eval_{metric}" in r]
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(10 if evals else 5, 3.6), squeeze=False)
    ax = axes[0][0]
    steps = [r["step"] for r in history]
    _loss_line(ax, steps, [r["loss"] for r in history])
    ax.set(xlabel="optimizer step", ylabel="training loss", title="training loss (faint: per step; line: smoothed)")
    _step_axis(ax, max(steps))
    ax.grid(alpha=0.3)
    if evals:
        _validation_panel(axes[0][1], evals, metric, max(steps))
    fig.tight_layout()
    return fig


def _validation_panel(ax, evals: list[dict], metric: str, last: int) -> None:
    values = [r[f"eval_{metric}"] for r in evals]
    ax.plot([r["step"] for r in evals], values, marker="o", markersize=6, clip_on=False, label=f"validation {metric}")
    majority = majority_rate(evals[-1], f"eval_{metric}")
    if majority is not None:
        _majority_line(ax, majority)
        ax.legend(fontsize="small")
    limits = _value_limits(values + ([majority] if majority is not None else []), metric in BOUNDED)
    if limits:
        ax.set_ylim(*limits)
    ax.set(xlabel="optimizer step", ylabel=metric, title=f"validation {metric}")
    _step_axis(ax, last)
    ax.grid(alpha=0.3)


def _palette(names: list[str]) -> dict[str, dict]:
    """Distinct line styles for up to 40 lines: tab10 for a few, tab20 colors × 2 line styles beyond."""
    import matplotlib

    if len(names) <= 10:
        return {n: {"color": matplotlib.colormaps["tab10"](i)} for i, n in enumerate(names)}
    cmap = matplotlib.colormaps["tab20"]
    return {n: {"color": cmap(i % 20), "linestyle": "-" if i < 20 else "--"} for i, n in enumerate(names)}


def _legend(fig, ax, n: int) -> None:
    """Inside the axes for a few lines, to the right of them for many."""
    if n > 6:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", ncol=1 + n // 20)
    else:
        ax.legend()
    fig.tight_layout()


def plot_sweep(rows: list[dict], path: str | Path, metric: str) -> None:
    """Metric vs learning rate (`sweep_figure`), as a PNG."""
    _save(sweep_figure(rows, metric), path)


def sweep_figure(rows: list[dict], metric: str):
    """Metric vs learning rate (log x), one line per variant: mean over seeds, band = min..max over seeds; under an
    accuracy, the split's majority-class rate as a dashed line. None without matplotlib or rows."""
    plt = _pyplot()
    if plt is None or not rows:
        return None
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    style = _palette(variants)
    fig, ax = plt.subplots(figsize=(6 if len(variants) <= 6 else 8.5, 4.5))
    for variant in variants:
        by_lr: dict[float, list[float]] = {}
        for r in rows:
            if r["variant"] == variant:
                by_lr.setdefault(r["learning_rate"], []).append(r[metric])
        lrs = sorted(by_lr)
        means = [sum(by_lr[lr]) / len(by_lr[lr]) for lr in lrs]
        line, = ax.plot(lrs, means, marker="o", label=variant, **style[variant])
        ax.fill_between(lrs, [min(by_lr[lr]) for lr in lrs], [max(by_lr[lr]) for lr in lrs],
                        color=line.get_color(), alpha=0.2)
        for lr in lrs:
            ax.scatter([lr] * len(by_lr[lr]), by_lr[lr], color=line.get_color(), s=10, alpha=0.6)
    ax.set_xscale("log")
    all_lrs = sorted({r["learning_rate"] for r in rows})
    if len(all_lrs) <= 6:  # few learning rates: label exactly those; many: the usual decade ticks
        ax.set_xticks(all_lrs, [f"{lr:g}" for lr in all_lrs])
        ax.minorticks_off()
    majority = majority_rate(rows[0], metric)  # (the runs of a sweep share their test split)
    if majority is not None:
        _majority_line(ax, majority)
    ax.set(xlabel="learning rate", ylabel=metric, title=f"{metric} vs learning rate (band: seed range)")
    ax.grid(alpha=0.3)
    _legend(fig, ax, len(variants) + (majority is not None))
    return fig


def plot_curves(curves: dict[tuple, list[tuple[int, float]]], path: str | Path, best_lr: dict[str, float]) -> None:
    """Training loss per step for each variant at its best learning rate (`curves_figure`), as a PNG."""
    _save(curves_figure(curves, best_lr), path)


def curves_figure(curves: dict[tuple, list[tuple[int, float]]], best_lr: dict[str, float]):
    """Training loss per step for each variant at its best learning rate, one thin line per seed; None without
    matplotlib or curves."""
    plt = _pyplot()
    if plt is None or not curves:
        return None
    variants = list(dict.fromkeys(v for v, _, _ in curves))
    style = _palette(variants)
    fig, ax = plt.subplots(figsize=(7 if len(variants) <= 6 else 9.5, 4.5))
    labelled = set()
    for (variant, lr, seed), points in curves.items():
        if not points or lr != best_lr.get(variant):
            continue
        kw = dict(style[variant]) if variant in labelled else {**style[variant], "label": f"{variant} (lr {lr:g})"}
        labelled.add(variant)
        steps, losses = zip(*points)
        _loss_line(ax, list(steps), list(losses), **kw)
    ax.set(xlabel="optimizer step", ylabel="training loss (smoothed; faint: per step)",
           title="training loss at each variant's best learning rate, one line per seed")
    _step_axis(ax, max((step for points in curves.values() for step, _ in points), default=1))
    ax.grid(alpha=0.3)
    _legend(fig, ax, len(variants))
    return fig
