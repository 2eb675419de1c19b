"""AURAC: area under the accuracy-vs-rank curve (MatryoshkaLoRA, arXiv 2605.07850), normalized by the x-range.

From a mapping rank → accuracy over the evaluated ranks (sorted by rank), the trapezoid rule over x, divided by
x_last − x_first: v1 uses x = rank, v2 uses x = log₂(rank) (so 1, 2, 4, 8 count equally). A single rank gives its
accuracy. The result is a mean accuracy over the rank range, on the accuracies' own scale.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Mapping, Optional

__all__ = ["aurac_v1", "aurac_v2", "aurac", "plot_accuracy_vs_rank", "write_rank_report"]


def _points(accuracy: Mapping[int, float]) -> list[tuple[int, float]]:
    if not accuracy:
        raise ValueError("AURAC needs at least one (rank, accuracy) pair")
    points = sorted((int(k), float(v)) for k, v in accuracy.items())
    if points[0][0] < 1:
        raise ValueError(f"ranks must be ≥ 1, got {points[0][0]}")
    return points


def _area(points: list[tuple[float, float]]) -> float:
    if len(points) == 1:
        return points[0][1]
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(points, points[1:]))
    return area / (points[-1][0] - points[0][0])


def aurac_v1(accuracy: Mapping[int, float]) -> float:
    """Trapezoid area of accuracy over x = rank, divided by (max rank − min rank)."""
    return _area([(float(k), v) for k, v in _points(accuracy)])


def aurac_v2(accuracy: Mapping[int, float]) -> float:
    """Trapezoid area of accuracy over x = log₂(rank), divided by log₂(max rank / min rank)."""
    return _area([(math.log2(k), v) for k, v in _points(accuracy)])


def aurac(accuracy: Mapping[int, float]) -> dict[str, float]:
    """{"aurac_v1": ..., "aurac_v2": ...}."""
    return {"aurac_v1": aurac_v1(accuracy), "aurac_v2": aurac_v2(accuracy)}


def plot_accuracy_vs_rank(curves: Mapping[str, Mapping[int, float]], path: str | os.PathLike,
                          title: Optional[str] = None, metric: str = "accuracy", log2_x: bool = True) -> Optional[str]:
    """Plot one line per label of `curves` ({label: {rank: accuracy}}) with its AURAC v1/v2 in the legend, to
    `path` (PNG, SVG, ... by suffix). Returns the path, or None when matplotlib is not installed (optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    all_ranks = set()
    for label, accuracy in curves.items():
        points = _points(accuracy)
        all_ranks.update(k for k, _ in points)
        scores = aurac(accuracy)
        ax.plot([k for k, _ in points], [v for _, v in points], marker="o",
                label=f"{label} (AURAC v1 {scores['aurac_v1']:.4g}, v2 {scores['aurac_v2']:.4g})")
    if log2_x:
        ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(all_ranks))
    ax.set_xticklabels([str(k) for k in sorted(all_ranks)])
    ax.set_xlabel("rank")
    ax.set_ylabel(metric)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def write_rank_report(curves: Mapping[str, Mapping[int, float]], directory: str | os.PathLike,
                      metric: str = "accuracy", title: Optional[str] = None) -> dict[str, dict[str, float]]:
    """Write `accuracy_by_rank.csv` (label, rank, metric), `aurac.json` ({label: {aurac_v1, aurac_v2}}) and, with
    matplotlib, `accuracy_vs_rank.png` into `directory`; returns the AURAC dict."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    scores = {label: aurac(acc) for label, acc in curves.items()}
    with open(out / "accuracy_by_rank.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "rank", metric])
        for label, acc in curves.items():
            writer.writerows([label, k, v] for k, v in _points(acc))
    (out / "aurac.json").write_text(json.dumps(scores, indent=2) + "\n")
    plot_accuracy_vs_rank(curves, out / "accuracy_vs_rank.png", title=title, metric=metric)
    return scores
