"""Shared base of the r×r core family (LoRA-XS, LoRA-SB, LaMDA): ΔW = s·B·R·A.

B (out×r, "up") and A (r×in, "down") are kept in LoRA's file shapes (`kind.a_shape` / `kind.b_shape`, so conv
kernels for conv layers); R is an r×r core applied in rank space. Frozen factors are buffers and are saved in the
adapter file (they depend on W or on data, so they cannot be regenerated). Not a registered variant.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from .base import LowRankVariant


class CoreVariant(LowRankVariant):
    """ΔW = s·B·R·A with an r×r core R (trainable) between B and A; forward B(R(A·x))·s, R in rank space.

    Subclasses set `core_key` (file key suffix of R) and `b_trainable` (LaMDA trains B; LoRA-XS/SB freeze it).
    `factors()` = (R·A, B, s), so merging, exporting as a plain LoRA and batched serving treat it as a LoRA.
    """

    core_key: ClassVar[str] = "lora_core.weight"
    b_trainable: ClassVar[bool] = False

    def __init__(self, kind, r, scale, dropout, config, **context):
        super().__init__(kind, r, scale, dropout, config, **context)
        self.register_buffer("lora_A", torch.empty(kind.a_shape(r)))
        if self.b_trainable:
            self.lora_B = nn.Parameter(torch.empty(kind.b_shape(r)))
        else:
            self.register_buffer("lora_B", torch.empty(kind.b_shape(r)))
        self.lora_R = nn.Parameter(torch.empty(r, r))

    def check_svd_rank(self, what: str) -> None:
        """ConfigError naming `r` when the layer has fewer than r singular triplets."""
        k = min(self.kind.out_features, self.kind.in_features)
        if self.r > k:
            raise ConfigError(f"r={self.r} exceeds min(out, in)={k} of layer {self.path!r}: {what} takes the "
                              f"top-r singular vectors of an (out×in) matrix; lower r or use rank_pattern")

    @torch.no_grad()
    def set_factors(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Write A (r, in) and B (out, r) matrices into the stored layouts."""
        self.lora_A.copy_(a.reshape(self.lora_A.shape))
        self.lora_B.copy_(b.reshape(self.lora_B.shape))

    def core_layout(self) -> torch.Tensor:
        """R in the layout `kind.up` takes (a 1×…×1 kernel on conv layers)."""
        return self.kind.up_layout(self.lora_R)

    def delta(self, x, base_out):
        k = self.kind
        return k.up(k.up(k.down(self.dropout(x), self.lora_A), self.core_layout()) * self.scale, self.lora_B)

    def add_delta_(self, out, x, base_out):
        k = self.kind
        h = k.up(k.down(self.dropout(x) if self.training else x, self.lora_A), self.core_layout())
        k.add_up_(out, h.mul_(self.scale), self.lora_B)

    def factors(self):
        return self.lora_R @ self.kind.matrix(self.lora_A), self.kind.matrix(self.lora_B), self.scale

    def file_tensors(self):
        return {self.kind.key_a: self.lora_A, self.kind.key_b: self.lora_B, self.core_key: self.lora_R}

    @property
    def lora_dtype(self):
        return self.lora_R.dtype


def top_svd(matrix: torch.Tensor, r: int, bottom: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r (m×r), S_r (r,), Vh_r (r×n)) of an exact fp32 SVD of `matrix`: the r largest singular triplets (the r
    smallest with `bottom`). Signs are fixed (each column of U_r has its largest-magnitude entry positive) so the
    result does not depend on the LAPACK build."""
    u, s, vh = torch.linalg.svd(matrix.detach().float(), full_matrices=False)
    sl = slice(len(s) - r, len(s)) if bottom else slice(0, r)
    u, s, vh = u[:, sl], s[sl], vh[sl]
    sign = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))
    sign[sign == 0] = 1
    return u * sign, s, vh * sign.T
