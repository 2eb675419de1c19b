"""LoRA-GA — low-rank adaptation with gradient approximation (Wang, Yu, Li, NeurIPS 2024, arXiv 2407.05000).

Training is plain LoRA (trainable A (r, in), B (out, r), s = α/r); only the init differs. `lorakit.initialize(model,
"lora-ga", dataloader=..., name=..., loss_fn=...)` (run by `lorakit train --variant lora_ga` on its init batches,
see `LoRAGA.data_init`) computes G = the average over the batches of ∂L/∂W for every adapted layer (adapters
disabled), its randomized SVD G ≈ U S Vᵀ (`torch.svd_lowrank(G, q=min(4r, min(m, n)), niter)`), and sets A₀, B₀
from singular vectors picked by `direction`, scaled by `scale`. As for PiSSA (`_residual`), the base layer is never
modified: the adapter holds the frozen offset −s·B₀A₀, so the output is unchanged at init and ΔW = s·(B·A − B₀·A₀)
(rank ≤ 2r; `export_lora` writes it as a rank-2r plain LoRA on the original base — the authors'
`save_loraga_model_final` conversion).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import ConfigError, UnsupportedFeatureError
from ..init import InitRun, passes, register_init
from . import register_variant
from ._residual import FactorResidual

DIRECTIONS = ("ArB2r", "ArBr", "A2rBr", "random")
SCALES = ("stable", "gd", "unit", "weightS")
FORMS = ("authors", "peft")


@register_variant
class LoRAGA(FactorResidual):
    """LoRA-GA on Linear / Conv1D / conv layers (conv: the flattened kernel matrix, beyond the reference, which takes
    Linear layers only): trainable r·(in + out) per layer, ΔW = s·(B·A − B₀·A₀); the file holds `lora_A.weight`,
    `lora_B.weight` (trainable) and `lora_A0`, `lora_B0` (the frozen offset factors).

    Before `lorakit.initialize(model, "lora-ga", ...)` runs, the adapter is plain LoRA: A kaiming-uniform, B = 0
    (`init_lora_weights` True / "gaussian" / False as LoRA's) and the offset is zero (A₀ = B₀ = 0), so ΔW = s·B·A.
    The data init then sets A = A₀, B = B₀ from the gradient's SVD and ΔW = 0 again.

    Options (the data init reads them from the adapter's config):
    - `direction`: "ArB2r" (default; A = V[:, :r]ᵀ, B = U[:, r:2r]), "ArBr" (A = odd, B = even components of the
      first 2r), "A2rBr" (A = V[:, r:2r]ᵀ, B = U[:, :r]), "random" (a permutation of the first 2r components drawn
      from a generator seeded with `seed`: the authors' disjoint halves; with form "peft" PEFT's shared indices).
    - `scale`: "stable" (default; A and B × m^{1/4}/√γ, m = out features, γ = `stable_gamma`), "gd" (A and B / s),
      "unit" (none), "weightS" (A and B × mean of √(S_W[:r]/s) over W's top-r singular values; exact SVD here where
      the authors use svd_lowrank(W, 4r, niter=4)).
    - `form`: "authors" (default, the paper's code: pure singular vectors on both factors) or "peft" (HF PEFT's port:
      B multiplied by diag of the S entries it takes; "stable" scales B only; "weightS" is PEFT's "weight_svd",
      B × S_W[0] / S_B[0]; "gd" and "unit" as the authors').
    - `niter` (4): subspace iterations of the randomized SVD; `seed` (0): seeds its random start (and the "random"
      direction), so the init is deterministic (re-running it on resume gives the same offset);
      `norm_clip` (False): the authors' option, shrink A₀, B₀ by √ratio when max|s·B₀A₀| > max|W|.
    A, B, A₀, B₀ are fp32 (the authors' `dtype="fp32"`); rsLoRA off as their reproduce config, but allowed.
    """

    name = "lora_ga"
    peft_type = "LORAKIT_LORA_GA"

    @dataclass
    class Options:
        direction: str = "ArB2r"
        scale: str = "stable"
        stable_gamma: float = 16
        form: str = "authors"
        niter: int = 4
        seed: int = 0
        norm_clip: bool = False

        def __post_init__(self):
            if self.direction not in DIRECTIONS:
                raise ConfigError(f"option direction must be one of {list(DIRECTIONS)}, got {self.direction!r}")
            if self.scale not in SCALES:
                raise ConfigError(f"option scale must be one of {list(SCALES)}, got {self.scale!r}")
            if self.form not in FORMS:
                raise ConfigError(f"option form must be one of {list(FORMS)}, got {self.form!r}")
            gamma = self.stable_gamma
            if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma < float("inf"):
                raise ConfigError(f"option stable_gamma must be a finite number > 0, got {gamma!r}")
            for key in ("niter", "seed"):
                value = getattr(self, key)
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ConfigError(f"option {key} must be an int >= 0, got {value!r}")
            if not isinstance(self.norm_clip, bool):
                raise ConfigError(f"option norm_clip must be true or false, got {self.norm_clip!r}")

    @classmethod
    def data_init(cls, config, schedule):
        """Runs (`lorakit train`) start with the gradient init; its settings are the adapter's options."""
        return "lora-ga", {}

    @torch.no_grad()
    def initialize(self, how):
        """Plain LoRA's init (A kaiming, B = 0; False: both random) with a zero offset, until the data init."""
        if how not in (True, False, "gaussian"):
            raise UnsupportedFeatureError(f"init_lora_weights={how!r} does not apply to variant 'lora_ga': use "
                                          f"True, 'gaussian' or False, then lorakit.initialize(model, 'lora-ga')")
        self.kind.init_factors(self.lora_A, self.lora_B, how)
        self.lora_A0.zero_()
        self.lora_B0.zero_()

    def gradient_factors(self, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A₀ (r, in), B₀ (out, r)) matrices from the averaged gradient G (out, in) per the options."""
        o, r, s = self.opts, self.r, self.scale
        m, n = grad.shape
        if 2 * r > min(m, n):
            raise ConfigError(f"lora-ga: 2r = {2 * r} exceeds min(out, in) = {min(m, n)} for {self.path or 'a layer'}"
                              f" (its init takes 2r singular components of the gradient); lower r")
        grad = grad.float()
        devices = [grad.device] if grad.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(o.seed)
            u, sv, v = torch.svd_lowrank(grad, q=min(4 * r, m, n), niter=o.niter)
            perm = torch.randperm(2 * r, device=grad.device)
        vh = v.T
        if o.direction == "ArB2r":
            ia, ib = torch.arange(r), torch.arange(r, 2 * r)
        elif o.direction == "A2rBr":
            ia, ib = torch.arange(r, 2 * r), torch.arange(r)
        elif o.direction == "ArBr":
            ia, ib = torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
        else:
            ia, ib = (perm[:r], perm[:r]) if o.form == "peft" else (perm[:r], perm[r:])
        ia, ib = ia.to(grad.device), ib.to(grad.device)
        a, b = vh[ia].clone(), u[:, ib].clone()
        peft = o.form == "peft"
        if peft:
            b = b * sv[ib]
        if o.scale == "stable":
            factor = m ** 0.25 / o.stable_gamma ** 0.5
            b = b * factor
            if not peft:
                a = a * factor
        elif o.scale == "gd":
            a, b = a / s, b / s
        elif o.scale == "weightS":
            w_s = torch.linalg.svdvals(self.base_matrix())
            if peft:
                if sv[ib][0] > 0:
                    b = b * (w_s[0] / sv[ib][0])
            else:
                avg = (w_s[:r] / s).sqrt().mean()
                a, b = a * avg, b * avg
        if o.norm_clip:
            ratio = self.base_matrix().abs().max() / (s * b @ a).abs().max()
            if ratio < 1:
                a, b = a * ratio.sqrt(), b * ratio.sqrt()
        return a, b

    @torch.no_grad()
    def init_from_gradient(self, grad: torch.Tensor) -> None:
        """A = A₀, B = B₀ from G (`gradient_factors`): ΔW = 0, the output is unchanged."""
        a, b = self.gradient_factors(grad)
        a, b = self.kind.down_layout(a), self.kind.up_layout(b)
        for t, value in ((self.lora_A, a), (self.lora_A0, a), (self.lora_B, b), (self.lora_B0, b)):
            t.copy_(value)


@register_init("lora-ga")
def init_lora_ga(run: InitRun) -> None:
    """LoRA-GA init of adapter `run.name` (variant 'lora_ga'; settings from its options) from G = the average over
    the run's batches of ∂L/∂W (`passes.weight_gradients`, one layer's gradient alive at a time)."""
    layers = passes.adapted_layers(run.model, run.name)
    wrong = sorted({type(layer.adapters[run.name]).name for layer in layers.values()} - {LoRAGA.name})
    if wrong:
        raise ConfigError(f"initialization 'lora-ga' needs adapter {run.name!r} to be variant 'lora_ga', got {wrong}")
    count = [0]
    loss_fn = run.loss_fn or passes.default_loss

    def counted(model, batch):
        count[0] += 1
        return loss_fn(model, batch)
    counting = replace(run, loss_fn=counted)
    grads = passes.weight_gradients(counting, "lora-ga gradients")
    if count[0] == 0:
        raise ConfigError("lora-ga init: the dataloader gave no batches")
    for path, layer in layers.items():
        layer.adapters[run.name].init_from_gradient(grads.pop(path) / count[0])
