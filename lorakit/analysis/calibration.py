"""Calibration metrics of a classifier's predicted probabilities (as in the HypeLoRA paper, arXiv 2603.19278).

All take `probs` (N, K) class probabilities (rows sum to 1; use `torch.softmax(logits, -1)`) and `labels` (N,)
integer classes, and use the max-softmax confidence unless said otherwise:
- ECE: Σ_b (|b|/N)·|acc_b − conf_b| over `bins` equal-width confidence bins ((i−1)/M, i/M], 0 in the first;
- MCE: max over non-empty bins of |acc_b − conf_b|;
- ACE: the same sum over equal-mass bins (sorted by confidence, N // bins per bin, the last takes the remainder);
- classwise ECE: for each class k, ECE of p_k against 1[label = k] over equal-width bins; averaged over classes;
- Brier: mean over examples of Σ_k (p_k − 1[label = k])².
(The paper's thresholded ACE is not implemented.)

`reliability` gives the per-bin numbers behind ECE and `reliability_diagram` draws them (PNG, needs the `plot` extra).
Bin i (0-based) of M holds confidences in (i/M, (i+1)/M]; exactly 0 goes to the first bin, exactly 1 to the last.
Edges are compared as stored (0.3 lies in (0.2, 0.3] even though 0.3·10 rounds to 3.0000000000000004).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError, DataError, MissingDependencyError

PROB_SLACK = 1e-6  # rounding a normalisation may leave outside [0, 1]


def _check(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.as_tensor(probs).detach().to("cpu", torch.float64)  # (GPU tensors are welcome)
    labels = torch.as_tensor(labels).detach().cpu()
    if probs.dim() != 2 or labels.shape != probs.shape[:1] or len(labels) == 0 or probs.shape[1] == 0:
        raise DataError(f"expected probs (N, K) and labels (N,) with N ≥ 1, K ≥ 1, got {tuple(probs.shape)} and "
                         f"{tuple(labels.shape)}")
    if not torch.isfinite(probs).all() or probs.min() < -PROB_SLACK or probs.max() > 1 + PROB_SLACK:
        raise DataError(f"probs must be finite probabilities in [0, 1], found values in "
                        f"[{probs.min().item()}, {probs.max().item()}]")
    if labels.is_floating_point() and not torch.equal(labels, labels.round()):
        raise DataError("labels must be integer class indices, found fractional values")
    labels = labels.long()
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise DataError(f"labels must be class indices in [0, {probs.shape[1] - 1}] (probs has {probs.shape[1]} "
                        f"columns), found {labels.min().item()}..{labels.max().item()}")
    return probs, labels


def _check_bins(bins: int) -> int:
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ConfigError(f"bins must be an integer ≥ 1, got {bins!r}")
    return bins


def _confidence(probs, labels):
    conf, pred = probs.max(1)
    return conf, (pred == labels).double()


def bin_edges(bins: int) -> torch.Tensor:
    """The M + 1 edges 0, 1/M, ..., 1 of the equal-width bins (float64)."""
    return torch.arange(_check_bins(bins) + 1, dtype=torch.float64) / bins


def bin_index(conf: torch.Tensor, bins: int) -> torch.Tensor:
    """Equal-width bin of each confidence: i for i/M < conf ≤ (i+1)/M; 0 for conf = 0, M − 1 for conf = 1."""
    conf = torch.as_tensor(conf, dtype=torch.float64)
    return (torch.searchsorted(bin_edges(bins), conf.contiguous()) - 1).clamp(0, bins - 1)


def _gaps(conf, hit, index, bins) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, |mean hit − mean conf|) per bin."""
    count = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(conf))
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, conf)
    hit_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, hit)
    safe = count.clamp(min=1)
    return count, (hit_sum / safe - conf_sum / safe).abs()


def ece(probs, labels, bins: int = 10) -> float:
    probs, labels = _check(probs, labels)
    conf, hit = _confidence(probs, labels)
    count, gap = _gaps(conf, hit, bin_index(conf, bins), bins)
    return float((count / len(conf) * gap).sum())


def mce(probs, labels, bins: int = 10) -> float:
    probs, labels = _check(probs, labels)
    conf, hit = _confidence(probs, labels)
    count, gap = _gaps(conf, hit, bin_index(conf, bins), bins)
    return float(gap[count > 0].max())


def ace(probs, labels, bins: int = 10) -> float:
    probs, labels = _check(probs, labels)
    conf, hit = _confidence(probs, labels)
    _check_bins(bins)
    order = conf.argsort(stable=True)
    per_bin = max(1, len(conf) // bins)
    index = torch.empty_like(order)
    index[order] = (torch.arange(len(conf)) // per_bin).clamp(max=bins - 1)
    count, gap = _gaps(conf, hit, index, bins)
    return float((count / len(conf) * gap).sum())


def classwise_ece(probs, labels, bins: int = 10) -> float:
    probs, labels = _check(probs, labels)
    total = 0.0
    for k in range(probs.shape[1]):
        p = probs[:, k]
        count, gap = _gaps(p, (labels == k).double(), bin_index(p, bins), bins)
        total += float((count / len(p) * gap).sum())
    return total / probs.shape[1]


def brier(probs, labels) -> float:
    probs, labels = _check(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
    return float((probs - onehot).pow(2).sum(1).mean())


def calibration_report(probs, labels, bins: int = 10) -> dict[str, float]:
    """Every metric above, by name."""
    return {"ece": ece(probs, labels, bins), "mce": mce(probs, labels, bins), "ace": ace(probs, labels, bins),
            "classwise_ece": classwise_ece(probs, labels, bins), "brier": brier(probs, labels)}


def reliability(probs, labels, bins: int = 10) -> list[dict]:
    """One dict per equal-width bin (the bins of `ece`): `lower`, `upper` (its edges), `count`, `confidence` (mean
    max-softmax confidence) and `accuracy` (fraction predicted right); an empty bin has None for the two means."""
    probs, labels = _check(probs, labels)
    conf, hit = _confidence(probs, labels)
    index, edges = bin_index(conf, bins), bin_edges(bins).tolist()
    out = []
    for i in range(bins):
        inside = index == i
        n = int(inside.sum())
        out.append({"lower": edges[i], "upper": edges[i + 1], "count": n,
                    "confidence": float(conf[inside].mean()) if n else None,
                    "accuracy": float(hit[inside].mean()) if n else None})
    return out


def reliability_diagram(probs, labels, path, bins: int = 10, title: str | None = None) -> str:
    """Write a reliability diagram to `path` (PNG): accuracy per confidence bin as bars against the diagonal of
    perfect calibration, each bin's gap to its mean confidence shaded, the bin counts in a histogram below, and the
    ECE in the title. Returns the path. Needs matplotlib (`pip install 'lorakit[plot]'`)."""
    rows = reliability(probs, labels, bins)
    score = ece(probs, labels, bins)
    try:  # a bare Figure draws with Agg and leaves pyplot's backend (a notebook's) alone
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError("reliability_diagram needs matplotlib: pip install 'lorakit[plot]'") from None

    width = 1.0 / bins
    lefts = [r["lower"] for r in rows]
    full = [r for r in rows if r["count"]]
    fig = Figure(figsize=(5, 6))
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar([r["lower"] for r in full], [r["accuracy"] for r in full], width=width, align="edge",
            color="tab:blue", edgecolor="black", label="accuracy")
    gap_low = [min(r["accuracy"], r["confidence"]) for r in full]
    gap_size = [abs(r["accuracy"] - r["confidence"]) for r in full]
    top.bar([r["lower"] for r in full], gap_size, bottom=gap_low, width=width, align="edge", color="tab:red",
            alpha=0.3, hatch="//", edgecolor="tab:red", label="gap to mean confidence")
    top.plot([0, 1], [0, 1], ls="--", color="gray", label="perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
    top.legend(loc="upper left", fontsize=8)
    top.set_title(f"{title + ' — ' if title else ''}ECE {score:.4f} ({bins} bins, {sum(r['count'] for r in rows)} "
                  f"predictions)", fontsize=10)
    bottom.bar(lefts, [r["count"] for r in rows], width=width, align="edge", color="gray", edgecolor="black")
    bottom.set(xlabel="confidence (max probability)", ylabel="count")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return str(path)
