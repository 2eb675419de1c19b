"""ALLoRA (Huang & Balestriero 2024, arXiv 2410.09692): a norm-based adaptive rate for the LoRA factors, no dropout,
no scaling (s = 1).

Card: training.md §3 (the exact rule is the card's reconstruction, marked [U] there). For each LoRA factor θ (A: r×n,
B: m×r, taken through the adapter kind's matrix view) and each slice θ_k of the chosen granularity:
    c_k = 1 / √(‖θ_k‖² + 1/η²)        (so c_k ≤ η: a zero-initialised B row gets exactly η)
- granularity "row" (default; the card's "per parameter vector"): one c per row of A and per row of B;
  "column": one per column; "tensor": one per factor.
- apply_before_optimizer=True (default; the paper's abstract scales "the per sample and per parameter gradients"):
  g ← c·g, then AdamW. False: AdamW computes its update u (incl. decoupled decay) and the factor moves by c·u,
  i.e. c multiplies the per-slice learning rate.
c is computed from the factor's value before the step. Gradients are rescaled in place (`p.grad` holds c·g after
the step in the "before" placement).

Choices where the card is silent:
- η defaults to 1.0 [U] (option `eta`).
- Only the LoRA factors (adapters with `lora_A`/`lora_B`, found by module) get the rate; every other trainable
  parameter gets plain AdamW.
- The card forces dropout 0 and s = 1. An optimizer does not own the adapter's configuration (changing the scale
  here would make the saved config lie about the trained weights), so by default (`strict=True`) the factory
  refuses adapters with dropout > 0 or scale ≠ 1 with a ConfigError that says how to configure them
  (lora_dropout=0, lora_alpha=r, or lora_alpha=√r with use_rslora). `strict=False` accepts them: the rate is then
  applied as above, and the adapter keeps its own dropout and scale (a hybrid, not the paper's method).
"""
from __future__ import annotations

import math

import torch

from ..errors import ConfigError, TrainingError
from . import lora_pairs, register_optimizer

GRANULARITIES = ("row", "column", "tensor")


class ALLoRA(torch.optim.AdamW):
    """AdamW whose "allora" group (the LoRA factors) gets the per-slice rate c; `kinds` maps id(param) → kind."""

    def __init__(self, groups, kinds, **adamw):
        super().__init__(groups, **adamw)
        self.kinds = kinds

    def rate(self, p: torch.Tensor, group: dict | None = None) -> torch.Tensor:
        """c for every element of factor `p` (shaped like `p`), from its current value."""
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
            if not group.get("allora"):
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


@register_optimizer("allora")
def allora(model, args, **options):
    opts = dict(granularity="row", eta=1.0, apply_before_optimizer=True, strict=True)
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
    pairs = lora_pairs(model)
    if not pairs:
        raise TrainingError("allora needs LoRA adapters with trainable lora_A/lora_B factors; none found")
    _check_adapters(pairs, opts["strict"])
    kinds = {id(p): v.kind for _, v in pairs for p in (v.lora_A, v.lora_B)}
    factors = [p for _, v in pairs for p in (v.lora_A, v.lora_B)]
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in kinds]
    groups = [dict(params=factors, allora=True, eta=float(eta), granularity=opts["granularity"],
                   apply_before_optimizer=opts["apply_before_optimizer"])]
    if others:
        groups.append(dict(params=others, allora=False))
    return ALLoRA(groups, kinds, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                  eps=args.adam_epsilon, weight_decay=args.weight_decay)
