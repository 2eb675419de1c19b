"""DyLoRA (Valipour et al., EACL 2023, arXiv 2210.07558): a LoRA trained so every leading rank b ≤ r_max works.

Each optimizer step trains the truncation A[:b], B[:, :b] for one sampled b, scaled by α/b; at inference any
b ≤ r_max gives y = W x + (α/b)·B[:, :b] A[:b] x, with no retraining (`lorakit.variants.dylora.at_rank`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ConfigError
from . import register_variant
from ._nested import NestedRankVariant, RankState, at_rank, export_at_rank, get_rank, set_rank
from .base import TrainedPair

__all__ = ["DyLoRA", "DyLoRARanks", "at_rank", "set_rank", "get_rank", "export_at_rank",
           "resample"]


class DyLoRARanks(RankState):
    """The adapter's rank state plus the training rank b, drawn once per optimizer step for all layers.

    b for step t (0-based) is a pure function of (seed, t) (`sample`), so runs and resumed runs draw the same
    sequence. The lorakit Trainer calls `after_optimizer_step`, which draws b for the next step; a plain torch loop
    calls `resample(model, step)` (or `state.resample(step)`) before each step's forward.
    """

    def __init__(self, r_max, config):
        super().__init__(r_max, config)
        opts = DyLoRA.parse_options(config.options)
        self.choices = list(opts.ranks) if opts.ranks is not None else list(range(1, r_max + 1))
        too_big = [k for k in self.choices if k > r_max]
        if too_big:
            raise ConfigError(f"option ranks has values {too_big} above the largest layer rank {r_max}")
        self.seed = opts.seed if opts.seed is not None else torch.initial_seed() % 2 ** 31
        self.register_buffer("train_rank", torch.zeros((), dtype=torch.long), persistent=False)
        self.resample(0)

    def sample(self, step: int) -> int:
        """The rank b drawn for optimizer step `step` (uniform over the choices)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return self.choices[int(torch.randint(len(self.choices), (), generator=g))]

    @torch.no_grad()
    def resample(self, step: int) -> int:
        b = self.sample(step)
        self.train_rank.fill_(b)
        return b

    def before_training(self, trainer) -> None:
        self.resample(trainer.step)  # a resumed run continues with the rank of its own step

    def after_optimizer_step(self, trainer) -> None:
        self.resample(trainer.step + 1)  # trainer.step is the step just taken; its counter moves on after the hooks


@register_variant
class DyLoRA(NestedRankVariant):
    """LoRA pair A (r_max×in, kaiming-uniform), B (out×r_max, zeros); trainable parameters r_max·(in + out) per
    layer, as LoRA.

    Training (model.train(), no rank set): the forward uses the rank b held by the adapter's `DyLoRARanks`
    (`model.lorakit_shared[name]`), one b for all layers per optimizer step, b uniform over `ranks` (default
    1..r_max, the card's i ~ U{0..r_max−1}, b = i + 1). The truncated factors are scaled so the effective scale is
    s·r_max/b (= α/b for s = α/r_max; the reference multiplies both factors by √(r_max/b)). Sampling happens in the
    Trainer's `after_optimizer_step` hook (choice: a hook rather than a draw per forward, so gradient-accumulation
    micro-batches and all layers share b); a plain loop calls `dylora.resample(model, step)`.
    `frozen=True` (default; the reference GLUE scripts' frozen mode): components 1..b−1 are detached, so only
    component b (row b of A, column b of B) gets gradient; as in the reference only the gradient is cut, so an
    optimizer with momentum or weight decay may still move the others. `frozen=False`: all b components train
    (with `ranks=S` this is the MatryoshkaLoRA repository's DyLoRA baseline).

    Inference / merge / export: rank r_max by default (α/r_max·B A, a plain LoRA); `at_rank(model, k)` gives
    (α/k)·B[:, :k] A[:k] (k clipped to each layer's r). With `rank_pattern`, a layer of rank r < b runs at r with
    scale s·r/r (its own full rank).
    """

    name = "dylora"
    peft_type = "LORAKIT_DYLORA"
    state_class = DyLoRARanks

    @dataclass
    class Options:
        frozen: bool = True  # only component b trains (reference GLUE scripts); False: all b components train
        ranks: Optional[list] = None  # the ranks b is drawn from (uniformly); None: 1..r_max
        seed: Optional[int] = None  # seed of the rank draws (b for step t is a function of (seed, t)); None: the
        # torch seed when the adapter is made (the run's seed under `lorakit train`), so seeds vary the draws too

        def __post_init__(self):
            if not isinstance(self.frozen, bool):
                raise ConfigError(f"option frozen must be true or false, got {self.frozen!r}")
            if self.ranks is not None:
                if (not isinstance(self.ranks, (list, tuple)) or not self.ranks
                        or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.ranks)):
                    raise ConfigError(f"option ranks must be a non-empty list of positive ints, got {self.ranks!r}")
                self.ranks = sorted(set(int(k) for k in self.ranks))
            if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
                raise ConfigError(f"option seed must be an int or null, got {self.seed!r}")

    def rank_scale(self, k: int) -> float:
        """Scale of the rank-k truncation: s·r/k (α/k for s = α/r)."""
        return self.scale * self.r / k

    def rank_factors(self, k):
        a, b = self.matrices()
        return a[:k], b[:, :k], self.rank_scale(k)

    def default_factors(self):
        return self.rank_factors(self.r)

    def rank_pair(self, k):
        return TrainedPair(self.lora_A, self.lora_B, self.rank_scale(k), slice(0, k))

    def default_pair(self):
        return self.rank_pair(self.r)

    def train_pair(self):
        """The step's truncation at its sampled rank b: components < b are constant in frozen mode."""
        k = min(int(self.shared.train_rank), self.r)
        first = k - 1 if self.opts.frozen else 0
        return TrainedPair(self.lora_A, self.lora_B, self.rank_scale(k), slice(first, k))

    def train_factors(self):
        k = min(int(self.shared.train_rank), self.r)
        a, b = self.matrices()
        a, b = a[:k], b[:, :k]
        if self.opts.frozen and k > 1:
            a = torch.cat([a[:k - 1].detach(), a[k - 1:]])
            b = torch.cat([b[:, :k - 1].detach(), b[:, k - 1:]], dim=1)
        return a, b, self.rank_scale(k)


def _ranks(model, name: str) -> DyLoRARanks:
    shared = getattr(model, "lorakit_shared", None) or {}
    state = shared[name] if name in shared else None
    if not isinstance(state, DyLoRARanks):
        raise ConfigError(f"adapter {name!r} is not a DyLoRA adapter")
    return state


def resample(model, step: int, name: str = "default") -> int:
    """Draw the training rank of DyLoRA adapter `name` for optimizer step `step` (plain torch loops); returns it."""
    return _ranks(model, name).resample(step)


def train_rank(model, name: str = "default") -> int:
    """The rank DyLoRA adapter `name` trains at in the current step."""
    state = _ranks(model, name)
    return int(state.train_rank)
