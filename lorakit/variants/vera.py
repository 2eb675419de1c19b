"""VeRA (Kopiczko et al., ICLR 2024): ΔW = diag(λ_b)·B_s[:m]·diag(λ_d)·A_s[:, :n] with one frozen random pair
(A_s, B_s) shared by every adapted layer and trainable vectors λ_d (r) and λ_b (m) per layer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from . import _seeded, register_variant
from .base import LowRankVariant, Shared

OPTIONS = ("d_initial", "projection_prng_key", "save_projection")


class VeraBases(Shared):
    """The shared frozen pair: `vera_A` (r, largest in), `vera_B` (largest out, r), saved as `base_model.vera_A/B`
    when `save_projection` is set."""

    def __init__(self, vera_a: torch.Tensor, vera_b: torch.Tensor, save_projection: bool):
        super().__init__()
        self.register_buffer("vera_A", vera_a)
        self.register_buffer("vera_B", vera_b)
        self.save_projection = save_projection

    def file_tensors(self):
        return {"vera_A": self.vera_A, "vera_B": self.vera_B} if self.save_projection else {}


def vera_bases(r: int, out_features: int, in_features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's bases: A (r, in) then B (out, r) drawn in that order from one CPU generator seeded with `seed`,
    fp32 kaiming-uniform with gain √2 on the fan-in (bound √(6/fan_in))."""
    g = _seeded.generator(seed)
    a = nn.init.kaiming_uniform_(torch.empty(r, in_features), a=0, nonlinearity="leaky_relu", generator=g)
    b = nn.init.kaiming_uniform_(torch.empty(out_features, r), a=0, nonlinearity="leaky_relu", generator=g)
    return a, b


@register_variant
class VeRA(LowRankVariant):
    """VeRA in PEFT's format (peft_type "VERA"; keys `vera_lambda_b`, `vera_lambda_d`, `base_model.vera_A/B`).

    Options (PEFT's VeraConfig names): `d_initial` (λ_d's initial value, 0.1), `projection_prng_key` (seed of the
    bases, 0), `save_projection` (write the bases into the file, True as PEFT; False stores the seed and a
    checksum, see `_seeded`). `lora_dropout` is PEFT's `vera_dropout`; `init_lora_weights=False` is PEFT's
    `init_weights=False` (λ_b = 1, λ_d ~ N(0, 1)). Choices: no α — `lora_alpha` is ignored (PEFT's VeRA has
    none), the scale is 1; the bases are sized to the largest targeted layer as PEFT does, so every layer fits;
    Linear and Conv1D layers only (PEFT's VeRA format has no conv or embedding layers): TargetError otherwise;
    `rank_pattern`, `alpha_pattern`, `exclude_modules`, `use_rslora` are refused (not in PEFT's format).
    """

    name = "vera"
    peft_type = "VERA"
    pair_refusal = "it trains scaling vectors around frozen shared bases, not A and B"

    @dataclass
    class Options:
        d_initial: float = 0.1
        projection_prng_key: int = 0
        save_projection: bool = True
        projection_checksum: Optional[str] = None

        def __post_init__(self):
            _seeded.check_number("d_initial", self.d_initial)
            _seeded.check_seed_options(self)

    @classmethod
    def build_shared(cls, config, sites):
        _seeded.check_config(cls.name, config, sites)
        _seeded.note_layout(config, sites)
        out_features, in_features = _seeded.largest_shape(sites)
        a, b = vera_bases(config.r, out_features, in_features, config.options["projection_prng_key"])
        _seeded.record_or_verify(config, _seeded.checksum(a, b), f"{cls.name} bases")
        return VeraBases(a, b, config.options["save_projection"])

    @classmethod
    def peft_config(cls, config):
        return _seeded.peft_config(config, cls.peft_type, "vera_dropout", OPTIONS)

    @classmethod
    def config_from_peft(cls, data):
        return _seeded.config_from_peft(data, cls.name, "vera_dropout", OPTIONS)

    def __init__(self, kind, r, scale, dropout, config, **context):
        super().__init__(kind, r, scale, dropout, config, **context)
        self.vera_lambda_b = nn.Parameter(torch.empty(kind.out_features))
        self.vera_lambda_d = nn.Parameter(torch.empty(r))

    @torch.no_grad()
    def initialize(self, how):
        if how is False:
            self.vera_lambda_b.fill_(1.0)
            self.vera_lambda_d.normal_()
        else:
            self.vera_lambda_b.zero_()
            self.vera_lambda_d.fill_(self.opts.d_initial)

    def file_tensors(self):
        return {"vera_lambda_b": self.vera_lambda_b, "vera_lambda_d": self.vera_lambda_d}

    def factors(self):
        sh, k = self.shared, self.kind
        a = self.vera_lambda_d[:, None] * sh.vera_A[:self.r, :k.in_features]
        b = self.vera_lambda_b[:, None] * sh.vera_B[:k.out_features, :self.r]
        return a, b, 1.0

    def extra_repr(self):
        return f"r={self.r}"
