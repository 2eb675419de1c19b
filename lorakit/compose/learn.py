"""Learned combination weights over a pool of adapters, and the controls they must be compared with.

Given a pool of adapters on a model and a few labelled examples of a new task (`batches`, a loss
`loss_fn(model, batch) -> scalar tensor`), find how to combine the pool (training.md §9b; the combining issue,
item 4):

- `learn_weights`: gradient-free, LoraHub-style (Huang et al. 2023). One weight per adapter, w ∈ [lo, hi]^N
  (default [−1.5, 1.5], start 0), objective = mean few-shot loss + l1·mean|wᵢ| (default 0.05), minimised by a
  bounded (1+1)-ES with the 1/5th success rule (`es_minimize`) in `budget` objective evaluations (default 40).
  Two spaces: "delta" (default), the exact ΔW(w) = Σ wᵢ·ΔWᵢ; "lorahub", the reference's factor-level mix
  ΔW(w) = (Σ wᵢ·sᵢ·Bᵢ)(Σ wᵢ·Aᵢ) (equal ranks; cross terms BᵢAⱼ included, as the reference computes it).
- `learn_scalars`: gradient-based per-layer scalars ("LoRA soups" / CAT, Prabhakar et al. 2024):
  ΔW_l = Σᵢ λ_{l,i}·ΔW_{l,i}, the λ trained by AdamW on the few-shot loss, sources and base frozen.
- Controls ("The Appeal and Reality of Recycling LoRAs", Liu et al. 2026 — adaptive merging barely beats a fresh
  LoRA, and a pool of random LoRAs does about as well): `random_pool` (random LoRAs shaped like the pool, searched
  the same way), `uniform_average`, `best_single`; the "fresh LoRA" (a new LoRA on the same examples and budget) is
  `unlearn.fit_adapter` with a seed.

Each objective evaluation is cheap: the sources are laid side by side once, as one working LoRA whose rank blocks
are theirs (own scale folded into B: the "cat" adapter, exact Σ wᵢΔWᵢ at rank Σrᵢ), and a new w only rewrites B's
column blocks as wᵢ·sᵢ·Bᵢ (in "lorahub" space it rewrites the rank-r sums) — no merge, no dense ΔW. The working
adapter is the result: it is added under `new_name` (a name that is taken raises before anything changes), left
active alone, and holds the best weights found. A failure part-way removes it and leaves the model as it was.

Sources are never modified (their tensors, `requires_grad` flags, and the model's train/eval mode are restored);
the model's active adapters become [new_name], as for any new adapter. Searches and training run in eval mode
(no dropout: the objective is a deterministic function of w).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..errors import AdapterNameError, ConfigError, DataError, MergeError
from ..model import (active_adapters, adapter_names, attach, check_free_name, delete_adapter, get_config, prepare,
                    set_active)
from .fit import LossFn, descend, lm_loss, mean_loss
from .layers import attach_result, model_layers

SPACES = ("delta", "lorahub")


# ---- the working adapter ---------------------------------------------------------------------------

@dataclass
class _Block:
    """One layer of the working adapter: which sources it holds and their float64 factors (scale folded into B)."""

    sources: list[int]  # source index of each part
    a: list[torch.Tensor]  # (rᵢ, in)
    b: list[torch.Tensor]  # sᵢ·Bᵢ (out, rᵢ)
    variant: object = None


class Mixture:
    """A plain LoRA `name` on `model` whose ΔW is a weighted mix of the adapters `names`, re-weighted by `set(w)`.

    space "delta": A = [A₁; …; A_N], B = [w₁s₁B₁, …, w_Ns_NB_N], so ΔW(w) = Σ wᵢΔWᵢ exactly (rank Σrᵢ).
    space "lorahub": A = Σ wᵢAᵢ, B = Σ wᵢsᵢBᵢ (rank r; every layer's sources must have equal ranks).
    A layer that some sources lack takes the sources that have it. Building it adds the adapter (a taken name
    raises first) and makes it the only active one; `remove()` deletes it."""

    def __init__(self, model: nn.Module, names: Sequence[str], name: str, space: str = "delta"):
        names = _check_pool(model, names)
        if space not in SPACES:
            raise ConfigError(f"space must be one of {list(SPACES)}, got {space!r}")
        self.model, self.names, self.name, self.space = model, names, name, space
        # each Part's `weight` is set to its source's index, so a layer knows which adapters it holds
        layers = model_layers(model, names, list(range(len(names))))
        self.blocks: dict[str, _Block] = {}
        for path, layer in layers.items():
            block = _Block([int(p.weight) for p in layer.parts], [p.a for p in layer.parts],
                           [p.b * p.scale for p in layer.parts])
            if space == "lorahub" and len({a.shape[0] for a in block.a}) > 1:
                ranks = {names[i]: a.shape[0] for i, a in zip(block.sources, block.a)}
                raise MergeError(f"space 'lorahub' sums the A's and the B's, so ranks must be equal; layer {path!r} "
                                 f"has ranks {ranks} (use space='delta', exact at any ranks)")
            self.blocks[path] = block
        self.size = len(names)
        zeros = torch.zeros(self.size, dtype=torch.float64)
        attach_result(model, name, {p: self._factors(b, zeros) for p, b in self.blocks.items()},
                      get_config(model, names[0]))
        modules = dict(model.named_modules())
        for path, block in self.blocks.items():
            block.variant = modules[path].adapters[name]

    def _factors(self, block: _Block, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ws = [float(w[i]) for i in block.sources]
        if self.space == "delta":
            return torch.cat(block.a), torch.cat([wi * b for wi, b in zip(ws, block.b)], dim=1)
        return sum(wi * a for wi, a in zip(ws, block.a)), sum(wi * b for wi, b in zip(ws, block.b))

    @torch.no_grad()
    def set(self, weights) -> None:
        """Rewrite the working adapter for weights w (one per source): B's blocks, and in "lorahub" space A too."""
        w = _vector(weights, self.size, "weights")
        for block in self.blocks.values():
            v = block.variant
            a, b = self._factors(block, w)
            if self.space == "lorahub":
                v.lora_A.copy_(v.kind.down_layout(a.to(v.lora_A)))
            v.lora_B.copy_(v.kind.up_layout(b.to(v.lora_B)))

    def remove(self) -> None:
        delete_adapter(self.model, self.name)


# ---- gradient-free search --------------------------------------------------------------------------

@dataclass
class SearchResult:
    """`weights`: the best w; `objective`: its value (loss + l1·mean|w|); `loss`: its loss alone; `trace`: the
    objective of every evaluation in order (len = budget); `points`: the w of each evaluation."""

    name: str
    space: str
    weights: list[float]
    objective: float
    loss: float
    trace: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    points: list[list[float]] = field(default_factory=list)


def es_minimize(f: Callable[[torch.Tensor], float], n: int, lo: float = -1.5, hi: float = 1.5, budget: int = 40,
                seed: int = 0, init=None, sigma: Optional[float] = None):
    """Minimise f over the box [lo, hi]^n with a (1+1)-ES and the 1/5th success rule, in exactly `budget` calls.

    Start at `init` (default 0 clipped into the box), step size `sigma` (default (hi − lo)/6). Each step draws
    y = clip(x + σ·z, lo, hi), z ~ N(0, I) (torch generator seeded with `seed`); y replaces x when f(y) ≤ f(x).
    σ ← σ·exp((success − 1/5)/d), d = √(n + 1), success = f(y) < f(x): σ grows while more than a fifth of the
    steps improve and shrinks otherwise (Rechenberg's rule in the smoothed form of Hansen's (1+1)-ES).
    Returns (best x, f(best x), [f of each call], [x of each call])."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive int, got {n!r}")
    _check_box(lo, hi)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ConfigError(f"budget must be a positive int (objective evaluations), got {budget!r}")
    sigma = (hi - lo) / 6 if sigma is None else sigma
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ConfigError(f"sigma must be a positive finite number, got {sigma!r}")
    x = torch.zeros(n, dtype=torch.float64) if init is None else _vector(init, n, "init")
    x = x.clamp(lo, hi)
    g = torch.Generator().manual_seed(seed)
    d = math.sqrt(n + 1)
    fx = float(f(x.clone()))
    trace, points = [fx], [x.tolist()]
    for _ in range(budget - 1):
        y = (x + sigma * torch.randn(n, generator=g, dtype=torch.float64)).clamp(lo, hi)
        fy = float(f(y.clone()))
        trace.append(fy)
        points.append(y.tolist())
        success = fy < fx
        if fy <= fx:
            x, fx = y, fy
        sigma = min(sigma * math.exp((float(success) - 0.2) / d), hi - lo)
    return x, fx, trace, points


def learn_weights(model: nn.Module, names: Sequence[str], batches: Sequence[dict], new_name: str,
                  loss_fn: Optional[LossFn] = None, *, space: str = "delta", budget: int = 40, lo: float = -1.5,
                  hi: float = 1.5, l1: float = 0.05, init=None, sigma: Optional[float] = None,
                  seed: int = 0) -> SearchResult:
    """LoraHub-style search: the w ∈ [lo, hi]^N minimising mean loss over `batches` + l1·mean|wᵢ|, by `es_minimize`
    in `budget` evaluations (one evaluation = one no-grad pass over every batch). Adds the mix at the best w as
    adapter `new_name` (plain LoRA, active alone): rank Σrᵢ in "delta" space, r in "lorahub" space."""
    loss_fn = loss_fn or lm_loss
    names = _check_pool(model, names)
    _check_batches(batches)
    _check_box(lo, hi)
    if not (isinstance(l1, (int, float)) and math.isfinite(l1) and l1 >= 0):
        raise ConfigError(f"l1 must be a finite number ≥ 0, got {l1!r}")
    if init is not None:
        init = _vector(init, len(names), "init")
        if (init < lo).any() or (init > hi).any():
            raise ConfigError(f"init {init.tolist()} lies outside the box [{lo}, {hi}]")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ConfigError(f"budget must be a positive int (objective evaluations), got {budget!r}")
    with _kept(model, [new_name]):
        working = Mixture(model, names, new_name, space)
        losses = []

        def objective(w: torch.Tensor) -> float:
            working.set(w)
            loss = mean_loss(model, batches, loss_fn)
            losses.append(loss)
            return loss + l1 * float(w.abs().mean())

        best, value, trace, points = es_minimize(objective, len(names), lo, hi, budget, seed, init, sigma)
        working.set(best)
        best_loss = losses[trace.index(value)]
    return SearchResult(new_name, space, best.tolist(), value, best_loss, trace, losses, points)


# ---- gradient-based per-layer scalars -----------------------------------------------------------------

class _ColumnScale(nn.Module):
    """B(λ) = B₀ with column block i multiplied by λᵢ (B₀ = [s₁B₁, …]; blocks of the given ranks)."""

    def __init__(self, init: torch.Tensor, ranks: list[int]):
        super().__init__()
        self.lam = nn.Parameter(init)
        self.register_buffer("index", torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(ranks)),
                             persistent=False)

    def forward(self, b0: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (b0.dim() - 2)
        return b0 * self.lam.to(b0.dtype)[self.index.to(b0.device)].view(shape)


@dataclass
class ScalarResult:
    """`weights`: {layer path: {adapter name: λ}} after training; `trace`: the training loss at each step;
    `loss_before` / `loss_after`: the few-shot loss (mean over batches) at the init and at the end."""

    name: str
    weights: dict[str, dict[str, float]]
    trace: list[float]
    loss_before: float
    loss_after: float


def learn_scalars(model: nn.Module, names: Sequence[str], batches: Sequence[dict], new_name: str,
                  loss_fn: Optional[LossFn] = None, *, init=None, steps: int = 100, lr: float = 1e-2,
                  weight_decay: float = 0.0) -> ScalarResult:
    """Per-layer mixing scalars trained by gradient descent: ΔW_l = Σᵢ λ_{l,i}ΔW_{l,i}, λ_{l,i} starting at init[i]
    (default uniform 1/N), AdamW(lr, weight_decay: decoupled, towards 0) for `steps` steps, batch t % len(batches)
    at step t, eval mode. Only the λ get gradients (they parametrize the working adapter's B; its A, the sources
    and the base stay frozen). Adds the mix as the plain LoRA `new_name` (rank Σrᵢ, active alone)."""
    from torch.nn.utils import parametrize

    loss_fn = loss_fn or lm_loss
    names = _check_pool(model, names)
    _check_batches(batches)
    init = torch.full((len(names),), 1.0 / len(names), dtype=torch.float64) if init is None \
        else _vector(init, len(names), "init")
    _check_steps(steps, lr, weight_decay)
    with _kept(model, [new_name]):
        working = Mixture(model, names, new_name, "delta")
        working.set(torch.ones(len(names), dtype=torch.float64))  # B holds B₀ = [s₁B₁, …]; the λ scale its blocks
        scales = {}
        for path, block in working.blocks.items():
            ranks = [a.shape[0] for a in block.a]
            lam = init[block.sources].to(block.variant.lora_B.device, torch.float32)
            scales[path] = _ColumnScale(lam, ranks)
            parametrize.register_parametrization(block.variant, "lora_B", scales[path])
        try:
            params = [s.lam for s in scales.values()]
            before = mean_loss(model, batches, loss_fn)
            trace = descend(model, params, batches, loss_fn, steps, lr, weight_decay)
            after = mean_loss(model, batches, loss_fn)
        finally:
            for block in working.blocks.values():
                parametrize.remove_parametrizations(block.variant, "lora_B", leave_parametrized=True)
                block.variant.lora_B.requires_grad_(False)
        weights = {p: {names[i]: float(s.lam[j].detach()) for j, i in enumerate(working.blocks[p].sources)}
                   for p, s in scales.items()}
    return ScalarResult(new_name, weights, trace, before, after)


# ---- controls -------------------------------------------------------------------------------------------

def mix(model: nn.Module, names: Sequence[str], weights: Sequence[float], new_name: str,
        space: str = "delta") -> str:
    """Add the fixed mix of `names` with `weights` as plain LoRA `new_name` (active alone): Σ wᵢΔWᵢ in "delta"
    space (rank Σrᵢ), (Σ wᵢsᵢBᵢ)(Σ wᵢAᵢ) in "lorahub" space."""
    names = _check_pool(model, names)
    w = _vector(weights, len(names), "weights")
    with _kept(model, [new_name]):
        Mixture(model, names, new_name, space).set(w)
    return new_name


def uniform_average(model: nn.Module, names: Sequence[str], new_name: str) -> str:
    """The control "uniform average": Σ ΔWᵢ / N as plain LoRA `new_name` (exact, rank Σrᵢ, active alone)."""
    names = _check_pool(model, names)
    return mix(model, names, [1.0 / len(names)] * len(names), new_name)


def best_single(model: nn.Module, names: Sequence[str], batches: Sequence[dict],
                loss_fn: Optional[LossFn] = None) -> tuple[str, dict[str, float]]:
    """The control "best single adapter": (the adapter of `names` with the lowest few-shot loss, {name: loss}).
    Each runs alone; the active adapters are restored afterwards."""
    names = _check_pool(model, names)
    _check_batches(batches)
    active, training = active_adapters(model), model.training
    losses = {}
    try:
        model.eval()
        for n in names:
            set_active(model, [n])
            losses[n] = mean_loss(model, batches, loss_fn)
    finally:
        set_active(model, active)
        model.train(training)
    return min(losses, key=losses.get), losses


def random_pool(model: nn.Module, like_names: Sequence[str], n: Optional[int] = None, seed: int = 0,
                prefix: str = "random") -> list[str]:
    """The control "random-LoRA pool": adds `n` (default len(like_names)) LoRAs `{prefix}{i}` whose config is that
    of like_names[i % len] (targets, ranks, alphas, rsLoRA) and whose A and B are both random: entries N(0, 1)
    (seeded), then A and B each multiplied by √(t/‖s·B·A‖_F), so every layer's ‖ΔW‖_F = s·‖B·A‖_F equals t, the
    mean ‖ΔWᵢ‖_F of the real pool at that layer (a random LoRA with B = 0 would be a no-op). Frozen, not
    activated. Returns their names."""
    like_names = _check_pool(model, like_names)
    n = len(like_names) if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive int, got {n!r}")
    new = [f"{prefix}{i}" for i in range(n)]
    taken = [x for x in new if x in adapter_names(model)]
    if taken:
        raise AdapterNameError(f"adapters {taken} already exist; pick another prefix than {prefix!r}")
    for name in like_names:
        config = get_config(model, name)
        if config.variant != "lora" or config.use_dora:
            raise ConfigError(f"random_pool copies plain LoRA configs; {name!r} is "
                              f"{'DoRA' if config.use_dora else config.variant!r}")
    layers = model_layers(model, like_names, [1.0] * len(like_names))
    target = {p: sum(_fro(part.a, part.b * part.scale) for part in layer.parts) / len(layer.parts)
              for p, layer in layers.items()}
    g = torch.Generator().manual_seed(seed)
    prepared = []
    for i, name in enumerate(new):
        p = prepare(model, get_config(model, like_names[i % len(like_names)]), name, initialize=False)
        with torch.no_grad():
            for path, v in p.variants.items():
                a, b, s = v.matrices()
                a = torch.randn(a.shape, generator=g, dtype=torch.float64)
                b = torch.randn(b.shape, generator=g, dtype=torch.float64)
                c = math.sqrt(target[path] / _fro(a, b * s))
                v.lora_A.copy_(v.kind.down_layout((a * c).to(v.lora_A)))
                v.lora_B.copy_(v.kind.up_layout((b * c).to(v.lora_B)))
        prepared.append(p)
    active = active_adapters(model)
    for p in prepared:
        attach(model, p, trainable=False)
    set_active(model, active)
    return new


# ---- checks and state -------------------------------------------------------------------------------

def _check_pool(model, names) -> list[str]:
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ConfigError(f"names must be a list of adapter names, got {names!r}")
    names = list(names)
    if not names:
        raise ConfigError("the pool is empty: give at least one adapter name")
    if len(set(names)) != len(names):
        raise ConfigError(f"adapter names repeat: {names}")
    for n in names:
        get_config(model, n)  # AdapterNameError for an unknown name
    return names


def _check_batches(batches) -> None:
    if isinstance(batches, dict) or not isinstance(batches, Sequence) or not batches:
        raise DataError("batches must be a non-empty list of batch dicts")


def _check_box(lo, hi) -> None:
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (lo, hi)) or not lo < hi:
        raise ConfigError(f"the box needs finite lo < hi, got [{lo}, {hi}]")


def _check_steps(steps, lr, weight_decay) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive int, got {steps!r}")
    for what, v in (("lr", lr), ("weight_decay", weight_decay)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ConfigError(f"{what} must be a finite number ≥ 0, got {v!r}")


def _vector(values, n: int, what: str) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().flatten().tolist()
    values = list(values)
    if len(values) != n:
        raise ConfigError(f"{what}: {n} adapters need {n} values, got {len(values)}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
        raise ConfigError(f"{what} must be finite numbers, got {values}")
    return torch.tensor(values, dtype=torch.float64)


def _fro(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖b·a‖_F from the r×r Gram matrices: ‖BA‖² = tr((BᵀB)(AAᵀ)), never the dense product."""
    return math.sqrt(max(float(((b.T @ b) * (a @ a.T)).sum()), 0.0))


@contextlib.contextmanager
def _kept(model, new: list[str]):
    """Check that the names in `new` are free; on an error inside, delete what of them was added and restore the
    active adapters; always restore the train/eval mode (the body runs in eval mode)."""
    for name in new:
        check_free_name(model, name)
    active, training = active_adapters(model), model.training
    model.eval()
    try:
        yield
    except BaseException:
        for name in new:
            if name in adapter_names(model):
                delete_adapter(model, name)
        set_active(model, active)
        raise
    finally:
        model.train(training)


