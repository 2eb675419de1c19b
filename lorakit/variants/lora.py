"""LoRA (Hu et al. 2022): y = W x + s·B A dropout(x), s = α/r (α/√r with rsLoRA)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..kinds import LinearKind
from . import register_variant
from .base import TrainedPair, Variant


class _DropoutDown(torch.autograd.Function):
    """A·(x ⊙ keep), keep ~ Bernoulli(1 − p) elementwise; the 1/(1 − p) rescale is left to the caller (it folds
    into the rank-space scale). The mask comes from one `rand_like` compared in place, about twice as fast on
    CPU as the `bernoulli_` behind nn.Dropout; saved for backward as nn.Dropout + F.linear save them: x ⊙ keep,
    and keep as bool."""

    @staticmethod
    def forward(ctx, x, a, p):
        keep = torch.rand_like(x).ge_(p)  # 1.0 where kept
        xd = x * keep
        ctx.save_for_backward(xd, a, keep.bool())
        return F.linear(xd, a)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h):
        xd, a, keep = ctx.saved_tensors
        grad_x = torch.matmul(grad_h, a).mul_(keep) if ctx.needs_input_grad[0] else None
        grad_a = grad_h.reshape(-1, grad_h.shape[-1]).T @ xd.reshape(-1, xd.shape[-1]) \
            if ctx.needs_input_grad[1] else None
        return grad_x, grad_a, None


class _RowScaledGradient(torch.autograd.Function):
    """s·B·A·x whose weight gradients are computed from ∂L/∂ΔW with row i (output feature i) scaled by f_i, while
    the input gradient stays the plain one: ALLoRA's gradient adaptor (Huang & Balestriero, §4.2 and Listing 1)."""

    @staticmethod
    def forward(ctx, x, a, b, s, f):
        h = F.linear(x, a)
        ctx.save_for_backward(x, a, b, h, f)
        ctx.s = s
        return F.linear(h, b) * s

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, a, b, h, f = ctx.saved_tensors
        s = ctx.s
        gf = (g * f).reshape(-1, g.shape[-1])
        grad_b = (gf.T @ h.reshape(-1, h.shape[-1])) * s
        grad_a = ((gf @ b).T @ x.reshape(-1, x.shape[-1])) * s
        grad_x = (g @ b) @ a * s if ctx.needs_input_grad[0] else None
        return grad_x, grad_a, grad_b, None, None


@register_variant
class LoRA(Variant):
    """Trainable A (r×in, "down") and B (out×r, "up"); A kaiming-uniform, B = 0 by default.

    `grad_row_scale` (None, or a function variant → f of shape (out,)): when set (by the `allora` optimizer), the
    autograd forward of a Linear layer computes the weight gradients from ∂L/∂ΔW with its rows scaled by f."""

    name = "lora"
    uses_base_out = False
    grad_row_scale = None

    def __init__(self, kind, r, scale, dropout, config, **context):
        super().__init__(kind, r, scale, dropout, config, **context)
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
        if self.grad_row_scale is not None and torch.is_grad_enabled() and type(self.kind) is LinearKind:
            return _RowScaledGradient.apply(self.dropout(x), self.lora_A, self.lora_B, self.scale,
                                            self.grad_row_scale(self).to(x.dtype))
        return self.lora_out(self.dropout(x))

    def plus_delta(self, y, x, base_out):
        """Training: y + B·(s·A·dropout(x)), the add and the scale fused into the B matmul (one addmm: no
        output-sized delta is written and read back); on CPU, dropout and A in one step (`_DropoutDown`).
        Subclasses with their own `delta` get the plain sum."""
        if type(self).delta is not LoRA.delta or self.grad_row_scale is not None:
            return Variant.plus_delta(self, y, x, base_out)
        drop, scale, b = self.dropout, self.scale, self.lora_B
        if (isinstance(drop, nn.Dropout) and drop.training and drop.p > 0 and x.device.type == "cpu"
                and x.dtype in (torch.float32, torch.float64) and type(self.kind).down is LinearKind.down):
            h, scale = _DropoutDown.apply(x, self.lora_A, drop.p), scale / (1 - drop.p)
        else:
            h = self.kind.down(drop(x), self.lora_A)
        if (type(self.kind).up is not LinearKind.up or not y.is_contiguous() or not y.dtype == h.dtype == b.dtype
                or y.shape[:-1] != h.shape[:-1]):
            return y + self.kind.up(h * scale, b)
        return torch.addmm(y.view(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), b.T, alpha=scale).view(y.shape)

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

    def trained_pairs(self):
        return [TrainedPair(self.lora_A, self.lora_B, self.scale)]

    def delta_weight(self):
        a, b, s = self.matrices()
        return (b @ a) * s
