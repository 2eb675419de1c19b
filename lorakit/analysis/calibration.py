"""Calibration metrics of a classifier's predicted probabilities (as in the HypeLoRA paper, arXiv 2603.19278).

All take `probs` (N, K) class probabilities (rows sum to 1; use `torch.softmax(logits, -1)`) and `labels` (N,)
integer classes, and use the max-softmax confidence unless said otherwise:
- ECE: Σ_b (|b|/N)·|acc_b − conf_b| over `bins` equal-width confidence bins ((i−1)/M, i/M], 0 in the first;
- MCE: max over non-empty bins of |acc_b − conf_b|;
- ACE: the same sum over equal-mass bins (sorted by confidence, N // bins per bin, the last takes the remainder);
- classwise ECE: for each class k, ECE of p_k against 1[label = k] over equal-width bins; averaged over classes;
- Brier: mean over examples of Σ_k (p_k − 1[label = k])².
(The paper's thresholded ACE is not implemented.)
"""
from __future__ import annotations

import torch

from ..errors import DataError


def _check(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    probs, labels = torch.as_tensor(probs, dtype=torch.float64), torch.as_tensor(labels)
    if probs.dim() != 2 or labels.shape != probs.shape[:1] or len(labels) == 0:
        raise DataError(f"expected probs (N, K) and labels (N,) with N ≥ 1, got {tuple(probs.shape)} and "
                         f"{tuple(labels.shape)}")
    return probs, labels.long()


def _confidence(probs, labels):
    conf, pred = probs.max(1)
    return conf, (pred == labels).double()


def _equal_width(conf: torch.Tensor, bins: int) -> torch.Tensor:
    return (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)


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
    count, gap = _gaps(conf, hit, _equal_width(conf, bins), bins)
    return float((count / len(conf) * gap).sum())


def mce(probs, labels, bins: int = 10) -> float:
    probs, labels = _check(probs, labels)
    conf, hit = _confidence(probs, labels)
    count, gap = _gaps(conf, hit, _equal_width(conf, bins), bins)
    return float(gap[count > 0].max())


def ace(probs, labels, bins: int = 10) -> float:
    probs, labels = _check(probs, labels)
    conf, hit = _confidence(probs, labels)
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
        count, gap = _gaps(p, (labels == k).double(), _equal_width(p, bins), bins)
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
