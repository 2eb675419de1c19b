"""Element-wise merging of task deltas τᵢ = ΔWᵢ (training.md §9b): TIES, DARE, DELLA, magnitude pruning, Breadcrumbs.

Each function takes the dense deltas of *one layer* (unweighted), their weights wᵢ and explicit options, and returns
the merged dense delta plus what it kept. The steps:
- trim each τᵢ: `magnitude` (top `density` fraction by |τ|, ⌊density·numel⌋ entries, as PEFT and mergekit),
  `random` (DARE: keep each entry with probability `density`, survivors × 1/density), `della` (DELLA's MagPrune:
  within each row, keep probabilities rise linearly with the magnitude rank from density − ε to density + ε,
  survivors × 1/p), `breadcrumbs` (drop the top `gamma` fraction by magnitude as outliers and the smallest, keeping
  `density` in all);
- TIES-style election (ties, dare_ties, della): a sign per entry from Σᵢ wᵢτ̂ᵢ (`sign="weighted"`, so a negative
  weight negates a task) or Σᵢ τ̂ᵢ (`sign="unweighted"`, PEFT), by total mass (`sign_method="total"`) or by count
  (`"frequency"`); ties go to +. Then the disjoint mean of wᵢτ̂ᵢ over the sources whose trimmed entry is non-zero and
  agrees with the sign, divided by their number (`divide="count"`, TIES paper, PEFT) or by the sum of their |wᵢ|
  (`"weight_sum"`, mergekit's normalisation), or not divided (`"none"`);
- linear methods (magnitude_prune, dare_linear, breadcrumbs): Σᵢ wᵢτ̂ᵢ.
The result is multiplied by `lam` (TIES' λ). Randomness comes only from the `generator` given.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import ConfigError

TRIMS = {"ties": "magnitude", "magnitude_prune": "magnitude", "dare_linear": "random", "dare_ties": "random",
         "della": "della", "breadcrumbs": "breadcrumbs"}
ELECTED = ("ties", "dare_ties", "della")
SIGNS, SIGN_METHODS, DIVIDES = ("weighted", "unweighted"), ("total", "frequency"), ("count", "weight_sum", "none")


def trim(t: torch.Tensor, how: str, density: float, generator: Optional[torch.Generator] = None,
         epsilon: float = 0.0, gamma: float = 0.0) -> torch.Tensor:
    """τ trimmed to about `density` of its entries (rescaled survivors for the random trims)."""
    if density >= 1 and how != "breadcrumbs":
        return t.clone()
    if how == "magnitude":
        return t * _top_mask(t.abs(), int(density * t.numel()))
    if how == "random":
        keep = torch.rand(t.shape, generator=generator, dtype=torch.float64, device=t.device) < density
        return t * keep / density
    if how == "della":
        p = _della_probabilities(t, density, epsilon)
        keep = torch.rand(t.shape, generator=generator, dtype=torch.float64, device=t.device) < p
        return torch.where(keep, t / p, torch.zeros_like(t))
    if how == "breadcrumbs":
        n = t.numel()
        keep_n, top_n = int(density * n), int(gamma * n)
        top_n = min(top_n, n - keep_n)
        order = t.abs().flatten().argsort(descending=True, stable=True)
        mask = torch.zeros(n, dtype=torch.bool, device=t.device)
        mask[order[top_n:top_n + keep_n]] = True
        return t * mask.view(t.shape)
    raise ConfigError(f"unknown trim {how!r}")


def _top_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(magnitude.numel(), dtype=torch.bool, device=magnitude.device)
    if k > 0:
        mask[magnitude.flatten().topk(k).indices] = True
    return mask.view(magnitude.shape)


def _della_probabilities(t: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probabilities per entry: density − ε for the smallest |τ| of its row, density + ε for the largest,
    linear in the rank between (one row: a single value keeps density)."""
    rows = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
    ranks = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).to(torch.float64)
    span = max(rows.shape[1] - 1, 1)
    return (density - epsilon + 2 * epsilon * ranks / span).reshape(t.shape)


def elect_sign(trimmed: torch.Tensor, weights: torch.Tensor, sign: str, sign_method: str) -> torch.Tensor:
    """±1 per entry from the stacked trimmed deltas (N, ...): the sign of the total (or of the count of signs) of
    the weighted (or unweighted) deltas; 0 totals give +1."""
    votes = trimmed * _expand(weights, trimmed) if sign == "weighted" else trimmed
    mass = votes.sum(0) if sign_method == "total" else votes.sign().sum(0)
    return torch.where(mass >= 0, 1.0, -1.0).to(trimmed.dtype)


def disjoint_mean(trimmed: torch.Tensor, weights: torch.Tensor, elected: torch.Tensor, divide: str,
                  sign: str) -> torch.Tensor:
    """Σ over agreeing sources of wᵢτ̂ᵢ, divided per entry by their count / Σ|wᵢ| / 1. A source agrees where its
    trimmed entry is non-zero and its (weighted, if `sign` is "weighted") sign equals the elected one."""
    weighted = trimmed * _expand(weights, trimmed)
    agree = (weighted if sign == "weighted" else trimmed).sign() == elected
    total = (weighted * agree).sum(0)
    if divide == "none":
        return total
    per_source = torch.ones_like(weights) if divide == "count" else weights.abs()
    norm = (agree * _expand(per_source, trimmed)).sum(0)
    return torch.where(norm > 0, total / norm.clamp_min(1e-300), torch.zeros_like(total))


def _expand(weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return weights.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def merge_dense(method: str, deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float,
                generator: Optional[torch.Generator] = None, sign: str = "weighted", sign_method: str = "total",
                divide: str = "count", epsilon: float = 0.0, gamma: float = 0.0,
                lam: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Merge one layer's deltas with an element-wise `method` (a key of TRIMS). Returns (merged delta,
    {"kept": fraction of entries each source keeps after trimming, and after the sign election for TIES-style
    methods: "kept_after_vote"})."""
    w = torch.tensor(list(weights), dtype=deltas[0].dtype, device=deltas[0].device)
    trimmed = torch.stack([trim(t, TRIMS[method], density, generator, epsilon, gamma) for t in deltas])
    info = {"kept": [round(float((t != 0).double().mean()), 6) for t in trimmed]}
    if method in ELECTED:
        elected = elect_sign(trimmed, w, sign, sign_method)
        merged = disjoint_mean(trimmed, w, elected, divide, sign)
        signs = (trimmed * _expand(w, trimmed) if sign == "weighted" else trimmed).sign()
        info["kept_after_vote"] = [round(float((s == elected).double().mean()), 6) for s in signs]
    else:
        merged = (trimmed * _expand(w, trimmed)).sum(0)
    return merged * lam, info
