"""ALLoRA (Huang & Balestriero 2024, arXiv 2410.09692): an adaptive rate inversely proportional to a norm, no dropout,
no scaling (s = 1).

The paper's rule (§4.2, and the custom autograd function of its Listing 1), the default (`granularity="output_row"`):
with g = ∂L/∂ΔW (ΔW = s·B·A, m×n) and f_i = 1/√(‖ΔW_i,:‖ + 1/η²) per output row i (the norm itself, not its
square, under the root; f_i = η at ΔW_i,: = 0), the weight gradients are computed from the adapted g̃_i = f_i·g_i:
    ∂A ← s·Bᵀ·diag(f)·g,   ∂B ← s·diag(f)·g·Aᵀ,   the input gradient unchanged ("we only modify the gradients of A
and B, but not that of the input"). B's gradient rows are scaled, A's gradient mixes them. f is computed in each
forward from the current factors (‖ΔW_i,:‖ from the r×r Gram matrix, no m×n tensor). The LoRA layer does this in its
autograd forward (`LoRA.grad_row_scale`, installed on every adapter while the optimizer lives), so it needs plain
LoRA adapters on Linear layers; then the adapted gradients go to AdamW (the paper names no optimizer; its runs
use the standard fine-tuning stack, so AdamW is our reading).

What AdamW does to it (measured in `bench/allora_planted.py`, see docs/optimizer_comparison.md): at step 1, B = 0
gives f = η on every row and ∂A = 0, so the step equals AdamW's; afterwards the rows of ∂B are rescaled (which Adam's
per-coordinate normalisation largely cancels while f moves slowly) and ∂A changes direction (which it does not).

Per-factor granularities (the card's earlier reconstruction, kept as options for any LoRA pair): "row" (one c per
row of A and of B), "column", "tensor", with c_k = 1/√(‖θ_k‖² + 1/η²) from the factor slice θ_k. They take
`apply_before_optimizer`: True scales the gradient before AdamW (g ← c·g, which Adam cancels up to ε whenever c
changes slowly); False scales AdamW's update instead (θ moves by c·u: an adaptive per-slice learning rate, the
paper's "effective learning rate η·l_b" under Adam). `output_row` exists only in the gradient placement.

Choices where the paper is silent: η defaults to 1 (its Table 1; Listing 1 uses η² = 4). Only the LoRA factors get
the rate; every other trainable parameter gets plain AdamW. The paper trains with dropout 0 and s = 1; an optimizer
does not own the adapter's configuration, so by default (`strict=True`) the factory refuses adapters with dropout
> 0 or scale ≠ 1 with a ConfigError saying how to configure them (lora_dropout=0, lora_alpha=r, or lora_alpha=√r
with use_rslora). `strict=False` accepts them (a hybrid, not the paper's method; the output-row norm is then that of
s·B·A).
"""
from __future__ import annotations

import functools
import math
import weakref

import torch

from ..errors import ConfigError, TrainingError, UnsupportedFeatureError
from ..kinds import LinearKind
from ..variants.lora import LoRA
from . import lora_pairs, register_optimizer

GRANULARITIES = ("output_row", "row", "column", "tensor")


def output_row_rate(v, eta: float) -> torch.Tensor:
    """f_i = 1/√(‖ΔW_i,:‖ + 1/η²) for the rows of ΔW = s·B·A of LoRA adapter `v` (detached, shape (out,))."""
    a, b = v.lora_A.detach().float(), v.lora_B.detach().float()
    row_sq = ((b @ (a @ a.T)) * b).sum(1).clamp_min(0)  # ‖(B·A)_i,:‖²
    return (abs(v.scale) * row_sq.sqrt() + 1.0 / eta ** 2).rsqrt()


class ALLoRA(torch.optim.AdamW):
    """AdamW whose "allora" group (the LoRA factors of `pairs`, ("path", variant) items) gets the per-slice rate c.
    With granularity "output_row" the rate acts inside the layers' backward (see the module doc; installed while
    the optimizer lives, and re-synced when a state dict changes the granularity) and `step` is AdamW's."""

    def __init__(self, groups, pairs, **adamw):
        super().__init__(groups, **adamw)
        self.pairs = pairs
        self.kinds = {id(p): v.kind for _, v in pairs for p in (v.lora_A, v.lora_B)}
        self._installed = [None]  # the rate function this optimizer handed out (its finalizer takes only that back)
        self.sync_row_rates()
        weakref.finalize(self, _take_back, [v for _, v in pairs], self._installed)

    def sync_row_rates(self) -> None:
        """Give the adapters the paper's output-row rate when the group's granularity is "output_row", else none."""
        group = next(g for g in self.param_groups if g.get("allora"))
        variants = [v for _, v in self.pairs]
        _take_back(variants, self._installed)
        if group["granularity"] != "output_row":
            return
        for path, v in self.pairs:
            if type(v) is not LoRA or type(v.kind) is not LinearKind:
                raise UnsupportedFeatureError(
                    f"allora: adapter {path} is a {v.name!r} adapter on a {type(v.kind.base).__name__}; the paper's "
                    "output-row rate needs plain LoRA on Linear layers (or pass granularity='row', 'column' or "
                    "'tensor')")
        self._installed[0] = functools.partial(output_row_rate, eta=group["eta"])
        for v in variants:
            v.grad_row_scale = self._installed[0]

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.sync_row_rates()

    def rate(self, p: torch.Tensor, group: dict | None = None) -> torch.Tensor:
        """c for every element of factor `p` (shaped like `p`), from its current value (per-factor granularities)."""
        group = group or next(g for g in self.param_groups if any(q is p for q in g["params"]))
        kind = self.kinds[id(p)]
        x = kind.matrix(p.detach()).to(torch.promote_types(p.dtype, torch.float32))
        sq = {"row": lambda: x.pow(2).sum(1, keepdim=True), "column": lambda: x.pow(2).sum(0, keepdim=True),
              "tensor": lambda: x.pow(2).sum()}[group["granularity"]]()
        c = (sq + 1.0 / group["eta"] ** 2).rsqrt()
        return c.expand_as(x).reshape(p.shape)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        moves = []
        for group in self.param_groups:
            if not group.get("allora") or group["granularity"] == "output_row":
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                c = self.rate(p, group)
                if group["apply_before_optimizer"]:
                    p.grad.mul_(c.to(p.grad.dtype))
                else:
                    moves.append((p, p.detach().clone(), c))
        super().step()
        for p, old, c in moves:
            p.copy_((old + c * (p - old)).to(p.dtype))
        return loss


def _check_adapters(pairs, strict):
    if not strict:
        return
    for path, v in pairs:
        p = getattr(getattr(v, "dropout", None), "p", 0.0)
        if p > 0:
            raise ConfigError(f"allora: adapter {path} has dropout {p}; ALLoRA trains without dropout: set "
                              "lora_dropout=0 (or pass optim_args strict=false to keep it)")
        if not math.isclose(float(v.scale), 1.0, rel_tol=1e-9):
            raise ConfigError(f"allora: adapter {path} has scale {float(v.scale):g}; ALLoRA uses s = 1: set "
                              "lora_alpha = r (lora_alpha = √r with use_rslora), or pass optim_args strict=false")


def _take_back(variants, installed: list) -> None:
    """Remove the rate function `installed[0]` from the adapters still holding it."""
    for v in variants:
        if installed[0] is not None and v.grad_row_scale is installed[0]:
            v.grad_row_scale = None
    installed[0] = None


@register_optimizer("allora")
def allora(model, args, **options):
    opts = dict(granularity="output_row", eta=1.0, apply_before_optimizer=True, strict=True)
    for key, value in options.items():
        if key not in opts:
            raise ConfigError(f"unknown allora option {key!r}; known: {sorted(opts)}")
        opts[key] = value
    if opts["granularity"] not in GRANULARITIES:
        raise ConfigError(f"allora option granularity must be one of {GRANULARITIES}, got {opts['granularity']!r}")
    eta = opts["eta"]
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta > 0 or not math.isfinite(eta):
        raise ConfigError(f"allora option eta must be a positive finite number, got {eta!r}")
    for key in ("apply_before_optimizer", "strict"):
        if not isinstance(opts[key], bool):
            raise ConfigError(f"allora option {key} must be true or false, got {opts[key]!r}")
    if opts["granularity"] == "output_row" and not opts["apply_before_optimizer"]:
        raise ConfigError("allora: granularity 'output_row' scales ∂L/∂ΔW inside the backward (the paper's "
                          "placement); apply_before_optimizer=false needs granularity 'row', 'column' or 'tensor'")
    pairs = lora_pairs(model)
    if not pairs:
        raise TrainingError("allora needs LoRA adapters with trainable lora_A/lora_B factors; none found")
    _check_adapters(pairs, opts["strict"])
    factors = [p for _, v in pairs for p in (v.lora_A, v.lora_B)]
    ids = {id(p) for p in factors}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [dict(params=factors, allora=True, eta=float(eta), granularity=opts["granularity"],
                   apply_before_optimizer=opts["apply_before_optimizer"])]
    if others:
        groups.append(dict(params=others, allora=False))
    return ALLoRA(groups, pairs, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                  eps=args.adam_epsilon, weight_decay=args.weight_decay)
