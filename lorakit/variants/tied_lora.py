"""Tied-LoRA (Renduchintala, Konuk, Kuchaiev, NAACL 2024, arXiv 2311.09578): one LoRA pair shared by every adapted
layer, plus per-layer scaling vectors: y_l = W_l x + s·diag(v_l)·B·diag(u_l)·A·x."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from . import register_variant
from .base import LowRankVariant, Shared

VECTORS = ("trainable", "frozen", "absent")


def group_key(kind, r: int) -> str:
    """The tied pair a layer uses: one per (out, in, r) — layers of equal shape and rank share it."""
    return f"{kind.out_features}x{kind.in_features}_r{r}"


class TiedPairs(Shared):
    """The tied pairs of one adapter: A (r, in) and B (out, r) per shape group, parameters or (frozen) buffers.

    Saved as `base_model.tied_lora_A.<out>x<in>_r<r>` / `base_model.tied_lora_B.<...>`, frozen ones too (they are
    drawn from torch's global generator like LoRA's A, not from a seed, so the file is what reproduces them).
    """

    def __init__(self, groups: dict[str, tuple[int, int, int]], trainable: bool):
        super().__init__()
        self.groups, self.trainable = dict(groups), trainable
        for key, (r, n, m) in self.groups.items():
            for part, shape in (("A", (r, n)), ("B", (m, r))):
                t = torch.empty(shape)
                if trainable:
                    self.register_parameter(f"lora_{part}_{key}", nn.Parameter(t))
                else:
                    self.register_buffer(f"lora_{part}_{key}", t)

    def pair(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"lora_A_{key}"), getattr(self, f"lora_B_{key}")

    @torch.no_grad()
    def initialize(self, how) -> None:
        """A: kaiming-uniform(a=√5) ("gaussian": N(0, 1/r)); B: 0 when it trains (ΔW = 0), else kaiming-uniform
        (a frozen B must be random; the layers' v = 0 then gives ΔW = 0). `how=False`: B random either way."""
        for key in self.groups:
            a, b = self.pair(key)
            if how == "gaussian":
                nn.init.normal_(a, std=1 / a.shape[0])
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            if self.trainable and how is not False:
                nn.init.zeros_(b)
            else:
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))

    def file_tensors(self):
        out = {}
        for key in self.groups:
            a, b = self.pair(key)
            out[f"tied_lora_A.{key}"], out[f"tied_lora_B.{key}"] = a, b
        return out


@register_variant
class TiedLoRA(LowRankVariant):
    """Tied-LoRA: ΔW_l = s·diag(v_l)·B·diag(u_l)·A, the pair (A, B) shared by all adapted layers of one shape.

    Tying: one pair per (out, in, rank) group (a model's q/k/v/o share one, its fc1s another, its fc2s a third);
    the paper ties across the transformer layers of one target, which is this grouping on uniform stacks.
    Which parts train (options):
    - `tied_trainable` (default True): A, B are trainable parameters; False: frozen buffers (random A and B).
    - `vectors` ∈ {"trainable" (default), "frozen", "absent"}: per-layer u_l ∈ R^r, v_l ∈ R^out as parameters,
      as buffers, or not at all (u = v = 1). Frozen vectors stay at 1 (so they equal "absent" but are saved).
    Frozen pair + vectors not trainable leaves nothing to train: ConfigError.
    The paper names its configurations by which of v, B, u, A train (uppercase) or stay frozen (lowercase), with
    tied A, B (TL1…TL6 in its tables [U: the numbering ↔ combination mapping is unverified]); VeRA-like
    = frozen pair + trainable vectors (`tied_trainable=False`); the configuration the paper recommends (matches
    LoRA with a fraction of the parameters, mostly at larger r) trains the tied pair and both vectors = this
    default.
    Trainable parameters: Σ_groups r·(in + out) if the pair trains, + Σ_layers (r + out) if the vectors train.
    Init: A kaiming-uniform, B = 0, u = v = 1 (ΔW = 0); with a frozen pair B is random and v = 0 (ΔW = 0).
    `init_lora_weights=False` makes B random and u, v ~ U(0.5, 1.5) (non-identity, for tests). Scale α/r
    (α/√r with rsLoRA) per layer, as LoRA. Low-rank: `factors()` = (diag(u)A, diag(v)B, s), so merging,
    exporting as a plain LoRA and batched serving work as for LoRA.
    """

    name = "tied_lora"
    peft_type = "LORAKIT_TIED_LORA"
    pair_refusal = "its A and B are shared by every layer (one pair, many ΔW)"

    @dataclass
    class Options:
        tied_trainable: bool = True
        vectors: str = "trainable"

        def __post_init__(self):
            if not isinstance(self.tied_trainable, bool):
                raise ConfigError(f"option tied_trainable must be true or false, got {self.tied_trainable!r}")
            if self.vectors not in VECTORS:
                raise ConfigError(f"option vectors must be one of {list(VECTORS)}, got {self.vectors!r}")
            if not self.tied_trainable and self.vectors != "trainable":
                raise ConfigError(f"option vectors={self.vectors!r} with tied_trainable=false leaves nothing to "
                                  f"train; use vectors='trainable' or tied_trainable=true")

    @classmethod
    def build_shared(cls, config, sites):
        groups = {group_key(s.kind, s.r): (s.r, s.kind.in_features, s.kind.out_features) for s in sites}
        return TiedPairs(groups, cls.parse_options(config.options).tied_trainable)

    def __init__(self, kind, r, scale, dropout, config, **context):
        super().__init__(kind, r, scale, dropout, config, **context)
        self.key = group_key(kind, r)
        self.has_vectors = self.opts.vectors != "absent"
        if self.has_vectors:
            for part, size in (("u", r), ("v", kind.out_features)):
                t = torch.empty(size)
                if self.opts.vectors == "trainable":
                    self.register_parameter(f"tied_lora_{part}", nn.Parameter(t))
                else:
                    self.register_buffer(f"tied_lora_{part}", t)

    @torch.no_grad()
    def initialize(self, how):
        if not self.has_vectors:
            return
        if how is False:
            self.tied_lora_u.uniform_(0.5, 1.5)
            self.tied_lora_v.uniform_(0.5, 1.5)
            return
        self.tied_lora_u.fill_(1.0)
        self.tied_lora_v.fill_(1.0 if self.opts.tied_trainable else 0.0)

    def file_tensors(self):
        return {"tied_lora_u": self.tied_lora_u, "tied_lora_v": self.tied_lora_v} if self.has_vectors else {}

    def factors(self):
        a, b = self.shared.pair(self.key)
        if self.has_vectors:
            a, b = a * self.tied_lora_u[:, None], b * self.tied_lora_v[:, None]
        return a, b, self.scale

    def extra_repr(self):
        return f"r={self.r}, scale={self.scale:g}, pair={self.key}, vectors={self.opts.vectors}"


__all__ = ["TiedLoRA", "TiedPairs", "group_key"]
