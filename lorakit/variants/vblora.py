"""VB-LoRA (Li et al., NeurIPS 2024, arXiv 2405.15179): A and B are cut into length-b pieces, and every piece is a
top-k softmax mix of vectors from one trainable bank shared by all layers. ΔW = B·A, no α; PEFT's "VBLORA" format."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PEFT_VERSION
from ..errors import ConfigError, UnsupportedFeatureError
from . import register_variant
from .base import LowRankVariant, Shared

# AdapterConfig fields that PEFT's VB-LoRA and Uni-LoRA configs carry under the same name and meaning.
PEFT_COMMON_KEYS = ("base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode", "layers_pattern",
                    "layers_to_transform", "modules_to_save", "revision", "target_modules", "task_type")


def peft_common(config, dropout_key: str) -> dict[str, Any]:
    """The keys every PEFT tuner config of this family writes, from an AdapterConfig."""
    out = {k: getattr(config, k) for k in PEFT_COMMON_KEYS}
    out.update(auto_mapping=None, inference_mode=True, peft_version=PEFT_VERSION, r=config.r)
    out[dropout_key] = config.lora_dropout
    return out


def from_peft_common(data: dict, variant: str, dropout_key: str, option_keys) -> dict[str, Any]:
    """AdapterConfig keys from a PEFT tuner config: shared keys as they are, the dropout renamed, the method's keys
    into `options`, r defaulting to PEFT's 4; anything else is passed on for `AdapterConfig.from_dict` to judge."""
    data = dict(data)
    out = {k: data.pop(k) for k in PEFT_COMMON_KEYS if k in data}
    out.update(r=data.pop("r", 4), lora_dropout=data.pop(dropout_key, 0.0), variant=variant,
               options={k: data.pop(k) for k in option_keys if k in data})
    data.pop("variant", None)
    out.update(data)
    return out


def refuse_patterns(config, variant: str) -> None:
    """One rank and no α for every layer: PEFT's file format for these methods has no per-layer rank or scale."""
    for key, default in (("rank_pattern", {}), ("alpha_pattern", {}), ("use_rslora", False)):
        if getattr(config, key) != default:
            raise UnsupportedFeatureError(f"{key} is not supported by variant {variant!r} (its PEFT format has one "
                                          f"r for every layer and no α); got {getattr(config, key)!r}")


def index_dtype(num_vectors: int) -> torch.dtype:
    """The dtype PEFT stores top-k bank indices in: the smallest that fits (int16 only below 2**15)."""
    if num_vectors < 2 ** 8:
        return torch.uint8
    if num_vectors < 2 ** 15:
        return torch.int16
    return torch.int32 if num_vectors < 2 ** 31 else torch.int64


def mix(bank: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_j weights[..., j] · bank[indices[..., j]]: (..., k) indices and weights → (..., vector_length)."""
    return (weights.unsqueeze(-1) * bank[indices.long()]).sum(-2)


def compose(bank: torch.Tensor, logits: torch.Tensor, topk: int) -> torch.Tensor:
    """Each row of `logits` (..., num_vectors) → the softmax mix of the bank vectors with its top-k logits."""
    top, indices = logits.topk(topk, dim=-1)
    return mix(bank, indices, F.softmax(top, dim=-1))


def topk_of(logits: torch.Tensor, topk: int, num_vectors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's compact form of logits: top-k indices (smallest int dtype) and the first k−1 softmax weights."""
    top, indices = logits.detach().topk(topk, dim=-1)
    return indices.to(index_dtype(num_vectors)), F.softmax(top, dim=-1)[..., :-1].contiguous()


class VectorBank(Shared):
    """The model-wide trainable bank (num_vectors × vector_length), saved as `base_model.vblora_vector_bank`."""

    def __init__(self, num_vectors: int, vector_length: int, bound: float):
        super().__init__()
        self.bound = bound
        self.vblora_vector_bank = nn.Parameter(torch.empty(num_vectors, vector_length))

    def initialize(self, how) -> None:
        with torch.no_grad():  # never all zero: the logits would get no gradient
            self.vblora_vector_bank.uniform_(-self.bound, self.bound)

    def file_tensors(self):
        return {"vblora_vector_bank": self.vblora_vector_bank}


@register_variant
class VBLoRA(LowRankVariant):
    """VB-LoRA: A (r×n) and B (m×r) assembled from bank vectors; per layer trainable logits
    `vblora_logits_A` (r, n/b, h) and `vblora_logits_B` (m/b, r, h); the bank (h, b) is model-wide.

    A[k, t·b + j] = mix_A[k, t, j] and B[t·b + j, k] = mix_B[t, k, j], where mix is the softmax over the top-k
    logits of each (.., h) row weighting the chosen bank vectors (PEFT's order, so PEFT files give equal outputs).
    ΔW = B·A: no α (`lora_alpha` is ignored, as in PEFT); `rank_pattern`, `alpha_pattern` and `use_rslora` are
    refused with UnsupportedFeatureError (PEFT's format has one r and no α). Init: bank U(−bound, bound), logits
    N(0, std²) — a tiny non-zero ΔW, for every `init_lora_weights` value. Works on Linear, transformers Conv1D,
    Conv1d/Conv2d (A as the flattened kernel (r, C·k…)) and Embedding; PEFT itself reads only the Linear/Conv1D
    ones. Every targeted input and output size must be divisible by `vector_length` (ConfigError at inject).

    `save_only_topk_weights=True` adapters are PEFT's compact files: per layer the top-k bank indices and the first
    k−1 weights (`vblora_logits_{A,B}_topk_{indices,weights}`), inference and merging only. lorakit loads them
    (and can train the bank on top), but does not create one from scratch: train with the default and write the
    compact file with `save_topk(model, directory, name)`.
    """

    name = "vblora"
    peft_type = "VBLORA"
    pair_refusal = "its factors are mixtures of a shared vector bank"

    @dataclass
    class Options:
        num_vectors: int = 256
        vector_length: int = 256
        topk: int = 2
        init_vector_bank_bound: float = 0.02
        init_logits_std: float = 0.1
        save_only_topk_weights: bool = False

        def __post_init__(self):
            for key in ("num_vectors", "vector_length", "topk"):
                value = getattr(self, key)
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(f"option {key} must be a positive int, got {value!r}")
            if self.topk > self.num_vectors:
                raise ConfigError(f"option topk must be ≤ num_vectors ({self.num_vectors}), got {self.topk}")
            for key, low in (("init_vector_bank_bound", "> 0"), ("init_logits_std", "≥ 0")):
                value = getattr(self, key)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                        or (value <= 0 if low == "> 0" else value < 0):
                    raise ConfigError(f"option {key} must be a finite number {low}, got {value!r}")
            if not isinstance(self.save_only_topk_weights, bool):
                raise ConfigError(f"option save_only_topk_weights must be true or false, "
                                  f"got {self.save_only_topk_weights!r}")

    @classmethod
    def build_shared(cls, config, sites):
        refuse_patterns(config, cls.name)
        opts = cls.parse_options(config.options)
        b = opts.vector_length
        for site in sites:
            n, m = site.kind.in_features, site.kind.out_features
            if n % b or m % b:
                raise ConfigError(f"option vector_length={b} must divide the input and output sizes of every "
                                  f"targeted layer; layer {site.path!r} has in={n}, out={m}")
        return VectorBank(opts.num_vectors, b, opts.init_vector_bank_bound)

    def __init__(self, kind, r, scale, dropout, config, **context):
        super().__init__(kind, r, scale, dropout, config, **context)
        o = self.opts
        shapes = {"A": (r, kind.in_features // o.vector_length), "B": (kind.out_features // o.vector_length, r)}
        if o.save_only_topk_weights:
            for part, shape in shapes.items():
                self.register_buffer(f"topk_indices_{part}", torch.zeros(*shape, o.topk,
                                                                         dtype=index_dtype(o.num_vectors)))
                self.register_buffer(f"topk_weights_{part}", torch.zeros(*shape, o.topk - 1))
        else:
            self.vblora_logits_A = nn.Parameter(torch.empty(*shapes["A"], o.num_vectors))
            self.vblora_logits_B = nn.Parameter(torch.empty(*shapes["B"], o.num_vectors))

    def initialize(self, how):
        if self.opts.save_only_topk_weights:
            raise ConfigError("option save_only_topk_weights=True describes a compact inference-only file (top-k "
                              "indices and weights, no logits): lorakit loads such files but cannot train one. "
                              "Train with save_only_topk_weights=False and write the compact file with "
                              "lorakit.variants.vblora.save_topk(model, directory, name)")
        with torch.no_grad():
            nn.init.normal_(self.vblora_logits_A, 0.0, self.opts.init_logits_std)
            nn.init.normal_(self.vblora_logits_B, 0.0, self.opts.init_logits_std)

    def file_tensors(self):
        if not self.opts.save_only_topk_weights:
            return {"vblora_logits_A": self.vblora_logits_A, "vblora_logits_B": self.vblora_logits_B}
        return {f"vblora_logits_{p}_topk_{what}": getattr(self, f"topk_{what}_{p}")
                for p in ("A", "B") for what in ("indices", "weights")}

    def pieces(self, part: str) -> torch.Tensor:
        """The composed sub-vectors of A (r, n/b, b) or B (m/b, r, b)."""
        bank = self.shared.vblora_vector_bank
        if not self.opts.save_only_topk_weights:
            return compose(bank, getattr(self, f"vblora_logits_{part}"), self.opts.topk)
        w = getattr(self, f"topk_weights_{part}")
        w = torch.cat([w, 1 - w.sum(-1, keepdim=True)], dim=-1)  # the dropped last weight
        return mix(bank, getattr(self, f"topk_indices_{part}"), w)

    def factors(self):
        a = self.pieces("A").reshape(self.r, -1)
        b = self.pieces("B").transpose(1, 2).reshape(-1, self.r)
        return a, b, 1.0

    def extra_repr(self):
        o = self.opts
        return f"r={self.r}, vector_length={o.vector_length}, topk={o.topk}" + \
            (", topk-only" if o.save_only_topk_weights else "")

    # ---- PEFT's VBLoRAConfig ------------------------------------------------------------------------
    @classmethod
    def peft_config(cls, config):
        out = peft_common(config, "vblora_dropout")
        out.update(config.options, exclude_modules=config.exclude_modules, peft_type=cls.peft_type)
        return out

    @classmethod
    def config_from_peft(cls, data):
        keys = [f.name for f in dataclasses.fields(cls.Options)]
        return from_peft_common(data, cls.name, "vblora_dropout", keys)  # exclude_modules passes through


@torch.no_grad()
def save_topk(model: nn.Module, directory, name: str = "default"):
    """Write VB-LoRA adapter `name` as PEFT's compact `save_only_topk_weights` file (top-k indices, k−1 weights and
    the bank; inference and merging only) that PEFT and `lorakit.load_adapter` read."""
    from ..io.files import write_folder
    from ..model import adapter_parameters, get_config

    config = get_config(model, name)
    if config.variant != VBLoRA.name:
        raise ConfigError(f"save_topk writes VB-LoRA adapters; {name!r} is a {config.variant!r} adapter")
    opts = VBLoRA.parse_options(config.options)
    tensors = {}
    for key, t in adapter_parameters(model, name).items():
        suffix = key.rpartition(".")[2]
        if suffix in ("vblora_logits_A", "vblora_logits_B"):
            indices, weights = topk_of(t, opts.topk, opts.num_vectors)
            tensors[f"{key}_topk_indices"], tensors[f"{key}_topk_weights"] = indices, weights
        else:  # the bank, trained copies of modules_to_save, or an adapter that is already compact
            tensors[key] = t
    compact = dataclasses.replace(config, options={**config.options, "save_only_topk_weights": True})
    return write_folder(directory, compact, tensors)
