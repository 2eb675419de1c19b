"""Exact delta-space merging of LoRA adapters (training.md §9b; the combining issue's item 1).

The merged change of each layer is ΔW = Σᵢ wᵢ·ΔWᵢ with ΔWᵢ = sᵢ·Bᵢ·Aᵢ, every adapter's own scale sᵢ (α/r, α/√r
with rsLoRA, rank and alpha patterns) folded in exactly once. It is built from the factors, never as a dense
(out × in) matrix:
- "cat": A = [A₁; A₂; …], B = [w₁s₁B₁, w₂s₂B₂, …] — exact, rank Σrᵢ;
- "linear": the same sum re-factored by the QR of the stacked factors and an SVD of the small core
  (`lorakit.rank.squeeze.factor_svd`): exact at its numerical rank, or the optimal rank-k approximation
  (Eckart–Young) with `target_rank` or `energy`, the truncation error reported per layer.
Unlike PEFT's `add_weighted_adapter` ("linear" / "ties" / ... on A and B separately), there are no cross terms
BᵢAⱼ, negative weights (task negation) work, ranks may differ, and target sets may differ (a layer takes the
adapters that have it). The result is a plain PEFT LoRA at scale 1 (alpha = rank per layer, rsLoRA off; per-layer
ranks in `rank_pattern`).

Inputs are PEFT LoRA folders (read, never modified). Refused with the reason: DoRA (its magnitude renormalises
each row of W + ΔW: a sum of DoRA changes is not one; fold it into the base with `lorakit merge` instead), other
lorakit variants (`lorakit export` them to a plain LoRA first), trained module copies (`modules_to_save`: two heads
do not add up), and layers whose shapes disagree.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import ConfigError, MergeError

METHODS = ("cat", "linear")
PAIRS = (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B"))
NUMERICAL_ZERO = 1e-12  # "linear" without a rank keeps singular values above this fraction of the largest


def merge_folders(sources: Sequence[str | os.PathLike], weights: Sequence[float], output_dir: str | os.PathLike,
                  method: str = "linear", target_rank: Optional[int] = None,
                  energy: Optional[float] = None) -> dict[str, dict]:
    """Merge the PEFT LoRA folders `sources` with `weights` into a new folder `output_dir` (must not exist or be
    empty). Returns the per-layer report {path: {"rank", "error"}} (`error`: ‖ΔW − merged‖_F / ‖ΔW‖_F, 0 when
    exact)."""
    from ..io.files import read_adapter, write_folder
    from ..rank.squeeze import plain_config

    _check_options(sources, weights, method, target_rank, energy)
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output folder {out} exists and is not empty; choose another")
    adapters = [(str(s), *read_adapter(s)) for s in sources]
    for where, config, tensors in adapters:
        _check_mergeable(where, config, tensors)
    terms = _layer_terms(adapters, weights)
    merged, report = {}, {}
    for path, (kind, shapes, a_parts, b_parts) in terms.items():
        a, b = torch.cat(a_parts), torch.cat(b_parts, dim=1)  # ΔW = B·A exactly (float64)
        a, b, error = (a, b, 0.0) if method == "cat" else _refactor(a, b, target_rank, energy)
        a_key, b_key = PAIRS[kind]
        k = a.shape[0]
        merged[f"{path}.{a_key}"] = a.reshape(k, *shapes[0][1:]).float().contiguous()
        merged[f"{path}.{b_key}"] = b.reshape(shapes[1][0], k, *shapes[1][2:]).float().contiguous()
        report[path] = {"rank": k, "error": error}
    first = adapters[0][1]
    write_folder(out, plain_config({p: r["rank"] for p, r in report.items()}, first), merged)
    return report


def _check_options(sources, weights, method, target_rank, energy) -> None:
    if method not in METHODS:
        raise ConfigError(f"method must be one of {list(METHODS)}, got {method!r}")
    if not sources:
        raise ConfigError("give at least one adapter folder to merge")
    if len(weights) != len(sources):
        raise ConfigError(f"{len(sources)} adapters need {len(sources)} weights, got {len(weights)}")
    if any(isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) for w in weights):
        raise ConfigError(f"weights must be finite numbers, got {list(weights)}")
    if method == "cat" and (target_rank is not None or energy is not None):
        raise ConfigError("method 'cat' is exact at rank Σrᵢ; a target rank or energy needs method 'linear'")
    if target_rank is not None and energy is not None:
        raise ConfigError("give at most one of target_rank and energy")
    if target_rank is not None and (isinstance(target_rank, bool) or not isinstance(target_rank, int)
                                    or target_rank < 1):
        raise ConfigError(f"target_rank must be a positive int, got {target_rank!r}")
    if energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"energy must be in (0, 1], got {energy!r}")


def _check_mergeable(where: str, config, tensors: dict) -> None:
    if config.use_dora:
        raise MergeError(f"{where} is a DoRA adapter: its magnitude renormalises each row of W + ΔW, so a weighted sum "
                         f"of DoRA changes is not a DoRA change; fold it into its base with `lorakit merge`, or "
                         f"squeeze it to a plain LoRA on its base first (`lorakit squeeze`)")
    if config.variant != "lora":
        raise MergeError(f"{where} holds a {config.variant!r} adapter; export it to a plain LoRA first "
                         f"(`lorakit export`), then merge")
    copies = sorted(k for k in tensors if not any(k.endswith("." + s) for pair in PAIRS for s in pair))
    if copies:
        raise MergeError(f"{where} carries trained module copies (modules_to_save: {copies[:3]}); two trained "
                         f"heads do not add up, merge adapters without them")


def _layer_terms(adapters, weights) -> dict[str, tuple]:
    """{layer path: (pair index, (A file shape, B file shape), [A_i (r_i, n)], [w_i·s_i·B_i (m, r_i)])}, float64."""
    terms: dict[str, tuple] = {}
    for (where, config, tensors), w in zip(adapters, weights):
        for key, a_file in tensors.items():
            kind = next((i for i, (a_key, _) in enumerate(PAIRS) if key.endswith("." + a_key)), None)
            if kind is None:
                continue
            path = key[: -len(PAIRS[kind][0]) - 1]
            b_file = tensors[f"{path}.{PAIRS[kind][1]}"]
            r = a_file.shape[0]
            a = a_file.reshape(r, -1).double()
            b = b_file.reshape(b_file.shape[0], r).double() * (w * config.scale_for(path))
            shapes = (tuple(a_file.shape), tuple(b_file.shape))
            if path not in terms:
                terms[path] = (kind, shapes, [], [])
            known = terms[path]
            if known[0] != kind or known[1][0][1:] != shapes[0][1:] or known[1][1][0] != shapes[1][0]:
                raise MergeError(f"{where}: layer {path!r} has factors {shapes}, another adapter has {known[1]}; "
                                 f"adapters of different base models do not merge")
            known[2].append(a)
            known[3].append(b)
    if not terms:
        raise ConfigError("the adapters hold no LoRA factors to merge")
    return terms


def _refactor(a: torch.Tensor, b: torch.Tensor, target_rank: Optional[int], energy: Optional[float]):
    """(A', B', relative error) for B·A at its numerical rank, or truncated optimally to `target_rank` / `energy`."""
    from ..rank.squeeze import energy_rank, factor_svd, split_factors

    svd = factor_svd(a, b)
    sigma = svd.s
    if target_rank is not None:
        k = min(target_rank, len(sigma))
    elif energy is not None:
        k = energy_rank(sigma, energy, svd.total)
    else:
        k = max(1, int((sigma > NUMERICAL_ZERO * float(sigma[0])).sum())) if len(sigma) and sigma[0] > 0 else 1
    new_a, new_b = split_factors(svd, k)
    kept = float(sigma[:k].pow(2).sum())
    error = math.sqrt(max(svd.total - kept, 0.0) / svd.total) if svd.total > 0 else 0.0
    return new_a, new_b, error
