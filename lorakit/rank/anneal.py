"""In-tuning rank annealing (LoRA-Squeeze's "In-Squeeze", training.md §7): during training, re-factor each LoRA
layer of an adapter from its source rank down to `r_target` at scheduled steps.

At cut i of `cuts` (evenly spaced optimizer steps from `start` to `end`; `end` defaults to half of the run), each
layer's rank becomes round(r_src − (r_src − r_target)·f(i/cuts)), f(t) = t ("linear") or (1 − cos πt)/2 ("cosine"),
so the last cut reaches r_target. A cut replaces the layer's `lora_A`/`lora_B` parameters by new ones holding the
best rank-k approximation of B·A (exact QR-of-factors route, `lorakit.rank.squeeze`), keeps the layer's scale s
(so s·B'A' is the rank-k truncation of the live ΔW), and in every param group of the optimizer swaps each old
parameter for its replacement at the same position, dropping the old parameter's state: the optimizer state of
re-factored modules is reset (the card's default; [U] in the paper). Optimizers that keep their own per-parameter
bookkeeping may define `replace_parameters({old: new})`, which is then called instead of the generic swap.
At the end the adapter's config is rewritten (r / lora_alpha, rank_pattern / alpha_pattern by path) so that
rank_for/scale_for match every layer: `save_adapter` then writes a loadable folder.

Use as a trainer hook: `Trainer(..., hooks=[RankAnnealer(model, "default", r_target=8)])`, or `.attach()` to
register it on the model itself (then lorakit's Trainer finds it automatically). With `model=None` it binds to
`trainer.model` at its first call: `lorakit.train.run.train(config, hooks=[RankAnnealer(None, r_target=8)])`.
In a plain torch loop call `annealer.step(step, total_steps, optimizer)` after each `optimizer.step()`.
Limits: plain LoRA adapters (variant "lora", no DoRA); not under DDP (its gradient buckets hold the old
parameters); a checkpoint taken after a cut resumes only into a model annealed to the same ranks. As a trainer
hook, each cut forgets the trainer's best evaluation (a best state from before a cut has other shapes), so
`load_best_model_at_end` picks among evaluations after the last cut.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError, TrainingError
from .squeeze import factor_svd, split_factors

SCHEDULES = ("linear", "cosine")


class RankAnnealer(nn.Module):
    """Anneal adapter `name`'s ranks to `r_target` over `cuts` re-factorizations between steps `start` and `end`.

    An nn.Module without parameters (so `attach()` can register it on the model for the trainer to find); the model
    is held by a plain reference, not as a submodule."""

    def __init__(self, model: Optional[nn.Module], name: str = "default", r_target: int = 8, cuts: int = 4, start: int = 0,
                 end: Optional[int] = None, schedule: str = "linear", reset_optimizer: bool = True):
        super().__init__()
        if not isinstance(r_target, int) or r_target < 1:
            raise ConfigError(f"option r_target must be a positive int, got {r_target!r}")
        if not isinstance(cuts, int) or cuts < 1:
            raise ConfigError(f"option cuts must be a positive int, got {cuts!r}")
        if schedule not in SCHEDULES:
            raise ConfigError(f"option schedule must be one of {SCHEDULES}, got {schedule!r}")
        if start < 0 or (end is not None and end <= start):
            raise ConfigError(f"options start/end must satisfy 0 ≤ start < end, got {start}, {end}")
        self.name, self.r_target, self.cuts, self.start, self.end = name, r_target, cuts, start, end
        self.schedule, self.reset_optimizer = schedule, reset_optimizer
        self.done: list[tuple[int, dict[str, int]]] = []  # (step, ranks) of each cut made
        object.__setattr__(self, "model", None)
        if model is not None:
            self.bind(model)

    def bind(self, model: nn.Module) -> "RankAnnealer":
        """Take the source ranks from `model` (done by the constructor, or by the first trainer call when the
        annealer was made with model=None, e.g. as a `hooks=` entry of `lorakit.train.run.train`)."""
        object.__setattr__(self, "model", model)  # not a submodule (no cycle, no state_dict entries)
        self.r_source = {path: v.r for path, v in self._variants().items()}
        if not self.r_source:
            raise ConfigError(f"adapter {self.name!r} has no layers to anneal")
        return self

    def _variants(self) -> dict[str, nn.Module]:
        from ..layers import AdaptedLayer
        from ..model import get_config

        config = get_config(self.model, self.name)
        if config.variant != "lora" or config.use_dora:
            raise ConfigError(f"rank annealing re-factors plain LoRA adapters; {self.name!r} is {config.variant!r}"
                              f"{' with DoRA' if config.use_dora else ''}")
        return {p: m.adapters[self.name] for p, m in self.model.named_modules()
                if isinstance(m, AdaptedLayer) and self.name in m.adapters}

    def attach(self) -> "RankAnnealer":
        """Register on the model (as `model.lorakit_rank_annealer`) so lorakit's Trainer runs it as a hook."""
        self.model.add_module("lorakit_rank_annealer", self)
        return self

    def detach(self) -> None:
        if getattr(self.model, "lorakit_rank_annealer", None) is self:
            delattr(self.model, "lorakit_rank_annealer")

    # ---- schedule ----------------------------------------------------------------------------------------------
    def cut_steps(self, total_steps: int) -> list[int]:
        """Optimizer-step counts (after that many steps) at which cuts happen."""
        end = self.end if self.end is not None else max(self.start + 1, total_steps // 2)
        return [max(1, round(self.start + (end - self.start) * (i + 1) / self.cuts)) for i in range(self.cuts)]

    def ranks_at_cut(self, i: int) -> dict[str, int]:
        """Per-layer ranks after cut i (0-based)."""
        t = (i + 1) / self.cuts
        f = t if self.schedule == "linear" else (1 - math.cos(math.pi * t)) / 2
        return {p: max(self.r_target, min(r, round(r - (r - self.r_target) * f))) for p, r in self.r_source.items()}

    # ---- hook --------------------------------------------------------------------------------------------------
    def after_optimizer_step(self, trainer) -> None:
        if self.model is None:
            self.bind(trainer.model)
        if isinstance(getattr(trainer, "wrapped", None), nn.parallel.DistributedDataParallel):
            raise TrainingError("rank annealing replaces parameters, which DistributedDataParallel does not allow")
        if self.step(trainer.step + 1, trainer.total_steps, trainer.optimizer):  # trainer.step counts after hooks
            trainer.best, trainer.best_state, trainer.evals_without_gain = None, None, 0  # shapes changed

    def step(self, step: int, total_steps: int, optimizer: Optional[torch.optim.Optimizer] = None) -> bool:
        """Cut if `step` (optimizer steps done) is a scheduled cut; True when it cut."""
        steps = self.cut_steps(total_steps)
        if step not in steps:
            return False
        for i, s in enumerate(steps):  # a repeated step (rounding) cuts once, to the later rank
            if s == step:
                ranks = self.ranks_at_cut(i)
        self.refactor(ranks, optimizer)
        self.done.append((step, ranks))
        return True

    @torch.no_grad()
    def refactor(self, ranks: dict[str, int], optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
        """Re-factor every layer to `ranks[path]` (no-op for layers already at that rank); fix `optimizer`."""
        swapped = {}
        for path, v in self._variants().items():
            k = ranks.get(path, v.r)
            if k >= v.r:
                continue
            a, b = v.kind.matrix(v.lora_A), v.kind.matrix(v.lora_B)
            new_a, new_b = split_factors(factor_svd(a, b, 1.0), k)  # s·(B'A') = [s·B·A]_k: the scale stays
            for attr, new in (("lora_A", v.kind.down_layout(new_a)), ("lora_B", v.kind.up_layout(new_b))):
                old = getattr(v, attr)
                param = nn.Parameter(new.to(dtype=old.dtype, device=old.device).contiguous(),
                                     requires_grad=old.requires_grad)
                setattr(v, attr, param)
                swapped[old] = param
            v.r = k
        if optimizer is not None and swapped:
            replace_in_optimizer(optimizer, swapped, self.reset_optimizer)
        self._update_config()
        return swapped

    def _update_config(self) -> None:
        from ..model import _book

        config = _book(self.model).configs[self.name]
        variants = self._variants()
        ranks = {p: v.r for p, v in variants.items()}
        alphas = {p: float(v.scale) * (math.sqrt(v.r) if config.use_rslora else v.r) for p, v in variants.items()}
        r = max(set(ranks.values()), key=list(ranks.values()).count)
        alpha = max(set(alphas.values()), key=list(alphas.values()).count)
        _book(self.model).configs[self.name] = dataclasses.replace(
            config, r=r, lora_alpha=alpha, rank_pattern={p: k for p, k in ranks.items() if k != r},
            alpha_pattern={p: a for p, a in alphas.items() if a != alpha})


def replace_in_optimizer(optimizer: torch.optim.Optimizer, mapping: dict, reset: bool = True) -> None:
    """Point `optimizer` at new parameters: each old parameter in its param groups is replaced, at the same
    position, by `mapping[old]`; the old parameter's state is dropped (`reset`; the shapes changed, so state cannot
    be carried over in general). An optimizer's own `replace_parameters(mapping)` takes precedence."""
    custom = getattr(optimizer, "replace_parameters", None)
    if callable(custom):
        custom(mapping)
        return
    for group in optimizer.param_groups:
        group["params"] = [mapping.get(p, p) for p in group["params"]]
    for old in mapping:
        state = optimizer.state.pop(old, None)
        if state is not None and not reset:
            raise TrainingError("re-factored parameters change shape; their optimizer state cannot be kept")
