"""Intruder dimensions ("LoRA vs Full Fine-tuning: An Illusion of Equivalence", Shuttleworth et al., NeurIPS 2025;
training.md §11), the spectra of W₀ + ΔW, and the paper's post-hoc mitigation.

Definition (the authors' code): SVD of the base weight W₀ = U₀Σ₀V₀ᵀ and of the fine-tuned W = W₀ + ΔW = UΣVᵀ; for
each of the top `k` left singular vectors u_j of W, c_j = max_i |⟨u_j, u₀_i⟩| over all left singular vectors of
W₀; u_j is an intruder dimension when c_j < ε (k = 10, ε = 0.5 by default). The count is per matrix; `sweep` gives
it for every ε of EPSILONS (the paper's plot of count against ε).

Spectra of W itself (where a power law means something: ΔW alone has only r eigenvalues): `stable_rank`
‖W‖_F²/‖W‖₂², and `alpha`, the exponent of a power law fitted to the tail of the eigenvalues σ² of WᵀW
(Clauset et al.: maximum-likelihood α = 1 + n / Σ ln(λ/λ_min) for every candidate λ_min with at least
MIN_TAIL eigenvalues above it, keeping the one whose fit has the smallest Kolmogorov–Smirnov distance; the
WeightWatcher recipe, written here from the formulas).

Mitigation (`reduce_intruders`, the paper's §6; PEFT's `reduce_intruder_dimension`): for every intruder j,
W ← W − (1 − λ)·σ_j u_j v_jᵀ (λ = 0.75 keeps 75 % of that direction), so the new ΔW' = ΔW − (1 − λ)·U_I Σ_I V_Iᵀ,
of rank ≤ r + |I|. It is written as a new plain LoRA: at rank r + |I| exactly (`keep_rank=False`), or, as PEFT
does, projected back to rank r — and, unlike PEFT, the relative re-projection error ‖ΔW'_r − ΔW'‖_F / ‖ΔW'‖_F is
reported per layer.

Base SVDs are cached on disk (`svd_cache_dir()`, keyed by a SHA-256 of the weight's bytes; U₀ stored in fp16,
enough for cosines compared with ε ≥ 0.05), so a second inspection of adapters on the same base skips them.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Optional

import torch

from ..errors import ConfigError

EPSILONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MIN_TAIL = 10


def svd_cache_dir() -> Path:
    from ..cache import cache_dir

    return cache_dir() / "svd"


def base_svd(weight: torch.Tensor, cache: Optional[Path | str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(U₀ (out, min) float32, σ₀ (min,) float64) of a base weight (out, in), read from or written to `cache` (a
    folder; None: no cache)."""
    from safetensors.torch import load_file, save_file

    w = weight.detach().float().cpu().contiguous()
    path = None
    if cache is not None:
        digest = hashlib.sha256(w.numpy().tobytes() + str(tuple(w.shape)).encode()).hexdigest()
        path = Path(cache) / f"{digest}.safetensors"
        if path.is_file():
            stored = load_file(str(path))
            return stored["u"].float(), stored["s"]
    u, s, _ = torch.linalg.svd(w, full_matrices=False)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"u": u.half().contiguous(), "s": s.double().contiguous()}, str(tmp))
        tmp.replace(path)
    return u, s.double()


def powerlaw_alpha(sigma: torch.Tensor, min_tail: int = MIN_TAIL) -> dict:
    """{"alpha", "xmin", "ks", "tail"} of the power law fitted to the eigenvalues σ² (see the module docstring);
    NaN values when fewer than `min_tail` positive eigenvalues exist."""
    x = torch.sort(sigma.detach().double().cpu().pow(2)).values
    x = x[x > 0]
    n = len(x)
    if n < min_tail:
        return {"alpha": math.nan, "xmin": math.nan, "ks": math.nan, "tail": 0}
    starts = torch.arange(n - min_tail + 1)
    logs = torch.log(x)
    suffix = torch.flip(torch.cumsum(torch.flip(logs, [0]), 0), [0])  # Σ_{j ≥ i} ln x_j
    sizes = (n - starts).double()
    total = suffix[starts] - sizes * logs[starts]  # Σ ln(x_j / x_i) over the tail
    alpha = 1 + sizes / total.clamp_min(1e-300)
    best = (math.inf, 0)
    for i in starts.tolist():
        tail = x[i:]
        fit = 1 - (tail / x[i]).pow(1 - alpha[i])
        m = len(tail)
        grid = torch.arange(m, dtype=torch.float64)
        ks = float(torch.maximum((fit - grid / m).abs(), (fit - (grid + 1) / m).abs()).max())
        if ks < best[0]:
            best = (ks, i)
    ks, i = best
    return {"alpha": float(alpha[i]), "xmin": float(x[i]), "ks": ks, "tail": int(n - i)}


def layer_intruders(base: tuple[torch.Tensor, torch.Tensor], tuned: torch.Tensor, k: int = 10,
                    epsilon: float = 0.5, epsilons=EPSILONS) -> dict:
    """Intruder dimensions of the fine-tuned weight `tuned` (out, in) against `base` = (U₀, σ₀) from `base_svd`.

    Returns the count at `epsilon`, the count for every ε of `epsilons`, c_j for the top k, the intruders'
    indices, and the stable rank and power-law α of the base and of the fine-tuned weight."""
    if k < 1:
        raise ConfigError(f"k must be ≥ 1, got {k}")
    u0, s0 = base
    u, s, _ = torch.linalg.svd(tuned.detach().float().cpu(), full_matrices=False)
    cos = best_cosines(u, u0, k)
    k = len(cos)
    return {"intruders": int((cos < epsilon).sum()), "sweep": {e: int((cos < e).sum()) for e in epsilons},
            "cos": cos.tolist(), "indices": [j for j in range(k) if cos[j] < epsilon],
            "stable_rank_base": _stable_rank(s0), "stable_rank": _stable_rank(s),
            "alpha_base": powerlaw_alpha(s0)["alpha"], "alpha": powerlaw_alpha(s)["alpha"]}


def best_cosines(u: torch.Tensor, u0: torch.Tensor, k: int) -> torch.Tensor:
    """c_j = max_i |⟨u_j, u0_i⟩| for the top min(k, …) columns u_j of `u` against all columns of `u0` (float64)."""
    return (u[:, :k].T.float() @ u0.float()).abs().amax(1).double()


def _stable_rank(sigma: torch.Tensor) -> float:
    s = sigma.double()
    return float(s.pow(2).sum() / s[0] ** 2) if len(s) and s[0] > 0 else 0.0


def adapter_intruders(model: torch.nn.Module, name: str = "default", k: int = 10, epsilon: float = 0.5,
                      epsilons=EPSILONS, cache: Optional[Path | str] = None, progress: bool = True) -> dict[str, dict]:
    """{module path: `layer_intruders` record} for adapter `name` on its base model (any mergeable variant: its
    effective ΔW, DoRA's magnitude included), the adapter's layers only."""
    from tqdm.auto import tqdm

    from ..rank.squeeze import effective_delta
    from .spectra import adapted_layers

    out = {}
    for path, layer in tqdm(adapted_layers(model, name), desc="intruder dimensions", unit="layer",
                            disable=not progress, leave=False):
        w0 = layer.kind.weight().detach()
        w0 = w0.reshape(w0.shape[0], -1).float()
        delta = effective_delta(layer.adapters[name], layer.kind).float()
        out[path] = layer_intruders(base_svd(w0, cache), w0 + delta, k, epsilon, epsilons)
    return out


def weight_intruders(base: torch.nn.Module, tuned: torch.nn.Module, paths: list[str], k: int = 10,
                     epsilon: float = 0.5, epsilons=EPSILONS, cache: Optional[Path | str] = None,
                     progress: bool = True) -> dict[str, dict]:
    """The same for two models with the same modules (e.g. a base and its full fine-tune): per module path of
    `paths`, the weight of `tuned` against the weight of `base`."""
    from tqdm.auto import tqdm

    modules0, modules1 = dict(base.named_modules()), dict(tuned.named_modules())
    missing = [p for p in paths if p not in modules0 or p not in modules1]
    if missing:
        raise ConfigError(f"modules missing from one of the models: {missing[:3]}")
    out = {}
    for path in tqdm(paths, desc="intruder dimensions", unit="layer", disable=not progress, leave=False):
        w0, w1 = modules0[path].weight.detach().float(), modules1[path].weight.detach().float()
        out[path] = layer_intruders(base_svd(w0, cache), w1, k, epsilon, epsilons)
    return out


def reduce_intruders(model: torch.nn.Module, name: str = "default", new_name: str = "intruders_reduced",
                     top_k: int = 10, epsilon: float = 0.5, lam: float = 0.75, keep_rank: bool = True,
                     cache: Optional[Path | str] = None, progress: bool = True) -> dict[str, dict]:
    """Add adapter `new_name`: adapter `name` (any mergeable variant) with each layer's intruder directions scaled
    by `lam` (see the module docstring), as a plain LoRA at scale 1; the old adapter is kept and `new_name` is made
    the only active one. Returns per layer {"intruders", "rank", "reprojection_error"} (relative, 0 when the new
    factors hold ΔW' exactly)."""
    from tqdm.auto import tqdm

    from ..model import get_config, set_active
    from ..rank.squeeze import effective_delta, factor_svd, saved_copies, add_plain_lora, split_factors
    from .spectra import adapted_layers

    if not 0 <= lam <= 1:
        raise ConfigError(f"lam must be in [0, 1], got {lam}")
    config = get_config(model, name)
    factors, report = {}, {}
    for path, layer in tqdm(adapted_layers(model, name), desc="reducing intruders", unit="layer",
                            disable=not progress, leave=False):
        variant = layer.adapters[name]
        w0 = layer.kind.weight().detach().reshape(layer.kind.out_features, -1).double()
        own = variant.factors()
        if own is not None:
            a, b, s = (t.detach().double() if torch.is_tensor(t) else t for t in own)
            b = b * s
        else:  # a dense effective ΔW: its own SVD gives the factors
            delta = effective_delta(variant, layer.kind).double()
            u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
            a, b = vh, u * sv
        u, sigma, vh = torch.linalg.svd(w0 + b @ a, full_matrices=False)
        cos = best_cosines(u, base_svd(w0, cache)[0], top_k)
        found = [j for j in range(len(cos)) if cos[j] < epsilon]
        if found:
            b = torch.cat([b, -(1 - lam) * u[:, found] * sigma[found]], 1)
            a = torch.cat([a, vh[found]], 0)
        svd = factor_svd(a, b, 1.0)
        rank = variant.r if keep_rank else variant.r + len(found)
        rank = min(rank, len(svd.s))
        kept = float(svd.s[:rank].pow(2).sum())
        error = math.sqrt(max(svd.total - kept, 0.0) / svd.total) if svd.total > 0 else 0.0
        new_a, new_b = split_factors(svd, rank)
        dtype = variant.lora_dtype
        factors[path] = (layer.kind.down_layout(new_a.to(dtype)), layer.kind.up_layout(new_b.to(dtype)))
        report[path] = {"intruders": len(found), "rank": rank, "reprojection_error": error}
    add_plain_lora(model, new_name, factors, config, saved_copies(model, name))
    set_active(model, [new_name])
    return report
