"""RandLoRA (Albert et al., ICLR 2025): a full-rank ΔW as a scaled sum of N = ⌈min(m, n)/r⌉ products of frozen
random bases, ΔW = (α/r)·Σ_i B_i·diag(λ_i)·A·diag(γ_i), with trainable diagonals Λ (r×N) and Γ (N×min(m, n)).

Written on the (min(m, n) → max(m, n)) side and transposed when m < n, as PEFT does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..errors import ConfigError, StateDictError
from . import _seeded, register_variant
from .base import LowRankVariant, Shared

OPTIONS = ("projection_prng_key", "save_projection", "sparse", "very_sparse")


def num_bases(min_dim: int, r: int) -> int:
    return -(-min_dim // r)


class RandLoraBases(Shared):
    """The shared frozen bases: `randlora_A` (r, 1, min_dim) — one basis for every term — and `randlora_B`
    (max_dim, N, r) — N bases — for the largest targeted shape; saved as `base_model.randlora_A/B` when
    `save_projection` is set."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, save_projection: bool):
        super().__init__()
        self.register_buffer("randlora_A", a)
        self.register_buffer("randlora_B", b)
        self.save_projection = save_projection

    def file_tensors(self):
        return {"randlora_A": self.randlora_A, "randlora_B": self.randlora_B} if self.save_projection else {}


def randlora_bases(r: int, out_features: int, in_features: int, seed: int, sparse: bool = False,
                   very_sparse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's bases from one CPU generator seeded with `seed`: A (r, 1, min) then B's N slices (max, 1, r).

    Dense: bf16 kaiming-uniform(a=√5) (PEFT draws in bf16 wherever bf16 is available, which includes every CPU),
    each tensor then divided by its std. Sparse (`sparse`: k = 3, `very_sparse`: k = √min): uniform draws mapped
    to −1 below 1/(2k), +1 above 1 − 1/(2k), 0 otherwise, then divided by the std (fp32).
    """
    hi, lo = max(out_features, in_features), min(out_features, in_features)
    n = num_bases(lo, r)
    g = _seeded.generator(seed)
    if sparse or very_sparse:
        k = math.sqrt(lo) if very_sparse else 3
        a, b = torch.rand((r, 1, lo), generator=g), torch.rand((hi, n, r), generator=g)
        a, b = (torch.where(u < 1 / (2 * k), -1.0, torch.where(u > 1 - 1 / (2 * k), 1.0, 0.0)) for u in (a, b))
    else:
        def draw(shape):
            return nn.init.kaiming_uniform_(torch.empty(shape, dtype=torch.bfloat16), a=math.sqrt(5), generator=g)
        a = draw((r, 1, lo))
        b = torch.cat([draw((hi, 1, r)) for _ in range(n)], dim=1)
    return a / a.std(), b / b.std()


class _ScaledBasis(torch.autograd.Function):
    """Rows λ[k, i]·A[k]⊙γ[i] for k < r, i < N, as an (r·N, min) matrix (row k·N + i). Backward computes dΛ and dΓ
    from A, Λ, Γ alone, so autograd keeps no (r, N, min) intermediate of the scaled bases."""

    @staticmethod
    def forward(ctx, a, lam, gamma):
        ctx.save_for_backward(a, lam, gamma)
        return (lam[:, :, None] * a[:, None, :] * gamma[None]).flatten(0, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        a, lam, gamma = ctx.saved_tensors
        ga = grad.view(*lam.shape, -1) * a[:, None, :]  # (r, N, min)
        grad_lam = torch.einsum("kij,ij->ki", ga, gamma) if ctx.needs_input_grad[1] else None
        grad_gamma = torch.einsum("kij,ki->ij", ga, lam) if ctx.needs_input_grad[2] else None
        return None, grad_lam, grad_gamma


@register_variant
class RandLoRA(LowRankVariant):
    """RandLoRA in PEFT's format (peft_type "RANDLORA"; keys `randlora_lambda` (r, N), `randlora_gamma` (N, min),
    `base_model.randlora_A/B`); scale α/r with α = `lora_alpha` (PEFT's `randlora_alpha`, default 640 there).

    Options (PEFT's RandLoraConfig names): `projection_prng_key` (0), `save_projection` (True; False stores the
    seed and a checksum, see `_seeded`), `sparse` / `very_sparse` (ternary bases). Init: Λ = 0 (ΔW = 0),
    Γ = 1/max(Γ's shape) = 1/min(m, n), PEFT's reset (the card's 1/max_dim is PEFT's pre-reset value, used by
    `init_lora_weights=False` together with Λ ~ N(0, 1)).

    Choices: term pairing follows PEFT's flattening — row k·N + i of the scaled A stack meets column i of the
    flattened B stack (B[:, i // r, i % r]), a fixed relabelling of the paper's B_i·diag(λ_i)·A·diag(γ_i) that is
    needed to read PEFT's files. `factors()` is exact but has rank N·r ≥ min(m, n): forward and merge use it (the
    forward is PEFT's two matmuls), and `export_lora` writes a LoRA of that rank — larger than the dense ΔW, but
    PEFT/vLLM load it. Linear and Conv1D layers only; `rank_pattern`, `alpha_pattern`, `exclude_modules`,
    `use_rslora` refused. PEFT writes copies of the bases under every layer's key as well; lorakit writes them
    once (PEFT loads that, warning about the per-layer keys) and reads PEFT's copies after checking them.
    """

    name = "randlora"
    peft_type = "RANDLORA"
    pair_refusal = "it trains diagonal scalings of frozen random bases"

    @dataclass
    class Options:
        projection_prng_key: int = 0
        save_projection: bool = True
        sparse: bool = False
        very_sparse: bool = False
        projection_checksum: Optional[str] = None

        def __post_init__(self):
            _seeded.check_seed_options(self)
            for key in ("sparse", "very_sparse"):
                if not isinstance(getattr(self, key), bool):
                    raise ConfigError(f"option {key} must be true or false, got {getattr(self, key)!r}")

    @classmethod
    def build_shared(cls, config, sites):
        _seeded.check_config(cls.name, config, sites)
        _seeded.note_layout(config, sites)
        out_features, in_features = _seeded.largest_shape(sites)
        o = config.options
        a, b = randlora_bases(config.r, out_features, in_features, o["projection_prng_key"], o["sparse"],
                              o["very_sparse"])
        _seeded.record_or_verify(config, _seeded.checksum(a, b), f"{cls.name} bases")
        return RandLoraBases(a, b, o["save_projection"])

    @classmethod
    def peft_config(cls, config):
        return _seeded.peft_config(config, cls.peft_type, "randlora_dropout", OPTIONS,
                                   extra={"randlora_alpha": config.lora_alpha})

    @classmethod
    def config_from_peft(cls, data):
        return _seeded.config_from_peft(data, cls.name, "randlora_dropout", OPTIONS,
                                        renames={"randlora_alpha": "lora_alpha"})

    @classmethod
    def canonical_file_tensors(cls, config, tensors):
        """Drop the per-layer copies of the bases PEFT writes, after checking each equals the model-wide one."""
        out = {}
        for key, t in tensors.items():
            path, _, suffix = key.rpartition(".")
            if suffix in ("randlora_A", "randlora_B") and path != "base_model":
                shared = tensors.get(f"base_model.{suffix}")
                if shared is None or not torch.equal(shared, t):
                    raise StateDictError(f"{key!r} is a per-layer copy of the RandLoRA basis but differs from "
                                         f"'base_model.{suffix}' (or that key is missing)")
                continue
            out[key] = t
        return out

    def __init__(self, kind, r, scale, dropout, config, **context):
        super().__init__(kind, r, scale, dropout, config, **context)
        lo = min(kind.in_features, kind.out_features)
        self.num_bases = num_bases(lo, r)
        self.randlora_lambda = nn.Parameter(torch.empty(r, self.num_bases))
        self.randlora_gamma = nn.Parameter(torch.empty(self.num_bases, lo))

    @torch.no_grad()
    def initialize(self, how):
        if how is False:
            self.randlora_lambda.normal_()
            self.randlora_gamma.fill_(1 / max(self.kind.in_features, self.kind.out_features))
        else:
            self.randlora_lambda.zero_()
            self.randlora_gamma.fill_(1 / max(self.randlora_gamma.shape))

    def file_tensors(self):
        return {"randlora_lambda": self.randlora_lambda, "randlora_gamma": self.randlora_gamma}

    def factors(self):
        """(A, B, α/r) with B·A = Σ_i B_i·diag(λ_i)·A·diag(γ_i) (transposed when m < n); rank N·r."""
        sh, n, m = self.shared, self.kind.in_features, self.kind.out_features
        lo, hi = min(n, m), max(n, m)
        scaled = _ScaledBasis.apply(sh.randlora_A[:, 0, :lo], self.randlora_lambda, self.randlora_gamma)
        stack = sh.randlora_B[:hi, :self.num_bases].flatten(1)  # (max, N·r), column i = B[:, i // r, i % r]
        return (scaled, stack, self.scale) if lo == n else (stack.T, scaled.T, self.scale)

    def extra_repr(self):
        return f"r={self.r}, bases={self.num_bases}, scale={self.scale:g}"
