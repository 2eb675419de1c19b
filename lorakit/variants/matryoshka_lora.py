"""MatryoshkaLoRA (Modoranu, Safaryan, Alistarh, arXiv 2605.07850): a LoRA with a fixed diagonal P between the
factors that trains all nested ranks ρ ∈ S at once, y = W x + s·B diag(P) A x, P_i = Σ_{ρ∈S, ρ≥i} c(ρ); at
inference any rank ρ gives y = W x + s·c(ρ)·B[:, :ρ] A[:ρ] x (`lorakit.variants.matryoshka_lora.at_rank`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ConfigError
from . import register_variant
from ._nested import NestedRankVariant, at_rank, export_at_rank, get_rank, set_rank
from .base import TrainedPair

__all__ = ["MatryoshkaLoRA", "at_rank", "set_rank", "get_rank", "export_at_rank",
           "default_train_ranks", "rank_weight", "diagonal"]

C_FORMS = ("none", "rank", "sqrt")


def default_train_ranks(r: int) -> list[int]:
    """Powers of two ≤ r, plus r itself when r is not one (else components above the largest power never train)."""
    ranks = [2 ** i for i in range(r.bit_length()) if 2 ** i <= r]
    return ranks if ranks[-1] == r else ranks + [r]


def rank_weight(rho: int, c: str) -> float:
    """c(ρ): 1 ("none"), 1/ρ ("rank") or 1/√ρ ("sqrt")."""
    return {"none": 1.0, "rank": 1.0 / rho, "sqrt": 1.0 / math.sqrt(rho)}[c]


def diagonal(r: int, train_ranks: list[int], c: str, mode: str = "diag") -> torch.Tensor:
    """P (length r, fp64): P_i = Σ_{ρ∈S, ρ≥i} c(ρ) (i 1-based; Algorithm 1), divided by |S| for mode "binary"."""
    p = torch.tensor([sum(rank_weight(rho, c) for rho in train_ranks if rho >= i) for i in range(1, r + 1)],
                     dtype=torch.float64)
    return p / len(train_ranks) if mode == "binary" else p


@register_variant
class MatryoshkaLoRA(NestedRankVariant):
    """LoRA pair A (r×in), B (out×r, zeros) and a fixed, non-trainable diagonal P (a buffer, rebuilt from the
    options, not saved); trainable parameters r·(in + out) per layer, as LoRA. A ~ U(±1/√r): the reference
    (IST-DASLab/MatryoshkaLoRA `adapters/lora.py` L20-28) stores A as (in, r) and runs kaiming_uniform_(a=√5) on it,
    whose fan-in is r (PEFT's (r, in) layout would give U(±1/√in), ~10× smaller at in = 768, r = 8); embeddings
    keep LoRA's reversed init (A = 0).

    Training and default inference/merge/export: ΔW = s·B diag(P) A — Σ_{ρ∈S} c(ρ)·B[:, :ρ]A[:ρ] (times s) in one
    product, every nested rank each step, no sampling. `at_rank(model, k)`: ΔW = s·c(k)·B[:, :k]A[:k]
    (`rank_form="scale"`, the card and the reference's inference path) or s·B[:, :k] diag(P[:k]) A[:k]
    (`rank_form="diag"`, the training form truncated).

    Scale: the reference has no α (its LoRA scale is c(r) alone); lorakit's usual s (α/r, or α/√r with rsLoRA)
    multiplies every form, so lora_alpha = r (s = 1) is the reference exactly.
    Options: `train_ranks` S (default powers of two ≤ r, plus r when r is not a power of two — choice: otherwise
    the top components would have P = 0 and never train; ranks above a layer's r are dropped for that layer);
    `c` ∈ {"none", "rank", "sqrt"} (default "sqrt", used in the released scripts); `mode` "diag" (Algorithm 1) or
    "binary" (the reference's explicit masked sum Σ c(ρ)/|S|·B_ρA_ρ, computed here as the equal diag product P/|S|).
    """

    name = "matryoshka_lora"
    peft_type = "LORAKIT_MATRYOSHKA_LORA"

    @dataclass
    class Options:
        train_ranks: Optional[list] = None  # S; None: powers of two ≤ r (plus r)
        c: str = "sqrt"  # c(ρ): "none" 1, "rank" 1/ρ, "sqrt" 1/√ρ
        mode: str = "diag"  # "diag" (Algorithm 1) or "binary" (masked sum, weights c(ρ)/|S|)
        rank_form: str = "scale"  # at rank k: "scale" s·c(k)·B_k A_k, or "diag" s·B_k diag(P[:k]) A_k

        def __post_init__(self):
            if self.train_ranks is not None:
                if (not isinstance(self.train_ranks, (list, tuple)) or not self.train_ranks
                        or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.train_ranks)):
                    raise ConfigError(f"option train_ranks must be a non-empty list of positive ints, "
                                      f"got {self.train_ranks!r}")
                self.train_ranks = sorted(set(int(k) for k in self.train_ranks))
            if self.c not in C_FORMS:
                raise ConfigError(f"option c must be one of {list(C_FORMS)}, got {self.c!r}")
            if self.mode not in ("diag", "binary"):
                raise ConfigError(f"option mode must be 'diag' or 'binary', got {self.mode!r}")
            if self.rank_form not in ("scale", "diag"):
                raise ConfigError(f"option rank_form must be 'scale' or 'diag', got {self.rank_form!r}")

    def __init__(self, kind, r, scale, dropout, config, **context):
        super().__init__(kind, r, scale, dropout, config, **context)
        s = self.opts.train_ranks
        if s is not None and min(s) > r:
            raise ConfigError(f"option train_ranks {s} has no rank ≤ r = {r} on {self.path or 'a layer'}")
        self.train_ranks = default_train_ranks(r) if s is None else [k for k in s if k <= r]
        self.register_buffer("lora_P", diagonal(r, self.train_ranks, self.opts.c, self.opts.mode).float(),
                             persistent=False)

    def rank_factors(self, k):
        a, b = self.matrices()
        if self.opts.rank_form == "diag":
            return self.lora_P[:k, None].to(a.dtype) * a[:k], b[:, :k], self.scale
        return a[:k], b[:, :k], self.scale * rank_weight(k, self.opts.c)

    def initialize(self, how):
        self.kind.init_factors_rank_fan_in(self.lora_A, self.lora_B, how)

    def _diag_pair(self, k):
        k = min(k, max(self.train_ranks))  # P = 0 above the largest train rank: those components never move
        return TrainedPair(self.lora_A, self.lora_B, self.scale, slice(0, k), self.lora_P[:k])

    def rank_pair(self, k):
        if self.opts.rank_form == "diag":
            return self._diag_pair(k)
        return TrainedPair(self.lora_A, self.lora_B, self.scale * rank_weight(k, self.opts.c), slice(0, k))

    def default_pair(self):
        return self._diag_pair(self.r)

    def default_factors(self):
        a, b = self.matrices()
        return self.lora_P[:, None].to(a.dtype) * a, b, self.scale
