"""MM-LoRA (Arcana, Sun et al., arXiv 2410.13733): a vision and a language LoRA per layer, routed per token."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, RoutingError, TargetError
from ..kinds import LinearKind
from . import register_variant
from .base import TrainedPair, Variant


@register_variant
class MMLoRA(Variant):
    """Two LoRAs with separate parameters on each layer, chosen per token by a modality mask M (1 = image):
    y = W·x + M ⊙ (s_v·B_v·A_v·x) + (1 − M) ⊙ (s_t·B_t·A_t·x).

    The mask comes from the routing object, not a global: `with lorakit.route(model, token_masks={"image": M}):`
    with M of one bool (or [0, 1] weight) per token of the flattened batch × seq axis; the option `mask_key`
    names the mask read. The mask covers the tokens of one forward (generating with a KV cache: give each
    step's forward its own mask). Without that mask the forward raises RoutingError (option `unmasked="error"`,
    default: forgetting the mask must not silently run image tokens through the text branch); `unmasked="text"`
    or `"image"` treats every token as that modality instead.

    Rank split (card [U]): vision rank r_v = β·r, language rank r_t = (1 − β)·r (option `beta`, default 0.5;
    β·r must be a whole number and both ranks ≥ 1: ConfigError naming the option). Scale: each branch is a LoRA
    of its own rank with the layer's α: s_b = α/r_b (α/√r_b with rsLoRA), so an all-text batch equals a
    plain LoRA (r_t, α) with the language weights; `branch_scale="shared"` uses the layer's α/r for both.
    Init [U]: standard LoRA for both branches (A kaiming-uniform, B = 0 ⇒ ΔW = 0).
    Compute: both branches run as one rank-r LoRA, [A_v; A_t] then [B_v B_t], with the per-token mask applied
    in rank space, so the cost equals one rank-r LoRA whatever the mask.

    Not mergeable (ΔW depends on the token): merge raises MergeError, no `factors()`, no export as a plain
    LoRA. Linear layers only (TargetError otherwise). Our own file format (peft_type LORAKIT_MM_LORA):
    `lora_A_vision`, `lora_B_vision`, `lora_A_text`, `lora_B_text` per layer.
    """

    name = "mm_lora"
    peft_type = "LORAKIT_MM_LORA"
    mergeable = False
    uses_base_out = False
    reads_routing = True

    @dataclass
    class Options:
        beta: float = 0.5  # share of the rank for the vision branch
        mask_key: str = "image"  # which token mask of the routing marks vision tokens
        unmasked: str = "error"  # no mask in the routing: "error", or treat every token as "text" / "image"
        branch_scale: str = "own"  # "own": α/r_branch per branch; "shared": the layer's α/r for both

        def __post_init__(self):
            if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0 < self.beta < 1:
                raise ConfigError(f"option beta must be in (0, 1), got {self.beta!r}")
            if not isinstance(self.mask_key, str) or not self.mask_key:
                raise ConfigError(f"option mask_key must be a non-empty string, got {self.mask_key!r}")
            if self.unmasked not in ("error", "text", "image"):
                raise ConfigError(f"option unmasked must be 'error', 'text' or 'image', got {self.unmasked!r}")
            if self.branch_scale not in ("own", "shared"):
                raise ConfigError(f"option branch_scale must be 'own' or 'shared', got {self.branch_scale!r}")

    def __init__(self, kind, r, scale, dropout, config, **context):
        super().__init__(kind, r, scale, dropout, config, **context)
        if type(kind) is not LinearKind:
            raise TargetError(f"mm_lora adapts Linear layers only; {self.path!r} is a "
                              f"{type(kind.base).__name__}")
        r_v = self.opts.beta * r
        if abs(r_v - round(r_v)) > 1e-9 or not 1 <= round(r_v) <= r - 1:
            raise ConfigError(f"option beta={self.opts.beta} gives a vision rank β·r = {r_v:g} for r={r} on "
                              f"{self.path!r}; β·r must be a whole number between 1 and r − 1")
        self.r_vision, self.r_text = round(r_v), r - round(r_v)
        n, m = kind.in_features, kind.out_features
        self.lora_A_vision = nn.Parameter(torch.empty(self.r_vision, n))
        self.lora_B_vision = nn.Parameter(torch.empty(m, self.r_vision))
        self.lora_A_text = nn.Parameter(torch.empty(self.r_text, n))
        self.lora_B_text = nn.Parameter(torch.empty(m, self.r_text))
        self.bind_routing(None)

    def branch_scales(self) -> tuple[float, float]:
        """(s_v, s_t): α/r_b per branch (α recovered from the layer's scale), or the layer's scale for both."""
        if self.opts.branch_scale == "shared":
            return self.scale, self.scale
        root = math.sqrt if self.config.use_rslora else (lambda v: v)
        alpha = self.scale * root(self.r)
        return alpha / root(self.r_vision), alpha / root(self.r_text)

    def trained_pairs(self):
        """Each branch is a LoRA pair whose full-weight gradient is the part of G from its own tokens."""
        s_v, s_t = self.branch_scales()
        return [TrainedPair(self.lora_A_vision, self.lora_B_vision, s_v),
                TrainedPair(self.lora_A_text, self.lora_B_text, s_t)]

    def initialize(self, how):
        self.kind.init_factors(self.lora_A_vision, self.lora_B_vision, how)
        self.kind.init_factors(self.lora_A_text, self.lora_B_text, how)

    def file_tensors(self):
        return {"lora_A_vision": self.lora_A_vision, "lora_B_vision": self.lora_B_vision,
                "lora_A_text": self.lora_A_text, "lora_B_text": self.lora_B_text}

    @property
    def lora_dtype(self):
        return self.lora_A_text.dtype

    # ---- routing ---------------------------------------------------------------------------------
    def bind_routing(self, routing, rows=None, total_rows=None) -> None:
        """Called by the adapted layer before each call: the routing and which rows of the input it covers."""
        self._routing = (routing, rows, total_rows)

    def __getstate__(self):  # copies (deepcopy, pickle) do not carry the routing of a past call
        return {**super().__getstate__(), "_routing": (None, None, None)}

    def image_weights(self, x: torch.Tensor) -> torch.Tensor | None:
        """M for the rows of `x`, shaped x.shape[:-1] + (1,); None when every token is text."""
        routing, rows, total = self._routing
        if routing is not None and self.opts.mask_key in routing.token_masks:
            return routing.token_weights(self.opts.mask_key, x, rows, total)
        if self.opts.unmasked == "error":
            raise RoutingError(f"mm_lora on {self.path!r} needs the modality mask {self.opts.mask_key!r}: run the "
                               f"model inside lorakit.route(model, token_masks={{{self.opts.mask_key!r}: mask}}) "
                               f"(or set option unmasked='text')")
        return None if self.opts.unmasked == "text" else torch.ones_like(x[..., :1])

    # ---- forward ---------------------------------------------------------------------------------
    def delta(self, x, base_out):
        m = self.image_weights(x)
        s_v, s_t = self.branch_scales()
        x = self.dropout(x)
        if m is None:  # all text: the language LoRA alone
            return F.linear(F.linear(x, self.lora_A_text) * s_t, self.lora_B_text)
        h = F.linear(x, torch.cat([self.lora_A_vision, self.lora_A_text]))  # (..., r_v + r_t)
        coef = torch.cat([(m * s_v).expand(*m.shape[:-1], self.r_vision),
                          ((1 - m) * s_t).expand(*m.shape[:-1], self.r_text)], -1)
        return F.linear(h * coef, torch.cat([self.lora_B_vision, self.lora_B_text], 1))

    def extra_repr(self) -> str:
        return f"r_vision={self.r_vision}, r_text={self.r_text}, scales={self.branch_scales()}"
