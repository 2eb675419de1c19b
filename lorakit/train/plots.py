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


def _loss_line(ax, steps, losses, **kw):
    """Raw per-step loss, thin and faint, under its smoothed curve in the same colour."""
    line, = ax.plot(steps, losses, lw=0.6, alpha=0.3, **{k: v for k, v in kw.items() if k == "color"})
    ax.plot(steps, smooth(losses), lw=1.6, color=line.get_color(), **{k: v for k, v in kw.items() if k != "color"})
    return line.get_color()


def plot_run(history: list[dict], path: str | Path, metric: str) -> None:
    """Training loss per step and, when evaluated, the validation metric."""
    plt = _pyplot()
    if plt is None or not history:
        return
    evals = [r for r in history if f"eval_{metric}" in r]
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(10 if evals else 5, 3.6), squeeze=False)
    ax = axes[0][0]
    _loss_line(ax, [r["step"] for r in history], [r["loss"] for r in history])
    ax.set(xlabel="optimizer step", ylabel="training loss", title="training loss (faint: per step; line: smoothed)")
    ax.grid(alpha=0.3)
    if evals:
        ax = axes[0][1]
        ax.plot([r["step"] for r in evals], [r[f"eval_{metric}"] for r in evals], marker="o")
        ax.set(xlabel="optimizer step", ylabel=metric, title=f"validation {metric}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    """Metric vs learning rate (log x), one line per variant: mean over seeds, band = min..max over seeds."""
    plt = _pyplot()
    if plt is None or not rows:
        return
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
    ax.set(xlabel="learning rate", ylabel=metric, title=f"{metric} vs learning rate (band: seed range)")
    ax.grid(alpha=0.3)
    _legend(fig, ax, len(variants))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(curves: dict[tuple, list[tuple[int, float]]], path: str | Path, best_lr: dict[str, float]) -> None:
    """Training loss per step for each variant at its best learning rate, one thin line per seed."""
    plt = _pyplot()
    if plt is None or not curves:
        return
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
    ax.grid(alpha=0.3)
    _legend(fig, ax, len(variants))
    fig.savefig(path, dpi=110)
    plt.close(fig)
