"""LoRA+ (Hayou, Ghosh, Yu; ICML 2024): AdamW with a λ times higher learning rate for the B factors.

Parameter groups as in the reference (`loraplus/lora_plus.py`) and PEFT's `create_loraplus_optimizer`:
- "lora_A": every other trainable parameter (A factors, 2-D heads, ...) at lr;
- "embedding": both factors of adapters on embedding layers at a fixed `loraplus_lr_embedding` (default 1e-6);
- "lora_B": B factors and every 1-D trainable parameter at λ·lr (`loraplus_lr_ratio`, default 16), split into
  "lora_B" (decayed) and "lora_B_no_decay" (biases and normalization-layer parameters: weight decay 0).
Weight decay: `loraplus_weight_decay` when given, else the run's `args.weight_decay` (PEFT reads only
`loraplus_weight_decay` and silently ignores the plain weight decay; we do not). Empty groups are left out; each
group carries its "name". The trainer scales each group's own `initial_lr`, so the ratio holds through the schedule.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from ..kinds import EmbeddingKind
from ..layers import AdaptedLayer
from . import register_optimizer
from .standard import trainable

_OPTIONS = ("loraplus_lr_ratio", "loraplus_lr_embedding", "loraplus_weight_decay")


def _number(name, value, minimum=0.0, strict=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < minimum or (strict and value == minimum):
        bound = ">" if strict else "≥"
        raise ConfigError(f"optim option {name} must be a finite number {bound} {minimum:g}, got {value!r}")
    return float(value)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def loraplus_groups(model: nn.Module, lr: float, loraplus_lr_ratio: float = 16.0, loraplus_lr_embedding: float = 1e-6,
                    weight_decay: float = 0.0) -> list[dict]:
    """The LoRA+ parameter groups of `model`'s trainable parameters (see the module doc)."""
    trainable(model)  # raises when nothing is trainable
    embedding_ids = set()
    for layer in model.modules():
        if isinstance(layer, AdaptedLayer):
            for variant in layer.adapters.values():
                if isinstance(getattr(variant, "kind", None), EmbeddingKind):
                    embedding_ids.update(id(p) for p in variant.parameters())
    no_decay_ids = set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if _is_norm(module) or "bias" in pname:
                no_decay_ids.add(id(p))
    groups = {"lora_A": [], "embedding": [], "lora_B": [], "lora_B_no_decay": []}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in embedding_ids:
            groups["embedding"].append(p)
        elif "lora_B" in name or p.ndim == 1:
            groups["lora_B_no_decay" if ("bias" in name or id(p) in no_decay_ids) else "lora_B"].append(p)
        else:
            groups["lora_A"].append(p)
    settings = {"lora_A": (lr, weight_decay), "embedding": (loraplus_lr_embedding, weight_decay),
                "lora_B": (lr * loraplus_lr_ratio, weight_decay), "lora_B_no_decay": (lr * loraplus_lr_ratio, 0.0)}
    return [{"params": params, "lr": settings[g][0], "weight_decay": settings[g][1], "name": g}
            for g, params in groups.items() if params]


@register_optimizer("loraplus")
def loraplus(model, args, **options):
    """AdamW over LoRA+ groups. Options: loraplus_lr_ratio (λ > 0, default 16), loraplus_lr_embedding (≥ 0,
    default 1e-6), loraplus_weight_decay (≥ 0, default args.weight_decay)."""
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown loraplus option(s) {unknown}; known: {list(_OPTIONS)}")
    ratio = _number("loraplus_lr_ratio", options.get("loraplus_lr_ratio", 16.0), strict=True)
    emb = _number("loraplus_lr_embedding", options.get("loraplus_lr_embedding", 1e-6))
    wd = _number("loraplus_weight_decay", options.get("loraplus_weight_decay", args.weight_decay))
    groups = loraplus_groups(model, args.learning_rate, ratio, emb, wd)
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_epsilon, weight_decay=wd)
