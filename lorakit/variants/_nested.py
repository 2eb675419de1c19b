"""Shared base of the nested-rank variants (DyLoRA, MatryoshkaLoRA): one LoRA pair A (r×in), B (out×r) whose
leading k components form a usable adapter of rank k for every k ≤ r, plus the rank context both use.

- `at_rank(model, k, name=None)` (context manager) / `set_rank(model, k, name=None)`: run, merge and export the
  nested adapter(s) at rank k (k is clipped to each layer's own r). k = None restores the variant's default form.
  The rank is held by the adapter's `RankState` (`model.lorakit_shared[name]`) as an int buffer, so layers agree
  and cached stacked factors (mixed-batch serving) notice the change.
- `factors()` honours the rank, so `lorakit.export_lora` inside `at_rank(model, k)` writes a plain rank-k PEFT LoRA
  (`export_at_rank` does exactly that), and merge / dense ΔW use the same rank.
- Without a rank set, `factors()` (merge, export, serving) gives the variant's default form (DyLoRA: rank r_max;
  MatryoshkaLoRA: the P-weighted sum), while the training forward uses the variant's training form
  (`train_factors`: DyLoRA's sampled rank). Inside `at_rank` the rank applies to training too.

Unmerge recomputes ΔW, so unmerge under the same rank as the merge (as with any change of adapter state).
Mixed-batch routing (`lorakit.route`) runs `factors()`: in training mode with no rank set it gives the default
form, not DyLoRA's sampled rank (train DyLoRA unrouted).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError
from .base import LowRankVariant, Shared


class RankState(Shared):
    """Model-wide rank setting of one nested-rank adapter: `rank` (0 = the variant's default form) and `r_max`
    (the largest layer rank). Holds no trainable state and writes nothing to files."""

    def __init__(self, r_max: int, config=None):
        super().__init__()
        self.r_max, self.config = r_max, config
        self.register_buffer("rank", torch.zeros((), dtype=torch.long), persistent=False)

    @property
    def fixed_rank(self) -> Optional[int]:
        k = int(self.rank)
        return k or None

    @torch.no_grad()
    def set(self, k: Optional[int]) -> None:
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ConfigError(f"rank must be a positive int or None, got {k!r}")
        self.rank.fill_(0 if k is None else k)  # in place: the buffer's version tells caches the state changed


class NestedRankVariant(LowRankVariant):
    """A LoRA pair evaluable at any leading rank k. Subclasses implement `rank_factors(k)` (A (k, in), B (out, k),
    scale) and `default_factors()`; `train_factors()` defaults to `default_factors()`."""

    state_class = RankState

    def __init__(self, kind, r, scale, dropout, config, **context):
        super().__init__(kind, r, scale, dropout, config, **context)
        self.lora_A = nn.Parameter(torch.empty(kind.a_shape(r)))
        self.lora_B = nn.Parameter(torch.empty(kind.b_shape(r)))

    @classmethod
    def build_shared(cls, config, sites):
        return cls.state_class(max(s.r for s in sites), config)

    def initialize(self, how):
        self.kind.init_factors(self.lora_A, self.lora_B, how)  # A kaiming-uniform, B = 0 (both random if False)

    def file_tensors(self):
        return {self.kind.key_a: self.lora_A, self.kind.key_b: self.lora_B}

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as (r, in) and (out, r) matrices."""
        return self.kind.matrix(self.lora_A), self.kind.matrix(self.lora_B)

    def current_rank(self) -> Optional[int]:
        """The rank set by `at_rank`/`set_rank`, clipped to this layer's r; None when none is set."""
        k = self.shared.fixed_rank if self.shared is not None else None
        return None if k is None else min(k, self.r)

    def rank_factors(self, k: int):
        raise NotImplementedError

    def default_factors(self):
        raise NotImplementedError

    def train_factors(self):
        return self.default_factors()

    def trained_pairs(self):
        if self.training and self.current_rank() is None:
            return [self.train_pair()]
        k = self.current_rank()
        return [self.default_pair() if k is None else self.rank_pair(k)]

    def rank_pair(self, k: int):
        """The `TrainedPair` of `rank_factors(k)`."""
        raise NotImplementedError

    def default_pair(self):
        raise NotImplementedError

    def train_pair(self):
        return self.default_pair()

    def factors(self):
        k = self.current_rank()
        return self.default_factors() if k is None else self.rank_factors(k)

    def layouts(self):
        a, b, s = self.train_factors() if self.training and self.current_rank() is None else self.factors()
        return self.kind.down_layout(a), self.kind.up_layout(b), s

    def extra_repr(self):
        return f"r={self.r}, scale={self.scale:g}, rank={self.current_rank() or 'default'}"


def _states(model: nn.Module, name: Optional[str]) -> list[RankState]:
    shared = getattr(model, "lorakit_shared", None) or {}
    if name is not None:
        state = shared[name] if name in shared else None
        if not isinstance(state, RankState):
            raise ConfigError(f"adapter {name!r} is not a nested-rank adapter (dylora, matryoshka_lora)")
        return [state]
    states = [s for s in shared.values() if isinstance(s, RankState)]
    if not states:
        raise ConfigError("the model holds no nested-rank adapter (dylora, matryoshka_lora)")
    return states


def set_rank(model: nn.Module, k: Optional[int], name: Optional[str] = None) -> None:
    """Run (and merge, export, serve) nested adapter `name` (all of them when None) at rank k; None: default form."""
    for state in _states(model, name):
        state.set(k)


def get_rank(model: nn.Module, name: str = "default") -> Optional[int]:
    return _states(model, name)[0].fixed_rank


@contextlib.contextmanager
def at_rank(model: nn.Module, k: Optional[int], name: Optional[str] = None):
    """`set_rank(model, k, name)` for the block, then the previous rank(s) back."""
    states = _states(model, name)
    before = [s.fixed_rank for s in states]
    for s in states:
        s.set(k)
    try:
        yield model
    finally:
        for s, k0 in zip(states, before):
            s.set(k0)


def export_at_rank(model: nn.Module, directory, k: int, name: str = "default"):
    """`lorakit.export_lora` of adapter `name` truncated to rank k: a plain PEFT LoRA of rank min(k, r) per layer."""
    from ..io.export import export_lora

    with at_rank(model, k, name):
        return export_lora(model, directory, name)
