"""PiSSA — principal singular values and vectors adaptation (Meng et al., arXiv 2404.02948).

W = U S Vᵀ; the trainable pair starts at the top-r principal part: A₀ = diag(√(S_r/s))·V_rᵀ, B₀ = U_r·diag(√(S_r/s))
(S_r divided by the scale s so that s·B₀A₀ = U_r S_r V_rᵀ for any α), the same values PEFT's `pissa_init` gives
(SVD in fp32 of the (out, in) matrix; `niter=k` is PEFT's "pissa_niter_k": `torch.svd_lowrank(W, q=r, niter=k)`
drawing its random start from the global torch RNG, as PEFT). The residual W − s·B₀A₀ is a frozen offset held by the
adapter, the base layer is never modified (see `_residual`). `AdapterConfig(init_lora_weights="pissa")` /
"pissa_niter_4" (PEFT's spelling) selects this variant. On half-precision bases A, B, A₀, B₀ stay fp32 and the output
at init is exactly the base's; PEFT rounds A, B (and its residual) to the base dtype there, so its output moves a
little at init — our factors rounded to bf16 are PEFT's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ConfigError
from . import register_variant
from ._residual import FactorResidual


@register_variant
class PiSSA(FactorResidual):
    """PiSSA on any layer kind (conv: the flattened kernel matrix): trainable r·(in + out) per layer;
    ΔW = s·(B·A − B₀·A₀), 0 at init; file holds `lora_A.weight`, `lora_B.weight` (trainable) and `lora_A0`,
    `lora_B0` (the frozen principal part)."""

    name = "pissa"
    peft_type = "LORAKIT_PISSA"

    @dataclass
    class Options:
        niter: Optional[int] = None  # None: full SVD; k: randomized svd_lowrank with k subspace iterations

        def __post_init__(self):
            if self.niter is not None and (isinstance(self.niter, bool) or not isinstance(self.niter, int)
                                           or self.niter < 0):
                raise ConfigError(f"option niter must be null (full SVD) or an int >= 0, got {self.niter!r}")

    def decompose(self, w):
        r = self.r
        if self.opts.niter is None:
            u, sv, vh = torch.linalg.svd(w, full_matrices=False)
            u, sv, vh = u[:, :r], sv[:r], vh[:r]
        else:
            u, sv, v = torch.svd_lowrank(w, q=r, niter=self.opts.niter)
            vh = v.T
        root = (sv / self.scale).sqrt()
        return root[:, None] * vh, u * root
