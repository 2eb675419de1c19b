"""LoRA-XS (Bałazy et al., arXiv 2405.17604): y = W x + s·B R A x with B, A frozen from the truncated SVD of W."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from . import register_variant
from ._core import CoreVariant, top_svd


@register_variant
class LoRAXS(CoreVariant):
    """Frozen B = U_r, A = Σ_r V_rᵀ from the SVD of the pretrained W (singular values folded into A, as the
    reference code); trainable R (r×r, r² parameters per layer); s = α/r (α/√r with rsLoRA).

    Init: R ~ N(0, sigma²), sigma = 1e-5 (ΔW tiny, non-zero); `init_lora_weights=False` draws R ~ N(0, 1/r) for a
    clearly non-identity adapter. Choices: the SVD is an exact fp32 `torch.linalg.svd` of W (the reference's later
    code does the same; its first release used sklearn's randomized `TruncatedSVD(n_iter=10, random_state=42)` on
    Wᵀ, which agrees up to the randomized solver's error and the singular vectors' signs — signs are fixed here,
    see `top_svd`). Conv layers use the SVD of the flattened kernel (out × in·k…), Embeddings of Wᵀ (dim × vocab).
    Option `retain="bottom"` keeps the r smallest singular triplets (the reference's `retain_part`). B and A are
    buffers saved in the adapter file, so loading never recomputes the SVD (a merged base would give another one).
    """

    name = "lora_xs"
    peft_type = "LORAKIT_LORA_XS"
    pair_refusal = "it trains only an r×r core between frozen factors"
    core_key = "lora_latent_mapping.weight"

    @dataclass
    class Options:
        sigma: float = 1e-5  # std of R's Gaussian init
        retain: str = "top"  # which singular triplets of W: "top" (largest) or "bottom" (smallest)

        def __post_init__(self):
            if not (isinstance(self.sigma, (int, float)) and 0 <= self.sigma < float("inf")):
                raise ConfigError(f"option sigma must be a finite number ≥ 0, got {self.sigma!r}")
            if self.retain not in ("top", "bottom"):
                raise ConfigError(f"option retain must be 'top' or 'bottom', got {self.retain!r}")

    def __init__(self, kind, r, scale, dropout, config, **context):
        super().__init__(kind, r, scale, dropout, config, **context)
        self.check_svd_rank("LoRA-XS")

    @torch.no_grad()
    def initialize(self, how):
        u, s, vh = top_svd(self.kind.weight(), self.r, bottom=self.opts.retain == "bottom")
        self.set_factors(s[:, None] * vh, u)
        if how is False:
            nn.init.normal_(self.lora_R, std=self.r ** -0.5)
        else:
            nn.init.normal_(self.lora_R, std=self.opts.sigma)
