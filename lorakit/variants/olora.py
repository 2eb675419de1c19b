"""OLoRA — orthonormal low-rank adaptation (Büyükakyüz, arXiv 2406.01775).

W = Q R (`torch.linalg.qr` of the (out, in) matrix in fp32, reduced, no sign normalization — as PEFT's
`olora_init`); the trainable pair starts at B₀ = Q[:, :r], A₀ = R[:r, :] (no division by the scale: s·B₀A₀ is s times
the leading part, as PEFT). The residual W − s·B₀A₀ is a frozen offset held by the adapter, the base layer is never
modified (see `_residual`). On transformers Conv1D layers the QR is of the (out, in) matrix; PEFT's `olora_init`
takes the stored (in, out) weight as is there, so its adapter does not even keep the output at init — we differ
on purpose. `AdapterConfig(init_lora_weights="olora")` (PEFT's spelling) selects this variant.
"""
from __future__ import annotations

import torch

from . import register_variant
from ._residual import FactorResidual


@register_variant
class OLoRA(FactorResidual):
    """OLoRA on any layer kind (conv: the flattened kernel matrix): trainable r·(in + out) per layer;
    ΔW = s·(B·A − B₀·A₀), 0 at init; file holds `lora_A.weight`, `lora_B.weight` (trainable) and `lora_A0`,
    `lora_B0` (the frozen leading QR part)."""

    name = "olora"
    peft_type = "LORAKIT_OLORA"

    def decompose(self, w):
        q, r_ = torch.linalg.qr(w)
        return r_[:self.r], q[:, :self.r]
