"""Stable-LoRA (Wu, Gao, Li, Wu; ICLR 2026): shrink each LoRA A during the earliest steps, then plain AdamW.

Per module, while its one-way flag is set, every step before the AdamW update: if ‖A‖_F < (numel A / numel B)·‖B‖_F
(= (n/m)·‖B‖_F for a linear layer) the flag is cleared for good and A is left as it is; otherwise A ← (1 − λ)·A.
Then a standard AdamW step (decoupled weight decay) runs on every group. This is the reference's order
(github.com/Yize-Wu/Stable-LoRA @fadecb5, `StableLora.step`), with the strict `<`.

The shrink runs inside `step()`, so the optimizer works the same in the Trainer and in any torch loop.
A and B are paired by module (each adapter's own `lora_A` / `lora_B`), never by parameter order: group 0 holds the
A factors and group 1 the matching B factors in the same order; group 2 holds any other trainable parameter (no
shrink). The flags live in group 0 (`stable_lora_shrinking`, a list of bools), so `state_dict()` saves them and a
resumed run continues where it stopped.

Options (`optim_args`): `shrink_ratio` λ (default 5e-4, the reference example; 0 is plain AdamW); `lr`, `betas`,
`eps`, `weight_decay` override the TrainingArguments.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from . import lora_pairs, register_optimizer

_OPTIONS = {"shrink_ratio", "lr", "betas", "eps", "weight_decay"}


class StableLoRA(torch.optim.AdamW):
    """AdamW whose `step()` first shrinks each still-flagged A (group 0) against its B (group 1)."""

    def __init__(self, a_params, b_params, other_params=(), shrink_ratio: float = 5e-4, **adamw):
        a_params, b_params, other_params = list(a_params), list(b_params), list(other_params)
        if len(a_params) != len(b_params) or not a_params:
            raise ConfigError(f"stable_lora needs matching A and B factors, got {len(a_params)} A and "
                              f"{len(b_params)} B")
        if not 0.0 <= float(shrink_ratio) < 1.0:
            raise ConfigError(f"stable_lora option shrink_ratio must be in [0, 1), got {shrink_ratio!r}")
        groups = [{"params": a_params, "stable_lora_shrinking": [True] * len(a_params),
                   "shrink_ratio": float(shrink_ratio)},
                  {"params": b_params}]
        if other_params:
            groups.append({"params": other_params})
        super().__init__(groups, **adamw)

    @torch.no_grad()
    def shrink(self) -> int:
        """One shrink pass; returns how many A factors were shrunk."""
        group_a, group_b = self.param_groups[0], self.param_groups[1]
        flags, ratio, shrunk = group_a["stable_lora_shrinking"], group_a["shrink_ratio"], 0
        for i, (a, b) in enumerate(zip(group_a["params"], group_b["params"])):
            if not flags[i]:
                continue
            if a.norm() < (a.numel() / b.numel()) * b.norm():
                flags[i] = False  # for good: never shrink this module again
            else:
                a.mul_(1.0 - ratio)
                shrunk += 1
        return shrunk

    @property
    def shrinking(self) -> list[bool]:
        return list(self.param_groups[0]["stable_lora_shrinking"])

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.shrink()
        super().step()
        return loss


@register_optimizer("stable_lora")
def stable_lora(model, args, **options):
    unknown = set(options) - _OPTIONS
    if unknown:
        raise ConfigError(f"unknown stable_lora option(s) {sorted(unknown)}; known: {sorted(_OPTIONS)}")
    pairs = [(n, v.lora_A, v.lora_B) for n, v in lora_pairs(model)]
    if not pairs:
        raise ConfigError("stable_lora needs LoRA adapters with trainable lora_A and lora_B; none found")
    paired = {id(p) for _, a, b in pairs for p in (a, b)}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in paired]
    kw = dict(lr=options.get("lr", args.learning_rate),
              betas=tuple(options.get("betas", (args.adam_beta1, args.adam_beta2))),
              eps=options.get("eps", args.adam_epsilon), weight_decay=options.get("weight_decay", args.weight_decay))
    return StableLoRA([a for _, a, _ in pairs], [b for _, _, b in pairs], others,
                      shrink_ratio=options.get("shrink_ratio", 5e-4), **kw)
