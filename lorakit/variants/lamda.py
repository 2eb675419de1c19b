"""LaMDA / LaMDA++ (Azizi, Kundu, Pedram, EMNLP Findings 2024, arXiv 2406.12832).

y = W x + s·B S A x: A frozen, S (r×r) trainable, B trainable and then frozen column by column by a step schedule
until only S trains. LaMDA++ picks per-layer ranks from the normalized spectrum of each W: `plus_plus_ranks`.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError
from . import register_variant
from ._core import CoreVariant, top_svd


@register_variant
class LaMDA(CoreVariant):
    """Frozen A ("PMA", r×in), trainable S ("LDA", r×r) and B ("PMB", out×r); s = α/r. Trainable parameters per
    layer: r² + out·r while B trains, r² once B is frozen.

    Init (`init="kaiming"`, the released code): A kaiming-uniform (PEFT's LoRA A), B = 0, S kaiming-uniform as an
    `nn.Linear(r, r)` ⇒ ΔW = 0. `init="svd"` (the paper's "projections from the singular vectors of W"; details
    unverified): A = V_rᵀ, B = U_r of W's top-r SVD and S = 0 ⇒ ΔW = 0 (S trains first). `init_lora_weights=False`
    makes B random (kaiming init) or S random (svd init); "gaussian" draws A ~ N(0, 1/r²) as PEFT's LoRA.

    Gradual freezing of B (`freeze_step`, run by the lorakit Trainer through `before/after_optimizer_step`): before
    optimizer step k (1-based) of T, the first t columns of B are frozen, with
    - `schedule="reference"` (default, the released code): t = ⌊k / (η·T)⌋ — one more column every η·T steps
      (so with η = 0.3 only ⌊1/η⌋ = 3 columns freeze unless r ≤ 3);
    - `schedule="linear"` (the paper's "after t_i iterations only S trains", t_i = η·T): t = ⌊r·k / (η·T)⌋.
    Once t ≥ r, B stops requiring grad and only S trains. Frozen columns get zero gradient (as the reference)
    and are also restored after the step, so momentum and weight decay cannot move them (the reference only zeroes
    the gradient, which lets AdamW keep moving them). Gradient clipping in the Trainer runs before the hooks, so it
    still sees the frozen columns' gradients. Columns freeze in index order (with `init="svd"`: largest singular
    value first). Plain torch loop: wrap `optimizer.step()` in `with gradual_freeze(model, step, total_steps):`.
    """

    name = "lamda"
    peft_type = "LORAKIT_LAMDA"
    pair_refusal = "it trains an r×r core next to B (three factors)"
    core_key = "lora_sigma.weight"
    b_trainable = True

    @dataclass
    class Options:
        eta: float = 0.3  # η: the freezing schedule's period as a fraction of the run
        schedule: str = "reference"  # "reference": t = ⌊k/(ηT)⌋; "linear": t = ⌊r·k/(ηT)⌋
        init: str = "kaiming"  # "kaiming" (released code) or "svd" (A, B from W's singular vectors)

        def __post_init__(self):
            if not (isinstance(self.eta, (int, float)) and 0 < self.eta < math.inf):
                raise ConfigError(f"option eta must be a finite number > 0, got {self.eta!r}")
            if self.schedule not in ("reference", "linear"):
                raise ConfigError(f"option schedule must be 'reference' or 'linear', got {self.schedule!r}")
            if self.init not in ("kaiming", "svd"):
                raise ConfigError(f"option init must be 'kaiming' or 'svd', got {self.init!r}")

    def __init__(self, kind, r, scale, dropout, config, **context):
        super().__init__(kind, r, scale, dropout, config, **context)
        if self.opts.init == "svd":
            self.check_svd_rank("LaMDA's init='svd'")
        self._frozen: Optional[tuple[int, torch.Tensor]] = None  # (t, copy of B's first t columns) during a step

    @torch.no_grad()
    def initialize(self, how):
        if self.opts.init == "svd":
            u, _, vh = top_svd(self.kind.weight(), self.r)
            self.set_factors(vh, u)
            nn.init.kaiming_uniform_(self.lora_R, a=math.sqrt(5)) if how is False else nn.init.zeros_(self.lora_R)
            return
        self.kind.init_factors(self.lora_A, self.lora_B, how)  # A kaiming (or N(0, 1/r²)), B = 0 (random if False)
        nn.init.kaiming_uniform_(self.lora_R, a=math.sqrt(5))

    # ---- gradual freezing of B ------------------------------------------------------------------
    def frozen_columns(self, step: int, total_steps: int) -> int:
        """How many leading columns of B are frozen for optimizer step `step` (0-based) of `total_steps`."""
        if total_steps <= 0 or step < 0:
            raise ConfigError(f"need 0 ≤ step and total_steps > 0, got step={step}, total_steps={total_steps}")
        period = self.opts.eta * total_steps
        k = step + 1  # the reference counts iterations from 1
        t = math.floor(self.r * k / period) if self.opts.schedule == "linear" else math.floor(k / period)
        return min(t, self.r)

    @torch.no_grad()
    def freeze_step(self, step: int, total_steps: int) -> int:
        """Before optimizer step `step` (0-based) of `total_steps`: zero the gradient of B's frozen columns and
        remember them (`restore_frozen` puts them back after the step); once all r are frozen, B stops requiring
        grad. Returns the number of frozen columns."""
        t = self.frozen_columns(step, total_steps)
        b = self.lora_B
        if t >= self.r:
            b.requires_grad_(False)
            b.grad = None
        elif t > 0 and b.grad is not None:
            b.grad[:, :t] = 0
        self._frozen = (t, b[:, :t].clone()) if t > 0 else None
        return t

    @torch.no_grad()
    def restore_frozen(self) -> None:
        """After the optimizer step: put B's frozen columns back to their values before it."""
        if self._frozen is not None:
            t, saved = self._frozen
            self.lora_B[:, :t] = saved
            self._frozen = None

    def before_optimizer_step(self, trainer) -> None:
        self.freeze_step(trainer.step, trainer.total_steps)

    def after_optimizer_step(self, trainer) -> None:
        self.restore_frozen()


@contextlib.contextmanager
def gradual_freeze(model: nn.Module, step: int, total_steps: int):
    """LaMDA's B schedule in a plain torch loop, around the optimizer step (`step` is 0-based):

        loss.backward()
        with gradual_freeze(model, step, total_steps):
            optimizer.step()
    """
    variants = [m for m in model.modules() if isinstance(m, LaMDA)]
    for v in variants:
        v.freeze_step(step, total_steps)
    try:
        yield
    finally:
        for v in variants:
            v.restore_frozen()


def plus_plus_ranks(model: nn.Module, config, budget: Optional[int] = None, r_min: int = 1,
                    r_max: Optional[int] = None) -> dict[str, int]:
    """LaMDA++ per-layer ranks for the layers `config` targets in `model` (a `rank_pattern` by full module path).

    The paper describes a "lite-weight normalized-spectrum (energy)" analysis without a formula; the one chosen
    here: each layer's normalized energy spectrum e_ℓ,i = σ_ℓ,i² / ‖W_ℓ‖_F² (Conv: flattened kernel), and the ranks
    maximize the total captured energy Σ_ℓ Σ_{i ≤ r_ℓ} e_ℓ,i subject to Σ_ℓ r_ℓ = `budget` (default config.r ×
    number of layers, i.e. the same average rank) and r_min ≤ r_ℓ ≤ min(r_max, out, in). Spectra are decreasing, so
    taking the largest remaining e_ℓ,i across all layers one rank at a time is optimal; ties go to the earlier
    layer. Layers whose energy is spread out (flat spectrum) get more rank than ones dominated by a few directions.
    """
    from ..kinds import kind_for
    from ..layers import AdaptedLayer
    from ..model import plan_targets

    sites = []
    for path, module in plan_targets(model, config):
        base = module.base_layer if isinstance(module, AdaptedLayer) else module
        w = (module.kind if isinstance(module, AdaptedLayer) else kind_for(base)).weight().detach().float()
        energy = torch.linalg.svdvals(w).pow(2)
        sites.append((path, energy / energy.sum().clamp_min(torch.finfo(energy.dtype).tiny)))
    budget = config.r * len(sites) if budget is None else budget
    caps = [len(e) if r_max is None else min(r_max, len(e)) for _, e in sites]
    if r_min < 1 or any(c < r_min for c in caps):
        raise ConfigError(f"r_min={r_min} must be ≥ 1 and ≤ every layer's rank cap {min(caps, default=0)}")
    if not len(sites) * r_min <= budget <= sum(caps):
        raise ConfigError(f"budget={budget} must lie in [{len(sites) * r_min}, {sum(caps)}] for {len(sites)} "
                          f"layers with r_min={r_min}, r_max={r_max}")
    candidates = [(-e[i].item(), li, i) for li, ((_, e), cap) in enumerate(zip(sites, caps))
                  for i in range(r_min, cap)]
    ranks = [r_min] * len(sites)
    for _, li, _ in sorted(candidates)[:budget - len(sites) * r_min]:
        ranks[li] += 1
    return {path: r for (path, _), r in zip(sites, ranks)}
