"""LoRA-SB, "Silver Bullet" (arXiv 2411.19557): LoRA-XS's architecture, initialized from the first-step update.

`lorakit.initialize(model, "lora-sb", dataloader=..., name=..., lr=..., total_steps=...)` runs the gradient pass.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError
from ..init import passes, register_init
from . import register_variant
from ._core import CoreVariant, top_svd


@register_variant
class LoRASB(CoreVariant):
    """Frozen B (out×r) and A (r×in), trainable R (r×r, r² parameters per layer); y = W x + B R A x with s = 1.

    The scale is always 1: the reference forces α = r ("hyperparameter independent"), so `lora_alpha` and
    `use_rslora` are ignored. The data-driven init (`lorakit.initialize(model, "lora-sb", ...)`, see `init_lora_sb`)
    sets B = U_r, R = S_r, A = V_rᵀ from the rank-r SVD of ΔW₁ = −η·sign(Σ ∂L/∂W): ΔW ≠ 0 on purpose and W is not
    adjusted (training starts "one step in").

    Before that init runs the adapter is usable and well defined, but is not LoRA-SB's init: B = U_r and A = V_rᵀ
    from the SVD of W (orthonormal, as after the data init) and R = 0, so ΔW = 0 (R still gets gradients);
    `init_lora_weights=False` draws R ~ N(0, 1/r) instead. B and A are buffers saved in the adapter file.
    """

    name = "lora_sb"
    peft_type = "LORAKIT_LORA_SB"
    pair_refusal = "it trains only an r×r core between frozen factors"
    core_key = "lora_latent_mapping.weight"

    def __init__(self, kind, r, scale, dropout, config, **context):
        super().__init__(kind, r, 1.0, dropout, config, **context)
        self.check_svd_rank("LoRA-SB")

    @classmethod
    def data_init(cls, config, schedule):
        """Runs (`lorakit train`) start with the data init, η = the run's first warm-up learning rate."""
        warmup_ratio = schedule["warmup_steps"] / schedule["total_steps"]
        return "lora-sb", {"lr": schedule["learning_rate"], "total_steps": schedule["total_steps"],
                           "warmup_ratio": warmup_ratio}

    @torch.no_grad()
    def initialize(self, how):
        u, _, vh = top_svd(self.kind.weight(), self.r)
        self.set_factors(vh, u)
        if how is False:
            nn.init.normal_(self.lora_R, std=self.r ** -0.5)
        else:
            nn.init.zeros_(self.lora_R)

    @torch.no_grad()
    def init_from_update(self, update: torch.Tensor, svd: str = "exact", niter: int = 10) -> None:
        """B = U_r, R = diag(S_r), A = V_rᵀ from the rank-r SVD of `update` (an (out, in) ΔW₁): B·R·A is its best
        rank-r approximation (exactly with `svd="exact"`; `"lowrank"` is `torch.svd_lowrank` as the reference)."""
        if svd == "exact":
            u, s, vh = top_svd(update, self.r)
        else:
            u, s, v = torch.svd_lowrank(update.float(), q=self.r, niter=niter)
            vh = v.T
        self.set_factors(vh, u)
        self.lora_R.copy_(torch.diag(s))


@register_init("lora-sb")
def init_lora_sb(run, lr: Optional[float] = None, total_steps: Optional[int] = None, warmup_ratio: float = 0.02,
                 eta: Optional[float] = None, svd: str = "exact", niter: int = 10) -> None:
    """LoRA-SB init of adapter `run.name` from the summed base-weight gradient G over the run's batches.

    ΔW₁ = −η·sign(G), η = `eta` if given, else the first warm-up learning rate lr / (warmup_ratio·total_steps)
    (the reference's η_eff; lr when warmup_ratio·total_steps < 1); then B = U_r, R = S_r, A = V_rᵀ from ΔW₁'s
    rank-r SVD (`svd="exact"`: `torch.linalg.svd`; `"lowrank"`: `torch.svd_lowrank(niter=niter)`, the reference's).
    """
    if eta is None:
        if lr is None or total_steps is None:
            raise ConfigError("lora-sb init needs eta=..., or lr=... and total_steps=... (η = lr / warm-up steps)")
        if not (lr > 0 and isinstance(total_steps, int) and total_steps > 0 and 0 <= warmup_ratio <= 1):
            raise ConfigError(f"lora-sb init: need lr > 0, integer total_steps > 0 and warmup_ratio in [0, 1]; got "
                              f"lr={lr}, total_steps={total_steps!r}, warmup_ratio={warmup_ratio}")
        eta = lr / max(1.0, warmup_ratio * total_steps)
    if not (isinstance(eta, (int, float)) and 0 < eta < math.inf):
        raise ConfigError(f"lora-sb init: eta must be a finite number > 0, got {eta!r}")
    if svd not in ("exact", "lowrank"):
        raise ConfigError(f"lora-sb init: svd must be 'exact' or 'lowrank', got {svd!r}")
    layers = passes.adapted_layers(run.model, run.name)
    wrong = sorted({type(layer.adapters[run.name]).name for layer in layers.values()} - {LoRASB.name})
    if wrong:
        raise ConfigError(f"initialization 'lora-sb' needs adapter {run.name!r} to be variant 'lora_sb', got {wrong}")
    grads = passes.weight_gradients(run, "lora-sb gradients")
    for path, layer in layers.items():
        layer.adapters[run.name].init_from_update(-eta * torch.sign(grads[path]), svd, niter)
