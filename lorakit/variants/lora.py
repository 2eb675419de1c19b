"""LoRA (Hu et al. 2022): y = W x + s·B A dropout(x), s = α/r (α/√r with rsLoRA)."""
from __future__ import annotations

import torch
from torch import nn

from . import register_variant
from .base import Variant


@register_variant
class LoRA(Variant):
    """Trainable A (r×in, "down") and B (out×r, "up"); A kaiming-uniform, B = 0 by default."""

    name = "lora"
    uses_base_out = False

    def __init__(self, kind, r, scale, dropout, config):
        super().__init__(kind, r, scale, dropout, config)
        self.lora_A = nn.Parameter(torch.empty(kind.a_shape(r)))
        self.lora_B = nn.Parameter(torch.empty(kind.b_shape(r)))

    def initialize(self, how):
        self.kind.init_factors(self.lora_A, self.lora_B, how)

    def lora_out(self, x):
        """B·(s·A·x): the scale is applied in rank space, the cheapest place (pass x after dropout)."""
        return self.kind.up(self.kind.down(x, self.lora_A) * self.scale, self.lora_B)

    @property
    def lora_dtype(self):
        return self.lora_A.dtype

    def delta(self, x, base_out):
        return self.lora_out(self.dropout(x))

    def add_delta_(self, out, x, base_out):
        """Fused for inference: h = s·A·x in rank space, then B·h added into `out` with no output-sized temporary."""
        h = self.kind.down(self.dropout(x) if self.training else x, self.lora_A)
        self.kind.add_up_(out, h.mul_(self.scale), self.lora_B)

    def file_tensors(self):
        return {self.kind.key_a: self.lora_A, self.kind.key_b: self.lora_B}

    def matrices(self):
        """(A, B, s) with A as (r, in) and B as (out, r) matrices."""
        return self.kind.matrix(self.lora_A), self.kind.matrix(self.lora_B), self.scale

    def factors(self):
        return self.matrices()

    def delta_weight(self):
        a, b, s = self.matrices()
        return (b @ a) * s
