"""Shared base of the decomposition family (PiSSA, OLoRA, LoLDU): adapters that start from a decomposition of W.

These methods split W into a part to train and a frozen residual. PEFT writes the residual into the base weight;
here the base layer stays untouched (several adapters share one base in mixed batches and serving) and the adapter
holds the split as a frozen offset instead: with trainable factors (A, B) that start at the frozen (A₀, B₀),

    y = W x + s·B·A·dropout(x) − s·B₀·A₀·x,    ΔW = s·(B·A − B₀·A₀)    (= 0 at init),

which is exactly low-rank (rank ≤ 2r): `factors()` = ([A; A₀], [B, −B₀], s), so merging, batched serving and
`lorakit.export_lora` (a rank-2r plain LoRA that PEFT / vLLM load on the ORIGINAL base) follow. Dropout is applied
to the trainable path only, as PEFT does (its residual W_res·x sees the undropped x).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedFeatureError
from .base import LowRankVariant, TrainedPair


class ResidualVariant(LowRankVariant):
    """ΔW = s·(B·A − B₀·A₀) from trainable factors (A, B) and frozen offset factors (A₀, B₀).

    Subclasses give `trainable_factors()` and `offset_factors()` as (A (r, in), B (out, r)) matrices and may
    override `factors()` with a shorter exact form (LoLDU's shares B). Any layer kind: conv layers decompose the
    flattened kernel matrix (out, in·k·k), embeddings Wᵀ (beyond the reference implementations, which take Linear
    layers only); the rank is at most min(out, in).
    """

    def __init__(self, kind, r, scale, dropout, config, **context):
        super().__init__(kind, r, scale, dropout, config, **context)
        limit = min(kind.out_features, kind.in_features)
        if r > limit:
            raise ConfigError(f"r={r} for {self.path or 'a layer'} exceeds min(out_features, in_features) = {limit}: "
                              f"variant {self.name!r} takes the r leading components of W (lower r or set "
                              f"rank_pattern for this layer)")

    def trainable_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def offset_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def base_matrix(self) -> torch.Tensor:
        """W as a detached (out, in) matrix in at least fp32 (decompositions run in fp32, as PEFT's)."""
        w = self.kind.weight().detach()
        return w.to(torch.promote_types(w.dtype, torch.float32))

    @staticmethod
    def check_how(name: str, how) -> None:
        if how not in (True, False):
            raise UnsupportedFeatureError(f"init_lora_weights={how!r} does not apply to variant {name!r}: its init "
                                          f"is the decomposition of W (True), or random trainable factors (False)")

    def factors(self):
        a, b = self.trainable_factors()
        a0, b0 = self.offset_factors()
        return torch.cat([a, a0]), torch.cat([b, -b0], dim=1), self.scale

    def _drops(self) -> bool:
        return self.training and isinstance(self.dropout, nn.Dropout)

    def delta(self, x, base_out):
        if not self._drops():
            return super().delta(x, base_out)  # dropout is the identity: one rank-2r pass
        (a, b), (a0, b0), s, k = self.trainable_factors(), self.offset_factors(), self.scale, self.kind
        return (k.up(k.down(self.dropout(x), k.down_layout(a)) * s, k.up_layout(b))
                - k.up(k.down(x, k.down_layout(a0)) * s, k.up_layout(b0)))

    def add_delta_(self, out, x, base_out):
        if self._drops():
            out += self.delta(x, base_out)
        else:
            super().add_delta_(out, x, base_out)


class FactorResidual(ResidualVariant):
    """PiSSA / OLoRA: trainable `lora_A` (r, in), `lora_B` (out, r) (PEFT's shapes and keys) initialized to a
    decomposition (A₀, B₀) of W that `decompose` gives, and the frozen copies `lora_A0`, `lora_B0` saved with
    them. Trainable parameters: r·(in + out) per layer."""

    def __init__(self, kind, r, scale, dropout, config, **context):
        super().__init__(kind, r, scale, dropout, config, **context)
        self.lora_A = nn.Parameter(torch.empty(kind.a_shape(r)))
        self.lora_B = nn.Parameter(torch.empty(kind.b_shape(r)))
        self.register_buffer("lora_A0", torch.empty(kind.a_shape(r)))
        self.register_buffer("lora_B0", torch.empty(kind.b_shape(r)))

    def decompose(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A₀ (r, in), B₀ (out, r)) from W (out, in, fp32 or wider)."""
        raise NotImplementedError

    @torch.no_grad()
    def initialize(self, how):
        """True: A = A₀, B = B₀ (ΔW = 0); False: A, B random as LoRA's `False` (a non-identity adapter, tests)."""
        self.check_how(self.name, how)
        a0, b0 = self.decompose(self.base_matrix())
        a0, b0 = self.kind.down_layout(a0), self.kind.up_layout(b0)  # conv kernels on conv layers
        self.lora_A0.copy_(a0)
        self.lora_B0.copy_(b0)
        if how is False:
            self.kind.init_factors(self.lora_A, self.lora_B, False)
        else:
            self.lora_A.copy_(a0)
            self.lora_B.copy_(b0)

    def trainable_factors(self):
        return self.kind.matrix(self.lora_A), self.kind.matrix(self.lora_B)

    def offset_factors(self):
        return self.kind.matrix(self.lora_A0), self.kind.matrix(self.lora_B0)

    def trained_pairs(self):
        return [TrainedPair(self.lora_A, self.lora_B, self.scale)]  # the offset −s·B₀A₀ is constant

    def file_tensors(self):
        return {self.kind.key_a: self.lora_A, self.kind.key_b: self.lora_B, "lora_A0": self.lora_A0,
                "lora_B0": self.lora_B0}
