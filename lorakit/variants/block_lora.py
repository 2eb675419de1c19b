"""Block-LoRA ("One Head Eight Arms", Zhou et al., arXiv 2501.16720): LoRA whose down-projection blocks are shared."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..kinds import LinearKind
from . import register_variant
from .base import LowRankVariant


@register_variant
class BlockLoRA(LowRankVariant):
    """Block-LoRA: LoRA's factors split into blocks, all down-projection blocks shared (one head, k arms).

    Reading (the paper's method section is not available to us, only its abstract: "partitions the original
    low-rank decomposition matrix of LoRA into a series of sub-matrices while sharing all down-projection
    sub-matrices", "transforms certain complex matrix multiplication operations into simpler matrix addition"):
    the block-matrix product of LoRA with the input cut into k equal blocks x = [x_1; …; x_k], B = [B_1; …; B_k]
    (row blocks, the k "arms") and A = [A_1 … A_k] (column blocks) gives ΔW = [B_i·A_j]_{i,j}; sharing every
    down-projection block A_j = A₀ (the one "head", r × n/k) gives ΔW = s·B·A₀·[I … I] and
    ΔW·x = s·B·A₀·(Σ_j x_j): the k block products A_j·x_j become one sum of input blocks. `split="input"`
    (default). Trainable: B (m × r) and A₀ (r × n/k), i.e. m·r + r·n/k per layer; fewer FLOPs and less memory
    (A₀'s backward saves the n/k-wide block sum instead of the n-wide input). What it gives up: ΔW's k column
    blocks are equal, so it fits any such ΔW exactly but only the block average of a generic one.
    The rank-wise reading (`split="rank"`: B = [B_1 … B_k] with B_i m × r/k, shared A₀ (r/k × n),
    ΔW = s·(Σ_i B_i)·A₀, same parameter count) is kept as an option, not the default: with B = 0 at init every arm
    gets the same gradient, so the arms never part and it is a rank-r/k LoRA whose B learns k× faster (tested).
    `blocks` = k must divide the layer's input size n (`split="input"`) or r (`split="rank"`): ConfigError
    naming the option otherwise.

    Init as CLIP-LoRA / LoRA: A₀ kaiming-uniform, B = 0 (ΔW = 0); `init_lora_weights=False` makes B random.
    Works on Linear, Conv (n = in_channels·kernel size, through the factored form) and Embedding layers;
    mergeable and exportable as a plain LoRA through `factors()` = (A₀·[I … I], B, s) (or (A₀, Σ B_i, s)).
    Our own file format (peft_type LORAKIT_BLOCK_LORA): `block_lora_A` (r × n/k or r/k × n) and
    `block_lora_B` (m × r) per layer, as matrices.
    """

    name = "block_lora"
    peft_type = "LORAKIT_BLOCK_LORA"
    pair_refusal = "its A is tied across blocks (a constrained factor)"

    @dataclass
    class Options:
        blocks: int = 8  # k
        split: str = "input"  # "input": shared A₀ over input blocks; "rank": shared A₀ over rank blocks of B

        def __post_init__(self):
            if isinstance(self.blocks, bool) or not isinstance(self.blocks, int) or self.blocks < 1:
                raise ConfigError(f"option blocks must be an integer ≥ 1, got {self.blocks!r}")
            if self.split not in ("input", "rank"):
                raise ConfigError(f"option split must be 'input' or 'rank', got {self.split!r}")

    def __init__(self, kind, r, scale, dropout, config, **context):
        super().__init__(kind, r, scale, dropout, config, **context)
        k, n = self.opts.blocks, kind.in_features
        if self.opts.split == "input" and n % k:
            raise ConfigError(f"option blocks={k} must divide the input size n={n} of layer {self.path!r}")
        if self.opts.split == "rank" and r % k:
            raise ConfigError(f"option blocks={k} must divide the rank r={r} of layer {self.path!r} "
                              f"(split='rank')")
        a_shape = (r, n // k) if self.opts.split == "input" else (r // k, n)
        self.block_lora_A = nn.Parameter(torch.empty(a_shape))
        self.block_lora_B = nn.Parameter(torch.empty(kind.out_features, r))

    def initialize(self, how):
        self.kind.init_factors(self.block_lora_A, self.block_lora_B, how)

    def file_tensors(self):
        return {"block_lora_A": self.block_lora_A, "block_lora_B": self.block_lora_B}

    @property
    def lora_dtype(self):
        return self.block_lora_A.dtype

    def factors(self):
        a0, b, k = self.block_lora_A, self.block_lora_B, self.opts.blocks
        if self.opts.split == "input":
            return a0.repeat(1, k), b, self.scale  # A₀·[I … I] as (r, n)
        return a0, b.view(b.shape[0], k, -1).sum(1), self.scale  # (Σ_i B_i) with B_i = B[:, i·r/k:(i+1)·r/k]

    def delta(self, x, base_out):
        if type(self.kind) is not LinearKind or self.opts.split != "input":
            return super().delta(x, base_out)
        x = self.dropout(x)  # sum the k input blocks, then one r × n/k matmul (no n-wide A is formed)
        h = F.linear(x.unflatten(-1, (self.opts.blocks, -1)).sum(-2), self.block_lora_A)
        return F.linear(h * self.scale, self.block_lora_B)

    def add_delta_(self, out, x, base_out):
        if type(self.kind) is not LinearKind or self.opts.split != "input":
            return super().add_delta_(out, x, base_out)
        x = self.dropout(x) if self.training else x
        h = F.linear(x.unflatten(-1, (self.opts.blocks, -1)).sum(-2), self.block_lora_A)
        self.kind.add_up_(out, h.mul_(self.scale), self.block_lora_B)
