"""Interference between adapters before merging them: where two ΔW share directions and where they fight.

Per layer both adapters hold, for ΔW₁ = s₁B₁A₁ and ΔW₂ = s₂B₂A₂:
- `cosine`: ⟨ΔW₁, ΔW₂⟩_F / (‖ΔW₁‖_F‖ΔW₂‖_F), from the factors (s₁s₂·Σ (B₁ᵀB₂) ⊙ (A₁A₂ᵀ));
- `out_angles` / `in_angles`: principal angles (degrees, ascending) between the two column spaces (output
  directions) and the two row spaces (input directions) of the ΔW, from orthonormal bases of the factors' SVDs;
  `out_overlap` / `in_overlap` = mean cos² of those angles (1: the same subspace, 0: orthogonal);
- `sign_conflict`: among the entries where both ΔW are non-zero, the share with opposite signs, and
  `sign_conflict_top`: the same among the entries both keep after TIES-style trimming to the `density` largest
  magnitudes (the entries a TIES merge actually votes on).

Nearly orthogonal adapters (overlap ≈ 0, cosine ≈ 0) add without interfering: a plain sum works. A high sign
conflict on overlapping subspaces is the case TIES (sign election) and DARE (drop and rescale) were designed for.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch

from ..errors import ConfigError
from ..rank.squeeze import factor_svd, folder_factors


def orthonormal_basis(vectors: torch.Tensor, sigma: torch.Tensor, tol: float = 1e-10) -> torch.Tensor:
    """The columns of `vectors` whose singular value exceeds tol·σ₁ (a basis of the range)."""
    keep = sigma > tol * (float(sigma[0]) if len(sigma) else 0.0)
    return vectors[:, keep]


def principal_angles(q1: torch.Tensor, q2: torch.Tensor) -> torch.Tensor:
    """Principal angles in degrees (ascending) between the spans of two orthonormal column sets."""
    if q1.shape[1] == 0 or q2.shape[1] == 0:
        return torch.empty(0, dtype=torch.float64)
    cos = torch.linalg.svdvals(q1.double().T @ q2.double()).clamp(0, 1)
    return torch.rad2deg(torch.arccos(cos))


def sign_conflict(d1: torch.Tensor, d2: torch.Tensor, density: float = 0.2) -> tuple[float, float]:
    """(share of opposite signs where both are non-zero, the same among both adapters' top-`density` entries)."""
    def top(d):
        k = max(1, int(round(density * d.numel())))
        threshold = d.abs().flatten().kthvalue(d.numel() - k + 1).values
        return d.abs() >= threshold
    both = (d1 != 0) & (d2 != 0)
    opposite = torch.sign(d1) != torch.sign(d2)
    kept = both & top(d1) & top(d2)
    share = float((opposite & both).sum()) / max(int(both.sum()), 1)
    share_top = float((opposite & kept).sum()) / max(int(kept.sum()), 1)
    return share, share_top


def layer_interference(first: tuple, second: tuple, density: float = 0.2) -> dict:
    """The numbers above for one layer; `first` / `second` = (A (r, in), B (out, r), scale)."""
    (a1, b1, s1), (a2, b2, s2) = [(a.detach().double(), b.detach().double(), float(s)) for a, b, s in (first, second)]
    if a1.shape[1] != a2.shape[1] or b1.shape[0] != b2.shape[0]:
        raise ConfigError(f"the two adapters' ΔW differ in shape: {(b1.shape[0], a1.shape[1])} and "
                          f"{(b2.shape[0], a2.shape[1])}")
    svd1, svd2 = factor_svd(a1, b1, s1), factor_svd(a2, b2, s2)
    inner = s1 * s2 * float(((b1.T @ b2) * (a1 @ a2.T)).sum())
    norms = math.sqrt(svd1.total * svd2.total)
    out_angles = principal_angles(orthonormal_basis(svd1.u, svd1.s), orthonormal_basis(svd2.u, svd2.s))
    in_angles = principal_angles(orthonormal_basis(svd1.v, svd1.s), orthonormal_basis(svd2.v, svd2.s))
    conflict, conflict_top = sign_conflict(s1 * b1 @ a1, s2 * b2 @ a2, density)
    return {"cosine": inner / norms if norms > 0 else 0.0,
            "out_angles": out_angles.tolist(), "in_angles": in_angles.tolist(),
            "out_overlap": _overlap(out_angles), "in_overlap": _overlap(in_angles),
            "sign_conflict": conflict, "sign_conflict_top": conflict_top}


def _overlap(angles: torch.Tensor) -> float:
    return float(torch.cos(torch.deg2rad(angles)).pow(2).mean()) if len(angles) else 0.0


def folder_layers(directory: str | Path) -> dict[str, tuple]:
    """{path: (A, B, scale)} of a plain LoRA folder."""
    from ..io import read_adapter

    config, tensors = read_adapter(directory)
    if config.variant != "lora" or config.use_dora:
        raise ConfigError(f"{directory}: interference reads plain LoRA folders (ΔW = s·B·A); this one holds "
                          f"{config.variant}{' with DoRA' if config.use_dora else ''}")
    pairs = folder_factors(config, tensors)
    return {path: (a.float(), b.float(), config.scale_for(path)) for path, a, b, _, _ in pairs}


def interference(folders: dict[str, str | Path], density: float = 0.2) -> dict:
    """Every pair of the named adapter folders: {"pairs": [{"first", "second", "layers": {path: ...}, "summary"}]},
    over the layers both adapt; the summary averages the per-layer numbers."""
    if len(folders) < 2:
        raise ConfigError("interference needs at least two adapters")
    layers = {name: folder_layers(folder) for name, folder in folders.items()}
    pairs = []
    for first, second in itertools.combinations(layers, 2):
        shared = [p for p in layers[first] if p in layers[second]]
        if not shared:
            raise ConfigError(f"adapters {first!r} and {second!r} adapt no common layer")
        rows = {p: layer_interference(layers[first][p], layers[second][p], density) for p in shared}
        keys = ("cosine", "out_overlap", "in_overlap", "sign_conflict", "sign_conflict_top")
        summary = {k: sum(r[k] for r in rows.values()) / len(rows) for k in keys}
        summary["layers"] = len(rows)
        pairs.append({"first": first, "second": second, "layers": rows, "summary": summary})
    return {"density": density, "pairs": pairs}
