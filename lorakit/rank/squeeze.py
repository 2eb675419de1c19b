"""LoRA-Squeeze (training.md §7): compress a trained low-rank adapter to a smaller rank after training.

Layer level: `squeeze(A, B, scale, target_rank | energy, method)` returns factors (A', B') with B'·A' = the best
rank-k approximation (Eckart–Young, Frobenius and spectral norm) of s·B·A. The scale `s` is folded into the new
factors: the result is meant for a LoRA with scale 1 (alpha = rank, no rsLoRA). The singular values are split evenly
between the factors: B' = U_k Σ_k^½, A' = Σ_k^½ V_kᵀ (the card's [U] split; `split="left"` gives B' = U_k Σ_k,
A' = V_kᵀ instead).

- method="exact": the QR-of-factors route. B = Q_B R_B, Aᵀ = Q_A R_A, SVD of the r×r core s·R_B R_Aᵀ = U_c Σ V_cᵀ,
  then U = Q_B U_c, V = Q_A V_c. ΔW is never formed: O((m+n)r² + r³) time, O((m+n)r) memory.
- method="rsvd": a randomized SVD (Halko et al.) applied to the operator x ↦ s·B·(A·x), again without forming ΔW:
  a Gaussian sketch of k + `oversample` columns, `power_iters` subspace iterations (re-orthonormalized by QR each
  time), then the SVD of the small projected matrix. Documented tolerance (tested): with the defaults
  (oversample=10, power_iters=2) ‖s·B·A − B'A'‖_F ≤ 1.02·‖s·B·A − [s·B·A]_k‖_F on random factors.
- energy=e: the smallest k with Σ_{i≤k} σ_i² ≥ e·Σ_i σ_i² = e·‖s·B·A‖_F² (the total is computed exactly from the
  factors, also for rsvd). This rule is from third-party tooling, not the paper.

Model level: `squeeze_adapter` replaces an adapter of any mergeable variant by a plain LoRA at the new ranks
(via `factors()`; a variant without factors falls back to an SVD of its dense effective ΔW — reported per layer as
`"dense"`), `squeeze_folder` does the same on a plain LoRA folder without a model (other variants: `squeeze_adapter` on
`lorakit.from_pretrained(folder)`, as `lorakit squeeze` does), and `cont_squeeze` runs a few training steps at the new
rank.
"""
from __future__ import annotations

import dataclasses
import os
from collections import Counter
from typing import Callable, Mapping, NamedTuple, Optional, Union

import torch

from ..config import AdapterConfig, pattern_key
from ..errors import ConfigError, MergeError

METHODS = ("exact", "rsvd")
Ranks = Union[int, Mapping[str, int], None]


class SVD(NamedTuple):
    """Leading singular triplets of s·B·A: u (m, k), s (k,), v (n, k); `total` = ‖s·B·A‖_F² (exact)."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    total: float


def _check(method: str, target_rank, energy) -> None:
    if method not in METHODS:
        raise ConfigError(f"option method must be one of {METHODS}, got {method!r}")
    if (target_rank is None) == (energy is None):
        raise ConfigError("give exactly one of target_rank and energy")
    if target_rank is not None and (not isinstance(target_rank, int) or target_rank < 1):
        raise ConfigError(f"option target_rank must be a positive int, got {target_rank!r}")
    if energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"option energy must be in (0, 1], got {energy!r}")


def frobenius_sq(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> float:
    """‖s·B·A‖_F² = s²·tr((BᵀB)(AAᵀ)), from the factors alone."""
    return float((scale ** 2) * ((b.T @ b) * (a @ a.T)).sum())


def energy_rank(sigma: torch.Tensor, energy: float, total: Optional[float] = None) -> int:
    """Smallest k ≥ 1 whose leading σ² capture at least `energy` of `total` (default Σσ²)."""
    sq = sigma.detach().double().pow(2)
    total = float(sq.sum()) if total is None else total
    if total <= 0:
        return 1
    captured = torch.cumsum(sq, 0) / total
    hits = (captured >= energy - 1e-12).nonzero()
    return int(hits[0]) + 1 if len(hits) else len(sigma)


def factor_svd(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0, rank: Optional[int] = None,
               method: str = "exact", oversample: int = 10, power_iters: int = 2,
               generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float64) -> SVD:
    """The SVD of s·B·A (A (r, n), B (m, r)) from the factors, computed in `dtype`.

    exact: all r triplets (`rank` is ignored); rsvd: about `rank` (default r) leading triplets from a sketch of
    min(rank + oversample, r, m, n) columns — a sketch as wide as r spans B's range exactly, so it is then exact."""
    if method not in METHODS:
        raise ConfigError(f"option method must be one of {METHODS}, got {method!r}")
    a, b = a.detach().to(dtype), b.detach().to(dtype)
    total = frobenius_sq(a, b, scale)
    if method == "exact":
        q_b, r_b = torch.linalg.qr(b)  # (m, r), (r, r)
        q_a, r_a = torch.linalg.qr(a.T)  # (n, r), (r, r)
        u_c, sigma, vh_c = torch.linalg.svd(scale * (r_b @ r_a.T))
        return SVD(q_b @ u_c, sigma, q_a @ vh_c.T, total)
    m, n, r = b.shape[0], a.shape[1], a.shape[0]
    k = r if rank is None else min(rank, r)
    width = min(k + oversample, r, m, n)
    omega = torch.randn(n, width, generator=generator, dtype=dtype, device="cpu").to(a.device)
    q, _ = torch.linalg.qr(scale * (b @ (a @ omega)))  # range sketch Y = ΔW Ω, (m, width)
    for _ in range(power_iters):  # (ΔW ΔWᵀ)^q Y, orthonormalized after each product
        z, _ = torch.linalg.qr(scale * (a.T @ (b.T @ q)))  # ΔWᵀ Q, (n, width)
        q, _ = torch.linalg.qr(scale * (b @ (a @ z)))
    small = scale * ((q.T @ b) @ a)  # Qᵀ ΔW, (width, n)
    u_s, sigma, vh = torch.linalg.svd(small, full_matrices=False)
    return SVD(q @ u_s, sigma, vh.T, total)


def split_factors(svd: SVD, k: int, split: str = "balanced") -> tuple[torch.Tensor, torch.Tensor]:
    """(A' (k, n), B' (m, k)) with B'A' = U_k Σ_k V_kᵀ."""
    if split not in ("balanced", "left"):
        raise ConfigError(f"option split must be 'balanced' or 'left', got {split!r}")
    u, s, v = svd.u[:, :k], svd.s[:k], svd.v[:, :k]
    if split == "left":
        return v.T.contiguous(), (u * s).contiguous()
    root = s.sqrt()
    return (v * root).T.contiguous(), (u * root).contiguous()


def squeeze(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0, target_rank: Optional[int] = None,
            energy: Optional[float] = None, method: str = "exact", oversample: int = 10, power_iters: int = 2,
            split: str = "balanced", generator: Optional[torch.Generator] = None,
            dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress one layer's LoRA factors A (r, in), B (out, r) with scale s to rank k (`target_rank`, clamped to
    r, or the `energy` rule). Returns (A' (k, in), B' (out, k)) in A's dtype with B'·A' ≈ s·B·A at scale 1.
    The work is done in `dtype` (float64 by default: the factors are small; float32 is about twice as fast)."""
    _check(method, target_rank, energy)
    rank = None if target_rank is None else min(target_rank, a.shape[0])
    svd = factor_svd(a, b, scale, rank, method, oversample, power_iters, generator, dtype)
    k = rank if rank is not None else energy_rank(svd.s, energy, svd.total)
    new_a, new_b = split_factors(svd, min(k, len(svd.s)), split)
    return new_a.to(a.dtype), new_b.to(b.dtype)


def dense_svd(delta: torch.Tensor, rank: Optional[int] = None, method: str = "exact", oversample: int = 10,
              power_iters: int = 2, dtype: torch.dtype = torch.float64) -> SVD:
    """SVD of a dense (out, in) ΔW (the fallback for variants without `factors()`): torch.linalg.svd for exact,
    torch.svd_lowrank (q = rank + oversample, niter = power_iters) for rsvd."""
    delta = delta.detach().to(dtype)
    total = float(delta.pow(2).sum())
    if method == "exact" or rank is None:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return SVD(u, s, vh.T, total)
    q = min(rank + oversample, *delta.shape)
    u, s, v = torch.svd_lowrank(delta, q=q, niter=power_iters)
    return SVD(u, s, v, total)


# ---- model level ---------------------------------------------------------------------------------------------
def _layer_target(target_rank: Ranks, path: str) -> Optional[int]:
    if target_rank is None or isinstance(target_rank, int):
        return target_rank
    key = pattern_key(dict(target_rank), path)
    return None if key is None else target_rank[key]


def plain_config(ranks: dict[str, int], like: AdapterConfig) -> AdapterConfig:
    """A plain LoRA config at scale 1 on every layer (alpha = rank); off-mode ranks in rank/alpha_pattern.
    Keeps `like`'s modules_to_save, task_type, lora_dropout (for cont-squeeze) and fan_in_fan_out."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    other = {p: k for p, k in ranks.items() if k != r}
    return AdapterConfig(r=r, lora_alpha=r, target_modules=sorted(ranks), rank_pattern=other,
                         alpha_pattern={p: float(k) for p, k in other.items()},
                         modules_to_save=like.modules_to_save, task_type=like.task_type,
                         lora_dropout=like.lora_dropout, fan_in_fan_out=like.fan_in_fan_out,
                         base_model_name_or_path=like.base_model_name_or_path)


def effective_delta(variant, kind) -> torch.Tensor:
    """The layer's effective change of its base weight as a dense (out, in) matrix: s·B·A, or for a variant without
    `factors()` its `delta_weight()` with any row scale applied (row ⊙ (W + ΔW) − W: DoRA's is full rank)."""
    if not getattr(variant, "mergeable", True):
        raise MergeError(f"{variant.name} on {variant.path} has a token-dependent ΔW")
    with torch.no_grad():
        factors = variant.factors()
        if factors is not None:
            a, b, s = factors
            return (b.detach() @ a.detach()) * s
        delta = variant.delta_weight()
        if delta.dim() != 2:
            delta = kind.as_matrix(delta) if kind.as_matrix(delta).dim() == 2 else delta.reshape(delta.shape[0], -1)
        weight = kind.weight()
        row = variant.row_scale(weight)
        if row is not None:
            w = weight.reshape(weight.shape[0], -1).to(delta.dtype)
            delta = row.reshape(-1, 1).to(delta.dtype) * (w + delta) - w
    return delta


def layer_svd(variant, kind, rank=None, method="exact", oversample=10, power_iters=2,
              generator=None) -> tuple[SVD, str, int]:
    """(SVD of the layer's ΔW, "factors" | "dense", the most rank it can keep: r for factors, min(out, in) for a
    dense ΔW — e.g. DoRA's effective change (m/‖W+ΔW‖ − 1)⊙W + … is full rank)."""
    factors = variant.factors()
    if factors is not None:
        a, b, s = factors
        return factor_svd(a, b, s, rank, method, oversample, power_iters, generator), "factors", a.shape[0]
    try:
        delta = effective_delta(variant, kind)
    except MergeError:
        raise MergeError(f"{variant.name} on {variant.path} has a token-dependent ΔW; it cannot be squeezed") from None
    return dense_svd(delta, rank, method, oversample, power_iters), "dense", min(delta.shape)


def folder_factors(config: AdapterConfig, tensors: dict[str, torch.Tensor]):
    """The LoRA pairs of a plain LoRA folder's tensors: yields (path, A (r, in), B (out, r), A's key, B's key) for
    Linear (lora_A/lora_B.weight), Conv (A (r, in, *k), B (out, r, 1…)) and Embedding (lora_embedding_A (r, num),
    lora_embedding_B (dim, r)) layers, in the files' order."""
    suffixes = (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B"))
    for key, t in tensors.items():
        pair = next((s for s in suffixes if key.endswith("." + s[0])), None)
        if pair is None:
            continue
        path = key[: -len(pair[0]) - 1]
        b_key = f"{path}.{pair[1]}"
        r = t.shape[0]
        b = tensors[b_key]
        yield path, t.reshape(r, -1), b.reshape(b.shape[0], r) if pair[0] == "lora_A.weight" else b, key, b_key


def squeeze_adapter(model: torch.nn.Module, name: str = "default", target_rank: Ranks = None,
                    energy: Optional[float] = None, method: str = "exact", oversample: int = 10,
                    power_iters: int = 2, split: str = "balanced", trainable: bool = True,
                    generator: Optional[torch.Generator] = None) -> dict[str, dict]:
    """Replace adapter `name` (any mergeable variant) by a plain LoRA whose layers hold the best rank-k
    approximation of each layer's ΔW.

    `target_rank`: an int for every layer, or a dict {module path or PEFT-style pattern: rank} (first matching key
    wins, as `rank_pattern`); layers no key matches use `energy` when given, else keep their rank (re-factored
    exactly). `energy` alone: per-layer k by retained energy. Ranks are clamped to the source rank (for the dense
    fallback to min(out, in): DoRA's effective ΔW, say, is full rank). The new adapter has alpha = rank (scale 1,
    the singular values live in the factors), uses `rank_pattern`/`alpha_pattern` for heterogeneous ranks, keeps
    `modules_to_save` copies and the active set, and is trainable when `trainable`.
    Returns {path: {"from": r, "to": k, "energy": captured fraction, "source": "factors" | "dense"}} — "dense" marks a
    variant without `factors()` whose dense effective ΔW was decomposed (a full SVD per layer, much slower)."""
    from ..layers import AdaptedLayer
    from ..model import _book, delete_adapter, get_config, set_active, wrappers

    if method not in METHODS:
        raise ConfigError(f"option method must be one of {METHODS}, got {method!r}")
    if target_rank is None and energy is None:
        raise ConfigError("give target_rank (int or per-layer dict) and/or energy")
    if isinstance(target_rank, int):
        _check(method, target_rank, None)
    if energy is not None:
        _check(method, None, energy)
    config = get_config(model, name)
    layers = [(p, w) for p, w in wrappers(model) if isinstance(w, AdaptedLayer) and name in w.adapters]
    for path, w in layers:
        if name in w.merged:
            raise MergeError(f"adapter {name!r} is merged into {path}; unmerge before squeezing it")
    factors, report = {}, {}
    for path, w in layers:
        variant = w.adapters[name]
        wanted = _layer_target(target_rank, path)
        svd, source, r_src = layer_svd(variant, w.kind, wanted if wanted is not None else variant.r, method,
                                        oversample, power_iters, generator)
        r_src = min(r_src, len(svd.s))
        if wanted is not None:
            k = min(wanted, r_src, len(svd.s))
        elif energy is not None:
            k = min(energy_rank(svd.s, energy, svd.total), r_src)
        else:
            k = min(variant.r, r_src)
        a, b = split_factors(svd, k, split)
        dtype = variant.lora_dtype
        factors[path] = (w.kind.down_layout(a.to(dtype)), w.kind.up_layout(b.to(dtype)))
        kept = float(svd.s[:k].double().pow(2).sum()) / svd.total if svd.total > 0 else 1.0
        report[path] = {"from": variant.r, "to": k, "energy": kept, "source": source}
    copies = saved_copies(model, name)
    active = list(_book(model).active)
    delete_adapter(model, name)
    add_plain_lora(model, name, factors, config, copies, trainable)
    set_active(model, active)
    return report


def saved_copies(model: torch.nn.Module, name: str) -> dict[str, dict]:
    """{path: state dict} of adapter `name`'s trained module copies (`modules_to_save`, e.g. a head), cloned."""
    from ..layers import TrainedCopy
    from ..model import wrappers

    return {p: {k: t.detach().clone() for k, t in w.copies[name].state_dict().items()}
            for p, w in wrappers(model) if isinstance(w, TrainedCopy) and name in w.copies}


def add_plain_lora(model: torch.nn.Module, name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   like: AdapterConfig, copies: Optional[dict] = None, trainable: bool = True) -> None:
    """Attach a plain LoRA `name` at scale 1 whose layers hold the given (A, B) (in the layers' own layouts), with
    `like`'s saved modules restored from `copies` (`saved_copies`)."""
    from ..model import attach, prepare

    plain = plain_config({p: a.shape[0] for p, (a, _) in factors.items()}, like)
    prepared = prepare(model, plain, name, initialize=False)
    with torch.no_grad():
        for path, (a, b) in factors.items():
            variant = prepared.variants[path]
            variant.lora_A.copy_(a)
            variant.lora_B.copy_(b)
        for path, state in (copies or {}).items():
            prepared.copies[path].load_state_dict(state)
    attach(model, prepared, trainable=trainable)


def is_plain_lora(config: AdapterConfig) -> bool:
    """A PEFT LoRA without DoRA: its folder squeezes from the factors alone, without the base model."""
    return config.variant == "lora" and not config.use_dora


def squeeze_folder(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, target_rank: Ranks = None,
                   energy: Optional[float] = None, method: str = "exact", oversample: int = 10,
                   power_iters: int = 2, split: str = "balanced",
                   generator: Optional[torch.Generator] = None) -> dict[str, dict]:
    """Squeeze a plain PEFT LoRA folder (peft_type LORA, no DoRA) into `dst_dir` without loading a model.

    Linear layers (lora_A (r, in), lora_B (out, r)), Conv (A (r, in, *k), B (out, r, 1…)) and Embedding layers
    (lora_embedding_A (r, num), lora_embedding_B (dim, r)) are handled; other tensors (modules_to_save) are copied.
    Same options and report as `squeeze_adapter`; the output has alpha = rank per layer (scale 1).
    Other variants squeeze on their base model: `squeeze_adapter(lorakit.from_pretrained(src_dir), ...)`, then
    `save_adapter` (what `lorakit squeeze` does)."""
    from ..io.files import read_adapter, write_folder

    config, tensors = read_adapter(src_dir)
    if not is_plain_lora(config):
        raise ConfigError(f"squeeze_folder reads plain LoRA folders; {src_dir} holds variant {config.variant!r}"
                          f"{' with DoRA' if config.use_dora else ''}, which squeezes on its base model: "
                          f"squeeze_adapter(lorakit.from_pretrained(folder), ...) or `lorakit squeeze`")
    out = dict(tensors)
    report = {}
    for path, a, b, a_key, b_key in folder_factors(config, tensors):
        r = a.shape[0]
        wanted = _layer_target(target_rank, path)
        if wanted is None and energy is None:
            wanted = r
        if wanted is not None:
            _check(method, wanted, None)
        svd = factor_svd(a.float(), b.float(), config.scale_for(path), wanted, method, oversample, power_iters,
                         generator)
        k = min(wanted, r, len(svd.s)) if wanted is not None else min(energy_rank(svd.s, energy, svd.total), r)
        new_a, new_b = split_factors(svd, k, split)
        a_file, b_file = tensors[a_key], tensors[b_key]
        out[a_key] = new_a.reshape(k, *a_file.shape[1:]).to(a_file.dtype).contiguous()
        out[b_key] = new_b.reshape(b_file.shape[0], k, *b_file.shape[2:]).to(b_file.dtype).contiguous()
        kept = float(svd.s[:k].double().pow(2).sum()) / svd.total if svd.total > 0 else 1.0
        report[path] = {"from": r, "to": k, "energy": kept, "source": "factors"}
    if not report:
        raise ConfigError(f"{src_dir} holds no LoRA factors to squeeze")
    write_folder(dst_dir, plain_config({p: r["to"] for p, r in report.items()}, config), out)
    return report


def cont_squeeze(model: torch.nn.Module, train: Union[Callable[[torch.nn.Module], object], object],
                 name: str = "default", steps: Optional[int] = None, **squeeze_options) -> dict[str, dict]:
    """Squeeze adapter `name` (`squeeze_adapter` options), then train a few steps at the new rank.

    `train`: either a function `train(model)` that runs the steps (any loop; it gets the squeezed model), or a
    callable `make_trainer(model)` returning a lorakit `Trainer` (built after the squeeze, so its optimizer holds the
    new parameters), whose `train()` is run; `steps` then caps `args.max_steps`. Returns the squeeze report."""
    report = squeeze_adapter(model, name, trainable=True, **squeeze_options)
    result = train(model)
    if hasattr(result, "train") and hasattr(result, "optimizer"):
        if steps is not None:
            result.args = dataclasses.replace(result.args, max_steps=steps)
        result.train()
    return report


def relative_error(delta: torch.Tensor, reference: torch.Tensor) -> float:
    """‖delta − reference‖_F / ‖reference‖_F (1e-30 floor)."""
    return float((delta - reference).norm() / max(float(reference.norm()), 1e-30))


__all__ = ["squeeze", "factor_svd", "dense_svd", "split_factors", "energy_rank", "frobenius_sq",
           "squeeze_adapter", "squeeze_folder", "is_plain_lora", "cont_squeeze", "relative_error", "SVD", "METHODS"]

