"""Merging LoRA adapters into one (training.md §9a, §9b; the combining issue).

Every method works one layer at a time on the sources' `Part`s (ΔWᵢ = sᵢ·Bᵢ·Aᵢ, each adapter's own scale — α/r,
α/√r with rsLoRA, rank and alpha patterns — folded in exactly once) and returns one pair (A, B) at scale 1:
- exact, from the factors (never a dense out × in matrix): `cat` (A = [A₁; A₂; …], B = [w₁s₁B₁, …], rank Σrᵢ) and
  `linear` (the same sum re-factored by the QR of the stacked factors and an SVD of the small core: exact at its
  numerical rank, or the optimal rank-k approximation with `target_rank` / `energy`);
- element-wise on ΔW (`sparsify`: `ties`, `dare_linear`, `dare_ties`, `della`, `magnitude_prune`, `breadcrumbs`):
  the dense ΔWᵢ of one layer at a time; the result is full rank, so `target_rank` or `energy` is required;
- aligned (`aligned`: `lego` — LoRA-LEGO's clustering of rank-1 units — and `knots` — a shared SVD basis with the
  per-task coefficients merged);
- PEFT 0.21.2's own semantics, to reproduce its numbers (`peft_compat`: `peft_linear` and the other factor-level
  modes, `peft_svd`).
Each layer's report: `rank`, `error` (‖D − D_k‖_F/‖D‖_F of the method's own result D when truncated, else 0),
`from_sum` (‖merged − Σ wᵢΔWᵢ‖_F / ‖Σ wᵢΔWᵢ‖_F, from the factors: how far the method moved from the plain
weighted sum) and the method's own counts (the density each source kept, ...).

Unlike PEFT's `add_weighted_adapter`, the default methods have no cross terms BᵢAⱼ, negative weights (task
negation) work, ranks and target sets may differ (a layer takes the adapters that have it), the scale is applied once,
a taken name raises, nothing is mutated, and the new adapter comes back active.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import zlib
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import ConfigError
from .layers import Layer, Part, attach_result, folder_layers, model_layers, write_folder_result
from .peft_compat import FACTOR_METHODS, factor_level, svd_level
from .sparsify import DIVIDES, SIGN_METHODS, SIGNS, TRIMS, merge_dense

EXACT = ("cat", "linear")
ELEMENTWISE = tuple(TRIMS)
ALIGNED = ("lego", "knots")
PEFT = (*FACTOR_METHODS, "peft_svd")
METHODS = (*EXACT, *ELEMENTWISE, *ALIGNED, *PEFT)
NUMERICAL_ZERO = 1e-12  # "linear" without a rank keeps singular values above this fraction of the largest
REPORT_NAME = "lorakit_merge.json"  # written beside a merged folder: sources, weights, method, options, per layer


@dataclasses.dataclass(frozen=True)
class MergeOptions:
    """A merge's choices, all recorded in its report. `density`: the fraction of entries kept (TIES, DARE, DELLA,
    magnitude pruning, Breadcrumbs: required, no silent default). `sign` / `sign_method` / `divide`: the TIES-style
    election (see `sparsify`). `epsilon`: DELLA's spread of keep probabilities; `gamma`: Breadcrumbs' fraction of
    largest entries dropped; `lam`: λ on the element-wise result. `k`: LoRA-LEGO's cluster count (default: the
    largest source rank). `seed`: every random draw (per layer, from the seed and the layer's path)."""

    method: str = "linear"
    target_rank: Optional[int] = None
    energy: Optional[float] = None
    density: Optional[float] = None
    seed: int = 0
    sign: str = "weighted"
    sign_method: str = "total"
    divide: str = "count"
    epsilon: float = 0.1
    gamma: float = 0.01
    lam: float = 1.0
    k: Optional[int] = None
    knots_inner: str = "ties"

    def check(self) -> None:
        m = self.method
        if m not in METHODS:
            raise ConfigError(f"method must be one of {list(METHODS)}, got {m!r}")
        if self.target_rank is not None and self.energy is not None:
            raise ConfigError("give at most one of target_rank and energy")
        if self.target_rank is not None and (isinstance(self.target_rank, bool) or
                                             not isinstance(self.target_rank, int) or self.target_rank < 1):
            raise ConfigError(f"target_rank must be a positive int, got {self.target_rank!r}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ConfigError(f"energy must be in (0, 1], got {self.energy!r}")
        if m == "cat" and (self.target_rank is not None or self.energy is not None):
            raise ConfigError("method 'cat' is exact at rank Σrᵢ; a target rank or energy needs method 'linear'")
        if m in FACTOR_METHODS and (self.target_rank is not None or self.energy is not None):
            raise ConfigError(f"{m} keeps the sources' rank (PEFT's factor-level semantics); a target rank needs "
                              f"linear or peft_svd")
        if m == "peft_svd" and self.energy is not None:
            raise ConfigError("peft_svd takes one rank for every layer (PEFT's svd_rank): use target_rank")
        if m in ELEMENTWISE and self.target_rank is None and self.energy is None:
            raise ConfigError(f"{m} works entry by entry on ΔW and gives a full-rank result: give a target rank "
                              f"(--r) or an energy (--energy) for the low-rank adapter it becomes")
        if m in ELEMENTWISE or m in ("peft_ties", "peft_dare_linear", "peft_dare_ties", "peft_magnitude_prune") \
                or (m == "knots" and self.knots_inner != "ta"):
            if self.density is None:
                raise ConfigError(f"{m} needs a density (the fraction of entries kept; the TIES paper keeps 0.2, "
                                  f"DARE papers 0.1 to 0.5)")
            if not 0 < self.density <= 1:
                raise ConfigError(f"density must be in (0, 1], got {self.density!r}")
        elif self.density is not None:
            raise ConfigError(f"method {m!r} does not use a density")
        for name, value, allowed in (("sign", self.sign, SIGNS), ("sign_method", self.sign_method, SIGN_METHODS),
                                     ("divide", self.divide, DIVIDES)):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")
        if m == "della" and not (0 <= self.epsilon and 0 < self.density - self.epsilon
                                 and self.density + self.epsilon <= 1):
            raise ConfigError(f"della needs density ± epsilon inside (0, 1]; got density {self.density}, "
                              f"epsilon {self.epsilon}")
        if m == "breadcrumbs" and not (0 <= self.gamma < 1 and self.gamma + self.density <= 1):
            raise ConfigError(f"breadcrumbs needs 0 ≤ gamma and gamma + density ≤ 1; got gamma {self.gamma}, "
                              f"density {self.density}")
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise ConfigError(f"k must be a positive int, got {self.k!r}")
        if not math.isfinite(self.lam):
            raise ConfigError(f"lam must be finite, got {self.lam!r}")

    def record(self) -> dict:
        """The options that shaped this method's result (for reports and the folder's provenance file)."""
        m, keep = self.method, {"method", "target_rank", "energy"}
        if m in ELEMENTWISE:
            keep |= {"density", "lam"} | ({"seed"} if TRIMS[m] in ("random", "della") else set())
            keep |= {"sign", "sign_method", "divide"} if m in ("ties", "dare_ties", "della") else set()
            keep |= {"epsilon"} if m == "della" else {"gamma"} if m == "breadcrumbs" else set()
        elif m in FACTOR_METHODS and m != "peft_linear":
            keep |= {"density", "sign_method"} | ({"seed"} if "dare" in m else set())
        elif m == "lego":
            keep |= {"k", "seed"}
        elif m == "knots":
            keep |= {"knots_inner", "lam"} | (set() if self.knots_inner == "ta" else
                                              {"density", "seed", "sign", "sign_method", "divide"})
        return {k: v for k, v in dataclasses.asdict(self).items() if k in keep}


# ---- public API -----------------------------------------------------------------------------------

def merge_adapters(model: torch.nn.Module, names: Sequence[str], weights: Sequence[float], new_name: str,
                   method: str = "linear", trainable: bool = False, **options) -> dict[str, dict]:
    """Merge adapters `names` on `model` (any variant with an additive ΔW; DoRA and token-routed MM-LoRA are refused
    with the reason) into a new plain LoRA `new_name`, which comes back loaded and active (only it). The sources are
    not changed. `options`: `MergeOptions` fields (target_rank, energy, density, seed, ...). Returns the per-layer
    report."""
    from ..model import check_free_name, get_config

    opts = _options(method, options)
    _check_inputs(names, weights)
    check_free_name(model, new_name)
    layers = model_layers(model, names, weights)
    factors, report = merge_layers(layers, opts)
    attach_result(model, new_name, factors, get_config(model, names[0]), trainable=trainable)
    return report


def merge_folders(sources: Sequence[str | os.PathLike], weights: Sequence[float], output_dir: str | os.PathLike,
                  method: str = "linear", **options) -> dict[str, dict]:
    """Merge the PEFT LoRA folders `sources` with `weights` into a new folder `output_dir` (must not exist or be
    empty): a plain PEFT LoRA at scale 1 plus `lorakit_merge.json` (sources, weights, method, options, per-layer
    report). Returns the per-layer report."""
    opts = _options(method, options)
    _check_inputs(sources, weights)
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output folder {out} exists and is not empty; choose another")
    layers, configs = folder_layers(sources, weights)
    factors, report = merge_layers(layers, opts)
    write_folder_result(out, factors, layers, configs[0])
    _write_provenance(out, sources, weights, opts, report)
    return report


def merge_on_model(model: torch.nn.Module, sources: Sequence[str | os.PathLike], weights: Sequence[float],
                   output_dir: str | os.PathLike, method: str = "linear", **options) -> dict[str, dict]:
    """`merge_folders` for adapters of any variant: `model` carries `sources[0]` (e.g. `lorakit.from_pretrained`);
    the other folders are loaded next to it, merged on the model, and the result saved to `output_dir` with its
    provenance file. The model keeps every adapter, the merged one (named "merged") active."""
    from ..io import load_adapter, save_adapter
    from ..model import adapter_names

    opts = _options(method, options)
    _check_inputs(sources, weights)
    names = [adapter_names(model)[0]] + [f"source_{i}" for i in range(1, len(sources))]
    for name, folder in zip(names[1:], sources[1:]):
        load_adapter(model, folder, name=name)
    report = merge_adapters(model, names, weights, "merged", **dataclasses.asdict(opts))
    save_adapter(model, output_dir, name="merged")
    _write_provenance(Path(output_dir), sources, weights, opts, report)
    return report


def _write_provenance(out: Path, sources, weights, opts: MergeOptions, report: dict) -> None:
    provenance = {"sources": [str(s) for s in sources], "weights": [float(w) for w in weights],
                  "options": opts.record(), "layers": report}
    (out / REPORT_NAME).write_text(json.dumps(provenance, indent=1) + "\n")


def merge_layers(layers: dict[str, Layer], opts: MergeOptions) -> tuple[dict[str, tuple], dict[str, dict]]:
    """({path: (A, B) at scale 1, float64}, {path: report}) for every layer."""
    if opts.method == "peft_svd" and opts.target_rank is None:  # PEFT: the largest source rank, on every layer
        opts = dataclasses.replace(opts, target_rank=max(p.a.shape[0] for layer in layers.values()
                                                         for p in layer.parts))
    factors, report = {}, {}
    for path, layer in layers.items():
        a, b, entry = merge_layer(layer.parts, opts, path)
        entry = {"rank": a.shape[0], "error": entry.pop("error", 0.0), "from_sum": from_sum(a, b, layer.parts),
                 **entry}
        factors[path], report[path] = (a, b), entry
    return factors, report


def merge_layer(parts: list[Part], opts: MergeOptions, path: str = "") -> tuple:
    """(A, B, info) for one layer's parts; `info` may hold "error" (truncation) and method counts."""
    m = opts.method
    generator = torch.Generator().manual_seed((opts.seed * 1_000_003 + zlib.crc32(path.encode())) % 2 ** 63)
    if m in EXACT:
        a = torch.cat([p.a for p in parts])
        b = torch.cat([p.weighted()[1] for p in parts], dim=1)
        return (a, b, {}) if m == "cat" else refactor(a, b, opts.target_rank, opts.energy)
    if m in ELEMENTWISE:
        dense, info = merge_dense(m, [p.delta() for p in parts], [p.weight for p in parts], opts.density,
                                  generator, opts.sign, opts.sign_method, opts.divide, opts.epsilon, opts.gamma,
                                  opts.lam)
        a, b, trunc = truncate_dense(dense, opts.target_rank, opts.energy)
        return a, b, {**trunc, **info}
    if m in FACTOR_METHODS:
        return factor_level(m, parts, path, opts.density, generator, opts.sign_method)
    if m == "peft_svd":
        return svd_level(parts, opts.target_rank)
    from . import aligned
    if m == "lego":
        k = opts.k or max(p.a.shape[0] for p in parts)
        a, b, info = aligned.lego(parts, k, generator=generator)
    else:
        a, b, info = aligned.knots(parts, inner=opts.knots_inner, density=opts.density, generator=generator,
                                   sign=opts.sign, sign_method=opts.sign_method, divide=opts.divide, lam=opts.lam)
    if opts.target_rank is not None or opts.energy is not None:
        a, b, trunc = refactor(a, b, opts.target_rank, opts.energy)
        info = {**info, **trunc}
    return a, b, info


# ---- the linear algebra ---------------------------------------------------------------------------

def refactor(a: torch.Tensor, b: torch.Tensor, target_rank: Optional[int], energy: Optional[float]) -> tuple:
    """(A', B', {"error"}) for B·A at its numerical rank, or truncated optimally to `target_rank` / `energy`
    (QR of the factors + SVD of the small core; the error is the relative Frobenius norm of what was cut)."""
    from ..rank.squeeze import factor_svd

    svd = factor_svd(a, b)
    return _split(svd.u, svd.s, svd.v, svd.total, target_rank, energy)


def truncate_dense(delta: torch.Tensor, target_rank: Optional[int], energy: Optional[float]) -> tuple:
    """(A', B', {"error"}): the optimal rank-k factors of a dense layer delta (a reduced SVD, never full_matrices)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return _split(u, s, vh.T, float(s.pow(2).sum()), target_rank, energy)


def _split(u, sigma, v, total, target_rank, energy) -> tuple:
    from ..rank.squeeze import energy_rank

    if target_rank is not None:
        k = min(target_rank, len(sigma))
    elif energy is not None:
        k = energy_rank(sigma, energy, total)
    else:
        k = max(1, int((sigma > NUMERICAL_ZERO * float(sigma[0])).sum())) if len(sigma) and sigma[0] > 0 else 1
    root = sigma[:k].sqrt()
    cut, whole = float(sigma[k:].norm()), float(sigma.norm())  # every σ is here: no cancellation in Σσ² − kept
    error = cut / whole if whole > 0 else 0.0
    return (v[:, :k] * root).T.contiguous(), (u[:, :k] * root).contiguous(), {"error": error}


def from_sum(a: torch.Tensor, b: torch.Tensor, parts: list[Part]) -> float:
    """‖B·A − Σ wᵢΔWᵢ‖_F / ‖Σ wᵢΔWᵢ‖_F from the factors (Gram matrices only; 0 when the sum is 0 and so is B·A)."""
    from ..rank.squeeze import frobenius_sq

    a_sum = torch.cat([p.a for p in parts])
    b_sum = torch.cat([p.weighted()[1] for p in parts], dim=1)
    reference = frobenius_sq(a_sum, b_sum)
    diff = frobenius_sq(torch.cat([a.to(a_sum), a_sum]), torch.cat([b.to(b_sum), -b_sum], dim=1))
    if reference <= 0:
        return 0.0 if diff <= 0 else math.inf
    return math.sqrt(max(diff, 0.0) / reference)


# ---- checks -------------------------------------------------------------------------------------------

def _options(method: str, options: dict) -> MergeOptions:
    known = {f.name for f in dataclasses.fields(MergeOptions)} - {"method"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown merge option(s) {unknown}; known: {sorted(known)}")
    opts = MergeOptions(method=method, **options)
    opts.check()
    return opts


def _check_inputs(sources, weights) -> None:
    if not sources:
        raise ConfigError("give at least one adapter to merge")
    if len(weights) != len(sources):
        raise ConfigError(f"{len(sources)} adapters need {len(sources)} weights, got {len(weights)}")
    if any(isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) for w in weights):
        raise ConfigError(f"weights must be finite numbers, got {list(weights)}")
    if len(set(map(str, sources))) != len(sources):
        raise ConfigError(f"an adapter is listed twice in {list(map(str, sources))}; give it one weight instead")
