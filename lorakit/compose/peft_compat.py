"""PEFT 0.21.2's `add_weighted_adapter` semantics, as named compatibility methods (reproduce its numbers).

- Factor level (`peft_linear`, `peft_ties`, `peft_dare_linear`, `peft_dare_ties`, `peft_magnitude_prune`): the A's
  and the B's are combined *separately*, A with weights sign(wᵢsᵢ)·√|wᵢsᵢ| and B with √|wᵢsᵢ|, by the same
  element-wise rule (TIES votes on the unweighted trimmed factors, divides by the count). The product holds the cross
  terms BᵢAⱼ, so this is not Σ wᵢΔWᵢ; ranks must be equal.
- `peft_svd`: Σ wᵢΔWᵢ densely in the adapters' dtype, then a full SVD: B = U_k·Σ_k, A = V_kᵀ with k = the target
  rank or the largest source rank (one k for every layer, as PEFT).
The new adapter's scale is 1: PEFT writes alpha = r but copies the first adapter's `use_rslora`, which makes its own
result √r too large; lorakit writes scale 1 with rsLoRA off.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..errors import MergeError
from .layers import Part
from .sparsify import merge_dense

FACTOR_METHODS = {"peft_linear": "linear", "peft_ties": "ties", "peft_dare_linear": "dare_linear",
                  "peft_dare_ties": "dare_ties", "peft_magnitude_prune": "magnitude_prune"}


def factor_level(method: str, parts: list[Part], path: str, density: Optional[float],
                 generator: Optional[torch.Generator], sign_method: str = "total") -> tuple:
    """(A, B, info) of PEFT's factor-level `method` on one layer."""
    ranks = {p.a.shape[0] for p in parts}
    if len(ranks) > 1:
        raise MergeError(f"{method} combines A and B entry by entry, so every adapter needs the same rank on "
                         f"{path}; got ranks {sorted(ranks)}. Use an exact method (linear, cat) instead")
    signed = [math.copysign(math.sqrt(abs(p.weight * p.scale)), p.weight * p.scale) for p in parts]
    plain = [math.sqrt(abs(p.weight * p.scale)) for p in parts]
    dtype = parts[0].a.dtype
    kind = FACTOR_METHODS[method]
    if kind == "linear":
        a = sum(w * p.a for w, p in zip(signed, parts))
        b = sum(w * p.b for w, p in zip(plain, parts))
        return a.to(dtype), b.to(dtype), {}
    options = dict(density=density, generator=generator, sign="unweighted", sign_method=sign_method, divide="count")
    a, info_a = merge_dense(kind, [p.a for p in parts], signed, **options)
    b, info_b = merge_dense(kind, [p.b for p in parts], plain, **options)
    return a, b, {"kept_A": info_a["kept"], "kept_B": info_b["kept"]}


def svd_level(parts: list[Part], rank: int, dtype: torch.dtype = torch.float32) -> tuple:
    """(A, B, info) of PEFT's "svd": the dense weighted sum in `dtype`, full SVD, B = U_k Σ_k, A = V_kᵀ."""
    deltas = torch.stack([(p.b.to(dtype) @ p.a.to(dtype)) * p.scale for p in parts])
    weights = torch.tensor([p.weight for p in parts], dtype=dtype).reshape(-1, 1, 1)
    delta = (deltas * weights).sum(0)
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)
    k = min(rank, len(s))
    kept = float(s[:k].double().pow(2).sum())
    total = float(s.double().pow(2).sum())
    error = math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0
    return vh[:k].double(), (u[:, :k] @ torch.diag(s[:k])).double(), {"error": error}
