"""DoRA (Liu et al. 2024): W' = m ⊙ (W + sBA) / ‖W + sBA‖_row, the norm treated as a constant.

Computed as in "Scaling DoRA" (Zelenin & Zhuravlyova 2026): the row norm is factored
‖W_j‖² + 2s⟨W_j, (BA)_j⟩ + s²‖(BA)_j‖² from W·Aᵀ (out×r) and A·Aᵀ (r×r), accumulated over column
chunks in fp32, so B·A is never materialized; the output uses the stable compose
Δy = (g−1)⊙(Wx) + g⊙(s·BAx), g = m / ‖W + sBA‖. The norm is cached until W, A, B, s, dtype or
device change (tensor version counters), so inference and repeated forwards pay it once.
Multiple active DoRA adapters each use the base output (deltas summed); PEFT chains them instead.
"""
from __future__ import annotations

import torch
from torch import nn

from . import register_variant
from .base import Variant
from .lora import LoRA

CHUNK_BUDGET_BYTES = 256 * 2**20


def _stamp(*tensors) -> tuple:
    return tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)


def _chunks(weight: torch.Tensor):
    """Column ranges of `weight` whose fp32 copy fits the chunk budget (multiples of 64 wide)."""
    m, n = weight.shape
    width = max(64, min(n, CHUNK_BUDGET_BYTES // (4 * m)) // 64 * 64)
    return [slice(j, j + width) for j in range(0, n, width)]


@torch.no_grad()
def squared_row_norms(weight: torch.Tensor) -> torch.Tensor:
    """Σ_k W_jk² per row, in fp32, chunk by chunk."""
    out = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
    for cols in _chunks(weight):
        out += torch.linalg.vector_norm(weight[:, cols].float(), dim=1).square()
    return out


@torch.no_grad()
def factored_row_norm(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                      base_sq: torch.Tensor | None = None) -> torch.Tensor:
    """‖W + s·B·A‖ per row without forming B·A: `weight` (m, n), `a` (r, n), `b` (m, r); fp32 result.

    Squared norm = ‖W_j‖² + 2s·Σ_l B_jl (W Aᵀ)_jl + s²·Σ_l (B AAᵀ)_jl B_jl, with W Aᵀ and A Aᵀ
    accumulated over column chunks. `base_sq` (‖W_j‖²) may be passed in when already known.
    """
    base = squared_row_norms(weight) if base_sq is None else base_sq
    if not scale:
        return base.clamp_min(0).sqrt()
    r = a.shape[0]
    cross = torch.zeros(weight.shape[0], r, dtype=torch.float32, device=weight.device)
    gram = torch.zeros(r, r, dtype=torch.float32, device=weight.device)
    with torch.autocast(weight.device.type, enabled=False):
        for cols in _chunks(weight):
            a_c = a[:, cols].float()
            cross.addmm_(weight[:, cols].float(), a_c.T)
            gram.addmm_(a_c, a_c.T)
        b = b.float()
        total = base + 2 * scale * (b * cross).sum(1) + scale * scale * ((b @ gram) * b).sum(1)
    return total.clamp_min(0).sqrt()


@register_variant
class DoRA(LoRA):
    """LoRA A, B plus a trainable magnitude per output row (`lora_magnitude_vector`, PEFT's key)."""

    name = "dora"
    pair_refusal = "its magnitude normalisation makes ΔW a non-linear function of B·A"
    trained_pairs = Variant.trained_pairs  # not LoRA's
    reads_base_weight = uses_base_out = True

    def __init__(self, kind, r, scale, dropout, config, **context):
        super().__init__(kind, r, scale, dropout, config, **context)
        self.lora_magnitude_vector = nn.Parameter(torch.empty(kind.vector_shape()))
        self._base_sq = (None, None)
        self._norm = (None, None)

    def initialize(self, how):
        super().initialize(how)
        with torch.no_grad():  # m = ‖W + sBA‖ so that W' = W + sBA at init
            self.lora_magnitude_vector.copy_(self.weight_norm().view(self.kind.vector_shape()))

    def weight_norm(self) -> torch.Tensor:
        """‖W + s·B·A‖ per output row (fp32, detached), cached until any input changes."""
        w = self.kind.weight()
        key = _stamp(w, self.lora_A, self.lora_B) + (self.scale,)
        if self._norm[0] != key:
            base_key = _stamp(w)
            if self._base_sq[0] != base_key:
                self._base_sq = (base_key, squared_row_norms(w))
            a, b, s = self.matrices()
            self._norm = (key, factored_row_norm(w, a, b, s, base_sq=self._base_sq[1]))
        return self._norm[1]

    def magnitude_scale(self) -> torch.Tensor:
        """g = m / ‖W + sBA‖ (gradient flows to m only), shape (out,)."""
        eps = 1e-12 if self.lora_magnitude_vector.dtype in (torch.float32, torch.float64) else 1e-6
        norm = self.weight_norm().to(self.lora_magnitude_vector.dtype)
        return self.lora_magnitude_vector.flatten() / norm.clamp_min(eps)

    def delta(self, x, base_out):
        g = self.kind.per_out(self.magnitude_scale())
        if isinstance(self.dropout, nn.Identity) or not self.training:
            lora = self.lora_out(x)
            bias = getattr(self.kind.base, "bias", None)
            base = base_out if bias is None else base_out - self.kind.per_out(bias)
        else:  # dropout changes the input, so W·dropout(x) is recomputed with the same mask (as PEFT)
            x = self.dropout(x)
            lora, base = self.lora_out(x), self.kind.base_no_bias(x)
        return (g - 1) * base + g * lora

    def add_delta_(self, out, x, base_out):
        """Inference. When `out` is the base output itself, rescale it in place: g⊙(Wx + s·BAx) + bias
        (the final output, not a small delta added to it, so no cancellation); otherwise add `delta`."""
        fusable = base_out is not None and base_out.data_ptr() == out.data_ptr() and base_out.shape == out.shape
        if not fusable or out.dtype != self.lora_dtype or (self.training and not isinstance(self.dropout, nn.Identity)):
            return Variant.add_delta_(self, out, x, base_out)
        g = self.kind.per_out(self.magnitude_scale())
        bias = getattr(self.kind.base, "bias", None)
        bias = None if bias is None else self.kind.per_out(bias)
        if bias is not None:
            out -= bias
        self.kind.add_up_(out, self.kind.down(x, self.lora_A).mul_(self.scale), self.lora_B)
        out *= g
        if bias is not None:
            out += bias

    def file_tensors(self):
        return {**super().file_tensors(), "lora_magnitude_vector": self.lora_magnitude_vector}

    def factors(self):
        return None  # ΔW = (g−1)⊙W + g⊙sBA is not low-rank

    def row_scale(self, weight):
        a, b, s = self.matrices()
        norm = factored_row_norm(weight, a, b, s)
        return self.lora_magnitude_vector.detach().flatten().float() / norm
