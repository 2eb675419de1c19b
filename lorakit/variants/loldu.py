"""LoLDU — lower-diagonal-upper low-rank adaptation (Shi et al., arXiv 2410.13618; code SKDDJ/LoLDU).

Pivoted LU of W (out, in) in fp32: W = P·L·U′ (`torch.linalg.lu`), D = diag(U′), U = U′/D (unit upper), so
W = P·L·diag(D)·U. Kept: L_r = L[:, :r], D_r = D[:r], U_r = U[:r, :] and P, stored as indices `perm` with
(P·M)[i] = M[perm[i]] (the reference keeps a dense m×m matrix). Trainable: one vector z ∈ R^r per layer, σ = α/r.
The reference writes the residual W − σ·P L_r diag(D_r) U_r into the base weight; here the base layer stays
untouched and the adapter holds it as a frozen offset (see `_residual`), so

    ΔW = σ·P·L_r·diag(z − D_r)·U_r        (rank ≤ r: `factors()` = (diag(z − D_r)·U_r, P·L_r, σ)).

`init_method` (reference names): "lu" z = D_r; "uniform" z ~ U(−|m|/2, |m|/2), m = mean(D_r); "normal"
z ~ N(mean(D_r), std(D_r)); "constant" z = mean(D_r); "ones"; "zeros". The offset's diagonal (`loldu_D`) is the one
the reference's residual is taken with (SKDDJ/LoLDU `minloldu/loldu.py` L161-187 then L211-216): for "lu",
"uniform", "normal" and "constant" the reference first binds `vector_z` to D_r's storage and draws z into it in
place, so the residual uses the drawn z and ΔW = 0 at init; "ones" and "zeros" never bind it, so their residual uses
D_r and the model starts at W + σ·P·L_r·diag(z − D_r)·U_r (ΔW ≠ 0: "zeros" removes the top-r LDU component).
Choices where the card is silent: σ stays fixed (the
reference creates it as a parameter but never trains it); with dropout, the trainable path σ·P L_r diag(z) U_r sees
dropout(x) and the offset the undropped x (the reference ignores dropout); a zero pivot D_i (singular W) is kept
as D_i = 1 with U_r's row left unnormalized, so P·L·diag(D)·U = W still holds. The reference's α default is 1
(σ = 1/r); here α is `lora_alpha` as for every variant.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from . import register_variant
from ._residual import ResidualVariant

INIT_METHODS = ("lu", "uniform", "normal", "constant", "ones", "zeros")


def ldu(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(perm, L, D, U) with W = P·L·diag(D)·U, (P·M)[i] = M[perm[i]], L (m, k) unit lower, U (k, n) unit upper,
    k = min(m, n); computed in the dtype of `w`. A zero pivot gives D_i = 1 and an unnormalized row of U."""
    p, lower, upper = torch.linalg.lu(w)
    d = torch.diagonal(upper)
    d = torch.where(d == 0, torch.ones_like(d), d)
    return p.argmax(dim=1), lower, d, upper / d[:, None]


@register_variant
class LoLDU(ResidualVariant):
    """LoLDU on any layer kind (conv: the flattened kernel matrix): r trainable values (`vector_z`) per layer;
    frozen `loldu_L` (out, r), `loldu_D` (r,: the diagonal of the residual, see the module doc), `loldu_U` (r, in)
    and the row permutation `loldu_P` (out,) int64, all saved."""

    name = "loldu"
    peft_type = "LORAKIT_LOLDU"
    pair_refusal = "it trains only a diagonal between frozen L and U factors"

    @dataclass
    class Options:
        init_method: str = "lu"

        def __post_init__(self):
            if self.init_method not in INIT_METHODS:
                raise ConfigError(f"option init_method must be one of {INIT_METHODS}, got {self.init_method!r}")

    def __init__(self, kind, r, scale, dropout, config, **context):
        super().__init__(kind, r, scale, dropout, config, **context)
        m, n = kind.out_features, kind.in_features
        self.vector_z = nn.Parameter(torch.empty(r))
        self.register_buffer("loldu_L", torch.empty(m, r))
        self.register_buffer("loldu_D", torch.empty(r))
        self.register_buffer("loldu_U", torch.empty(r, n))
        self.register_buffer("loldu_P", torch.zeros(m, dtype=torch.int64))

    @torch.no_grad()
    def initialize(self, how):
        """True: z from `init_method`; False: z = D_r·(1 + N(0, 0.5²)) (a non-identity adapter, for tests)."""
        self.check_how(self.name, how)
        perm, lower, d, upper = ldu(self.base_matrix())
        r = self.r
        self.loldu_P.copy_(perm)
        self.loldu_L.copy_(lower[:, :r])
        self.loldu_D.copy_(d[:r])
        self.loldu_U.copy_(upper[:r])
        d, z = self.loldu_D, self.vector_z
        method = "random" if how is False else self.opts.init_method
        if method == "random":
            z.copy_(d * (1 + 0.5 * torch.randn_like(d)))
        elif method == "lu":
            z.copy_(d)
        elif method == "uniform":
            half = d.mean().abs().item() / 2
            nn.init.uniform_(z, -half, half)
        elif method == "normal":
            nn.init.normal_(z, d.mean().item(), d.std().item() if r > 1 else 0.0)
        elif method == "constant":
            z.fill_(d.mean().item())
        elif method == "ones":
            z.fill_(1.0)
        else:
            z.zero_()
        if method in ("lu", "uniform", "normal", "constant"):
            d.copy_(z)  # the residual is taken with the drawn z (the reference's shared storage): ΔW = 0

    def lower_factor(self) -> torch.Tensor:
        """P·L_r as an (out, r) matrix."""
        return self.loldu_L.index_select(0, self.loldu_P)

    def trainable_factors(self):
        return self.vector_z[:, None] * self.loldu_U, self.lower_factor()

    def offset_factors(self):
        return self.loldu_D[:, None] * self.loldu_U, self.lower_factor()

    def factors(self):
        return (self.vector_z - self.loldu_D)[:, None] * self.loldu_U, self.lower_factor(), self.scale

    def file_tensors(self):
        return {"vector_z": self.vector_z, "loldu_L": self.loldu_L, "loldu_D": self.loldu_D, "loldu_U": self.loldu_U,
                "loldu_P": self.loldu_P}
