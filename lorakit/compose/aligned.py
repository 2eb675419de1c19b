"""Aligned merging of one layer's LoRA parts (training.md §9a, §9b; the combining issue's item 3).

Both functions take a layer's `Part`s (ΔWᵢ = sᵢ·bᵢ·aᵢ in float64, weight wᵢ; ranks may differ, weights may be
negative) and return (a (k, in), b (out, k), info) with the merged ΔW = b·a at scale 1. The parts are never modified.

**LoRA-LEGO** (`lego`; Zhao et al., ICLR 2025, arXiv 2409.16167). A rank component ("minimal semantic unit") of
source i is the pair (βⱼ, αⱼ) = (wᵢ·sᵢ·bᵢ[:, j], aᵢ[j, :]): the weight and the scale are folded into the b half,
as in `Part.weighted()`, so Σ over all units of βⱼαⱼᵀ = Σᵢ wᵢΔWᵢ (concatenation–summation equivalence). With
`gauge=True` (default) each unit is first put in a canonical gauge, which leaves βαᵀ unchanged: balanced,
(c·β, α/c) with c = √(‖α‖/‖β‖) so that both halves have norm √(‖β‖‖α‖), then both halves negated if the
largest-magnitude entry of [β; α] (first on ties) is negative. This makes the clustering independent of how each
source split its scale between A and B, of the sign of each unit, and of where the weight was folded. Each unit is
embedded as xⱼ = [βⱼ; αⱼ] ∈ R^{out+in}; the pool is put in a canonical order (lexicographic on xⱼ), so the result
does not depend on the order of ranks or of sources; then seeded k-means (k-means++ seeding, Lloyd iterations, the
best of `n_init` runs by inertia; an empty cluster takes the point farthest from its centre) into k clusters. Each
centroid (β̄_c, ᾱ_c) becomes one unit of the merged LoRA:

    ΔW = γ · Σ_c m_c · β̃_c α̃_cᵀ

- parameter reweighting ("norm decay", `norm_correction`): a mean of units that are not collinear is shorter than
  its members, so each half of a centroid is rescaled to the mean norm of its members' halves:
  β̃_c = β̄_c · mean_{j∈c}‖βⱼ‖ / ‖β̄_c‖, and likewise α̃_c (a half that averaged to zero stays zero);
- output reweighting ("variance expansion", `output_correction`): the output of a LoRA is a sum of rank-one terms,
  whose variance grows with the number of terms, so a merged LoRA of k units built from units of a typical source's
  size has an output variance about k / r̄ times a source's; γ = √(r̄ / k), with r̄ the mean rank of the sources
  on this layer;
- m_c = 1 (`mass=False`, the paper's assembly: each centroid is one unit, so the merge behaves like an average of
  the sources, like the TIES disjoint mean), or m_c = |c| (`mass=True`: a centroid stands in for its |c| members,
  so clusters of identical units give back Σᵢ wᵢΔWᵢ).
The paper names both reweightings; its exact formulas were not reachable from here (only the abstract and
introduction of the stored copies), so both formulas above are this module's reading [U] and are recorded in `info`.
With k = the number of units and both corrections off, every unit is its own cluster and ΔW = Σᵢ wᵢΔWᵢ exactly.

**KnOTS** (`knots`; Stoica et al., ICLR 2025, arXiv 2410.19735; github.com/gstoica27/KnOTS `task_merger.py`
`SVDMerger.apply_svd` / `merge`, `masking_ops.py`). The SVD of the concatenated task updates
[ΔW₁ … ΔW_N] = U Σ [V₁ᵀ … V_Nᵀ] (ΔWᵢ = sᵢbᵢaᵢ, unweighted, as the authors decompose fine-tuned − base) gives a
shared basis U and per-task coefficient blocks Cᵢ = Σ Vᵢᵀ (K × in, so ΔWᵢ = U·Cᵢ exactly); the blocks are merged
element-wise with the weights, and ΔW = U·C_merged. The SVD is computed from the factors:
[s₁B₁A₁ … s_NB_NA_N] = [s₁B₁ … s_NB_N]·blockdiag(A₁ … A_N); QR of the stacked B's and of each Aᵢᵀ, SVD of the small
core R_B·blockdiag(R_Aᵢ)ᵀ; singular values ≤ `rtol`·σ_max are dropped (the authors drop s ≤ 1e-5 absolute). So K ≤
Σrᵢ and nothing dense of size out × (N·in) is formed. Inner merges (`inner`), on the coefficient blocks:
- "ta": Σᵢ wᵢCᵢ (task arithmetic; then ΔW = Σᵢ wᵢΔWᵢ exactly, the basis is lossless);
- "ties": keep the top ⌊density·K·in⌋ entries of each Cᵢ by magnitude, elect a sign per entry, then the disjoint
  mean of the wᵢĈᵢ that agree with it (the authors' `ties_masking` + `masked_merge(merging_type="mean")`);
- "dare_linear" / "dare_ties": keep each entry with probability `density` (survivors × 1/density; the authors'
  `apply_dare` on the scaled coefficients Σ·Vᵢᵀ), then sum (linear) or elect and take the disjoint mean (ties; the
  authors' KnOTS-DARE-TIES configs use DARE then TIES with topK = 100, i.e. no magnitude trim);
- "magnitude_prune": the magnitude trim, then Σᵢ wᵢĈᵢ.
The sign vote (`sign`: on the weighted wᵢĈᵢ, so a negative weight negates a task, or on the unweighted Ĉᵢ as the
authors; `sign_method`: "total" mass as the authors' "sum_of_values", or "frequency" of signs; zero totals go to +),
the divisor (`divide`: "count" as the authors' mean, "weight_sum" Σ|wᵢ| of the agreeing sources, or "none") and the
seed are explicit and recorded in `info`. The result is multiplied by `lam` (the authors' scaling coefficient; the
weights already are per-task coefficients, so it defaults to 1). Differences from the authors' code, by design: the
magnitude trim is per layer (theirs is over the whole model's concatenated coefficients, which a per-layer function
cannot see), and the weights are per task (their `masked_merge` multiplies every task by `weights[0]`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from .sparsify import DIVIDES, SIGN_METHODS, SIGNS, merge_dense

INNER = ("ta", "ties", "dare_linear", "dare_ties", "magnitude_prune")
RTOL = 1e-12  # singular values at or below this fraction of the largest are numerical zeros


# ---- checks ---------------------------------------------------------------------------------------------------

def _check_parts(parts: Sequence) -> tuple[int, int]:
    if not parts:
        raise ConfigError("a merge needs at least one part")
    out, inp = parts[0].b.shape[0], parts[0].a.shape[1]
    for i, p in enumerate(parts):
        if p.a.dim() != 2 or p.b.dim() != 2 or p.a.shape[0] != p.b.shape[1]:
            raise ConfigError(f"part {i}: a {tuple(p.a.shape)} and b {tuple(p.b.shape)} are not (r, in) and (out, r)")
        if p.b.shape[0] != out or p.a.shape[1] != inp:
            raise ConfigError(f"part {i} has ΔW of shape {(p.b.shape[0], p.a.shape[1])}, part 0 has {(out, inp)}")
        for name in ("scale", "weight"):
            v = getattr(p, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"part {i}: {name} must be a finite number, got {v!r}")
    return out, inp


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"option {name} must be an integer ≥ 1, got {v!r}")
    return v


def _generator(generator) -> Optional[torch.Generator]:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ConfigError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return generator


# ---- LoRA-LEGO ------------------------------------------------------------------------------------------------

def lego(parts: Sequence, k: int, *, generator: Optional[torch.Generator] = None, gauge: bool = True,
         norm_correction: bool = True, output_correction: bool = True, mass: bool = False, iters: int = 100,
         n_init: int = 4) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """LoRA-LEGO merge of one layer's parts into k units (k is clamped to the number of units). Returns
    (a (k, in), b (out, k), info) with ΔW = b·a. `generator` seeds k-means (None: a generator seeded 0).
    info: k, k_requested, units, sizes (members per merged unit), inertia, iterations, and the options and
    factors applied (norm_factors per cluster (b half, a half), output_scale γ, reference_rank r̄, mass, seed)."""
    out, inp = _check_parts(parts)
    k = _positive_int("k", k)
    iters, n_init = _positive_int("iters", iters), _positive_int("n_init", n_init)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    generator = _generator(generator)
    betas = torch.cat([p.b * (p.scale * p.weight) for p in parts], dim=1).T  # (U, out), weight and scale folded
    alphas = torch.cat([p.a for p in parts], dim=0)  # (U, in)
    if gauge:
        betas, alphas = _gauge(betas, alphas)
    x = torch.cat([betas, alphas], dim=1)
    order = _canonical_order(x)
    x, betas, alphas = x[order], betas[order], alphas[order]
    units = x.shape[0]
    k_used = min(k, units)
    labels, centres, inertia, steps = _kmeans(x, k_used, generator, iters, n_init)
    sizes = torch.bincount(labels, minlength=k_used)
    b_bar, a_bar = centres[:, :out], centres[:, out:]
    norm_factors = []
    if norm_correction:
        b_bar, a_bar = b_bar.clone(), a_bar.clone()
        for c in range(k_used):
            members = labels == c
            fb = _rescale(b_bar[c], betas[members].norm(dim=1).mean())
            fa = _rescale(a_bar[c], alphas[members].norm(dim=1).mean())
            b_bar[c] *= fb
            a_bar[c] *= fa
            norm_factors.append((fb, fa))
    ref_rank = sum(p.a.shape[0] for p in parts) / len(parts)
    gamma = math.sqrt(ref_rank / k_used) if output_correction else 1.0
    m = sizes.to(x.dtype) if mass else torch.ones(k_used, dtype=x.dtype, device=x.device)
    b = (b_bar * (gamma * m)[:, None]).T.contiguous()  # (out, k)
    a = a_bar.contiguous()  # (k, in)
    info = {"k": k_used, "k_requested": k, "units": units, "sizes": [int(s) for s in sizes],
            "inertia": inertia, "iterations": steps, "gauge": gauge, "norm_correction": norm_correction,
            "norm_factors": norm_factors, "output_correction": output_correction, "output_scale": gamma,
            "reference_rank": ref_rank, "mass": mass, "seed": generator.initial_seed()}
    return a, b, info


def _gauge(betas: torch.Tensor, alphas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each unit balanced (‖β‖ = ‖α‖, same βαᵀ) and its sign fixed (largest-|entry| of [β; α] positive)."""
    nb, na = betas.norm(dim=1), alphas.norm(dim=1)
    live = (nb > 0) & (na > 0)
    c = torch.where(live, (na / nb.where(live, torch.ones_like(nb))).sqrt(), torch.zeros_like(nb))
    betas = betas * c[:, None]
    alphas = torch.where(live[:, None], alphas / c.where(live, torch.ones_like(c))[:, None], torch.zeros_like(alphas))
    x = torch.cat([betas, alphas], dim=1)
    top = x.gather(1, x.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    sign = torch.where(top < 0, -1.0, 1.0).to(x.dtype)
    return betas * sign[:, None], alphas * sign[:, None]


def _canonical_order(x: torch.Tensor) -> torch.Tensor:
    """Lexicographic order of the rows (first column most significant): a pool's order then does not matter."""
    keys = x.detach().cpu().numpy()
    return torch.as_tensor(np.lexsort(keys.T[::-1]), device=x.device)


def _rescale(v: torch.Tensor, target: torch.Tensor) -> float:
    n = float(v.norm())
    return float(target) / n if n > 0 else 1.0


def _kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iters: int,
            n_init: int) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """Best of n_init seeded k-means runs: (labels (U,), centres (k, D), inertia, Lloyd iterations of the best).
    All distances come from the Gram matrix of the U units (centres are means of units), so a run costs U×U work,
    not U×k×(out+in)."""
    gram = (x @ x.T).cpu()
    sq = gram.diagonal().clone()
    pair = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)  # ‖xᵢ − xⱼ‖²
    best = None
    for _ in range(n_init):
        labels = pair[:, _kmeans_pp(pair, k, generator)].argmin(dim=1)
        steps = 0
        for steps in range(1, iters + 1):
            labels, dist = _assign(gram, sq, labels, k)
            new = dist.argmin(dim=1)
            if torch.equal(new, labels):
                break
            labels = new
        labels, dist = _assign(gram, sq, labels, k)
        inertia = float(dist.gather(1, labels[:, None]).sum())
        if best is None or inertia < best[2]:
            best = (labels, inertia, steps)
    labels, inertia, steps = best
    member = _membership(labels, k).to(device=x.device, dtype=x.dtype)
    return labels.to(x.device), member @ x, inertia, steps


def _kmeans_pp(pair: torch.Tensor, k: int, generator: torch.Generator) -> list[int]:
    """k-means++ seeding: the first centre uniform, each next one with probability ∝ squared distance to the
    nearest chosen centre (uniform over the points not yet chosen when every distance is zero)."""
    n = pair.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    d2 = pair[chosen[0]].clone()
    for _ in range(1, k):
        probs = d2.clone()
        probs[chosen] = 0
        if float(probs.sum()) <= 0:
            probs = torch.ones(n, dtype=torch.float64)
            probs[chosen] = 0
        nxt = int(torch.multinomial(probs, 1, generator=generator))
        chosen.append(nxt)
        d2 = torch.minimum(d2, pair[nxt])
    return chosen


def _membership(labels: torch.Tensor, k: int) -> torch.Tensor:
    """(k, U): row c holds 1/|c| at the members of cluster c, so row c times the units is its mean."""
    m = torch.zeros(k, labels.shape[0], dtype=torch.float64)
    m[labels, torch.arange(labels.shape[0])] = 1.0
    return m / m.sum(1, keepdim=True).clamp_min(1)


def _assign(gram: torch.Tensor, sq: torch.Tensor, labels: torch.Tensor,
            k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, squared distances (U, k) to the cluster means). An empty cluster first takes the point farthest
    from its own mean (from a cluster of two or more), so every cluster keeps a member."""
    labels = labels.clone()
    while True:
        m = _membership(labels, k)
        gm = gram @ m.T  # (U, k): ⟨xⱼ, μ_c⟩
        dist = (sq[:, None] - 2 * gm + (m @ gm).diagonal()[None, :]).clamp_min(0)
        sizes = torch.bincount(labels, minlength=k)
        empty = (sizes == 0).nonzero().flatten()
        if len(empty) == 0:
            return labels, dist
        own = dist.gather(1, labels[:, None]).squeeze(1)
        own[sizes[labels] <= 1] = -1  # never empty another cluster
        labels[int(own.argmax())] = int(empty[0])


# ---- KnOTS ----------------------------------------------------------------------------------------------------

def knots(parts: Sequence, *, inner: str = "ta", density: Optional[float] = None,
          generator: Optional[torch.Generator] = None, sign: str = "weighted", sign_method: str = "total",
          divide: str = "count", lam: float = 1.0, rtol: float = RTOL) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """KnOTS merge of one layer's parts: shared SVD basis of the concatenated ΔWᵢ, `inner` merge of the coefficient
    blocks. Returns (a (k, in), b (out, k), info) with ΔW = b·a, k ≤ Σrᵢ (a balanced split of U·C_merged, numerical
    zeros dropped). `density` is required for every inner merge but "ta" (and refused for it); DARE needs a
    `generator`. info: inner, density, sign, sign_method, divide, lam, seed, basis_rank (K), rank, kept (fraction of
    coefficients each task keeps after trimming) and, for the TIES-style merges, kept_after_vote."""
    out, inp = _check_parts(parts)
    _check_knots(inner, density, generator, sign, sign_method, divide, lam, rtol)
    u, coeffs = shared_basis(parts, rtol)  # (out, K), (N, K, in)
    w = torch.tensor([float(p.weight) for p in parts], dtype=coeffs.dtype, device=coeffs.device)
    merged, kept = merge_coefficients(inner, coeffs, w, density, generator, sign, sign_method, divide)
    merged = merged * lam
    a, b = _balanced(u, merged, rtol)
    info = {"inner": inner, "density": density, "sign": sign, "sign_method": sign_method, "divide": divide,
            "lam": lam, "seed": None if generator is None else generator.initial_seed(),
            "basis_rank": u.shape[1], "rank": a.shape[0] if bool((a != 0).any()) else 0, **kept}
    return a, b, info


def _check_knots(inner, density, generator, sign, sign_method, divide, lam, rtol) -> None:
    if inner not in INNER:
        raise ConfigError(f"option inner must be one of {list(INNER)}, got {inner!r}")
    if inner == "ta":
        if density is not None:
            raise ConfigError("inner 'ta' keeps every coefficient; a density needs 'ties', 'dare_*' or "
                              "'magnitude_prune'")
    elif (density is None or isinstance(density, bool) or not isinstance(density, (int, float))
          or not 0 < density <= 1):
        raise ConfigError(f"inner {inner!r} needs a density in (0, 1], got {density!r}")
    _generator(generator)
    if inner.startswith("dare") and generator is None:
        raise ConfigError(f"inner {inner!r} drops coefficients at random: give a seeded torch.Generator")
    if sign not in SIGNS:
        raise ConfigError(f"option sign must be one of {list(SIGNS)}, got {sign!r}")
    if sign_method not in SIGN_METHODS:
        raise ConfigError(f"option sign_method must be one of {list(SIGN_METHODS)}, got {sign_method!r}")
    if divide not in DIVIDES:
        raise ConfigError(f"option divide must be one of {list(DIVIDES)}, got {divide!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise ConfigError(f"option lam must be a finite number, got {lam!r}")
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 <= rtol < 1:
        raise ConfigError(f"option rtol must be in [0, 1), got {rtol!r}")


def shared_basis(parts: Sequence, rtol: float = RTOL) -> tuple[torch.Tensor, torch.Tensor]:
    """(U (out, K), C (N, K, in)) with sᵢ·bᵢ·aᵢ = U·Cᵢ: the SVD [ΔW₁ … ΔW_N] = U Σ [V₁ᵀ … V_Nᵀ] from the factors,
    Cᵢ = Σ Vᵢᵀ, singular values ≤ rtol·σ_max dropped."""
    q_b, r_b = torch.linalg.qr(torch.cat([p.b * p.scale for p in parts], dim=1))  # (out, p), (p, R)
    q_as, r_as = zip(*(torch.linalg.qr(p.a.T) for p in parts))  # (in, qᵢ), (qᵢ, rᵢ)
    rows, cols = sum(r.shape[0] for r in r_as), sum(r.shape[1] for r in r_as)
    r_a = torch.zeros(rows, cols, dtype=r_b.dtype, device=r_b.device)  # blockdiag(R_Aᵢ)
    i = j = 0
    for r in r_as:
        r_a[i:i + r.shape[0], j:j + r.shape[1]] = r
        i, j = i + r.shape[0], j + r.shape[1]
    u_c, s, vh_c = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    keep = s > rtol * s[0] if len(s) and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    if not bool(keep.any()):
        keep[:1] = True  # all-zero updates: one (zero) direction keeps the shapes valid
    u_c, s, vh_c = u_c[:, keep], s[keep], vh_c[keep]
    blocks, i = [], 0
    for q in q_as:
        blocks.append(s[:, None] * (vh_c[:, i:i + q.shape[1]] @ q.T))  # Σ Vᵢᵀ = Σ (Q_Aᵢ V_c,ᵢ)ᵀ, (K, in)
        i += q.shape[1]
    return q_b @ u_c, torch.stack(blocks)


def merge_coefficients(inner: str, coeffs: torch.Tensor, weights: torch.Tensor, density: Optional[float],
                       generator: Optional[torch.Generator], sign: str = "weighted", sign_method: str = "total",
                       divide: str = "count") -> tuple[torch.Tensor, dict]:
    """Element-wise merge of stacked coefficient blocks (N, K, in) with weights (N,): (merged (K, in), what was kept),
    by the same rules as the ΔW-level merges (`sparsify.merge_dense`)."""
    if inner == "ta":
        return (coeffs * weights.reshape(-1, 1, 1).to(coeffs.dtype)).sum(0), {}
    return merge_dense(inner, list(coeffs), weights.tolist(), density, generator, sign, sign_method, divide)


def _balanced(u: torch.Tensor, merged: torch.Tensor, rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with b·a = U·M, split evenly through the SVD of the small M (K, in); numerical zeros dropped."""
    uu, s, vh = torch.linalg.svd(merged, full_matrices=False)
    keep = s > rtol * s[0] if s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    if not bool(keep.any()):
        return torch.zeros(1, merged.shape[1], dtype=merged.dtype, device=merged.device), \
            torch.zeros(u.shape[0], 1, dtype=u.dtype, device=u.device)
    root = s[keep].sqrt()
    return (root[:, None] * vh[keep]).contiguous(), ((u @ uu[:, keep]) * root).contiguous()
