"""How each supported base module maps to one matrix view W (out × in) and applies factors A, B.

Variants are written once against this interface and work on every module type:
`down(x, A)` maps input rows into rank space, `up(h, B)` maps back, `weight()` is W as (out, in),
`to_layout(ΔW)` turns an (out, in) delta back into the base weight's own layout.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import quantize
from .errors import TargetError

try:  # transformers is a dependency, but the core works on plain torch models too
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()


class LinearKind:
    """nn.Linear (weight out×in), or transformers Conv1D / `fan_in_fan_out` (weight in×out)."""

    key_a, key_b, takes_dropout = "lora_A.weight", "lora_B.weight", True
    batchable = True  # down/up are plain matmuls: many adapters can run as one bmm

    def __init__(self, base: nn.Module):
        self.base = base
        self.transposed = bool(Conv1D) and isinstance(base, Conv1D)  # PEFT's fan_in_fan_out
        w = base.weight
        self.out_features, self.in_features = (w.shape[1], w.shape[0]) if self.transposed else w.shape

    def a_shape(self, r):
        return (r, self.in_features)

    def b_shape(self, r):
        return (self.out_features, r)

    def weight(self) -> torch.Tensor:
        return self.as_matrix(self.base.weight)

    def as_matrix(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like the base weight (e.g. its gradient) as an (out, in) matrix view."""
        return t.T if self.transposed else t

    def to_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.T if self.transposed else delta

    def matrix(self, factor: torch.Tensor) -> torch.Tensor:
        return factor

    def down_layout(self, a: torch.Tensor) -> torch.Tensor:
        """An (r, in) matrix in the layout `down` takes (inverse of `matrix` for A)."""
        return a

    def up_layout(self, b: torch.Tensor) -> torch.Tensor:
        """An (out, r) matrix in the layout `up` takes (inverse of `matrix` for B)."""
        return b

    def down(self, x, a):
        return F.linear(x, a)

    def up(self, h, b):
        return F.linear(h, b)

    def add_up_(self, out, h, b) -> None:
        """out += up(h, b) in place; one addmm when the output features are the contiguous last axis."""
        if out.is_contiguous() and out.dtype == h.dtype == b.dtype:
            out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), b.T)
        else:
            out += self.up(h, b)

    def base_no_bias(self, x):
        return F.linear(x, self.weight().to(x.dtype))

    def per_out(self, vec: torch.Tensor) -> torch.Tensor:
        """Shape an (out,) vector to broadcast against this layer's output."""
        return vec

    def vector_shape(self) -> tuple:
        """File shape of a per-output vector (PEFT's DoRA magnitude)."""
        return (self.out_features,)

    def init_factors(self, a, b, how):
        _init_down_up(a, b, how)

    def init_factors_rank_fan_in(self, a, b, how):
        """`init_factors`, except that `True` draws A from U(±1/√r) (`rank_fan_in_uniform_`)."""
        self.init_factors(a, b, how)
        if how is True:
            rank_fan_in_uniform_(a)

    def kept_weight(self):
        """The unmerged (out, in) weight when the base keeps it aside while adapters are merged, else None."""
        return None

    def write_weight(self, matrix: torch.Tensor, merged: bool) -> None:
        """Store an (out, in) `matrix` as the base weight (`merged`: whether adapters are now folded into it)."""
        w = self.base.weight
        w.copy_(self.to_layout(matrix).to(w.dtype))


class QuantLinearKind(LinearKind):
    """A bitsandbytes `Linear4bit` / `Linear8bitLt` base (see `lorakit.quantize`): W is stored quantized.

    `weight()` dequantizes it to fp32 on each call (DoRA's row norm, merging, data-driven inits read it; nothing
    dense is kept). Merging re-quantizes W + ΔW and records the relative error in `merge_error`; the original
    quantized state is kept aside (`kept`: ½ or 1 byte a weight) so that unmerging restores it exactly.
    """

    def __init__(self, base: nn.Module):
        self.base, self.transposed = base, False
        self.out_features, self.in_features = base.out_features, base.in_features
        quantize.training_layout(base)
        self.kept = None          # stored state of the unmerged base while adapters are merged
        self.merge_error = None   # max|deq(Q(W + ΔW)) − (W + ΔW)| / max|W + ΔW| of the last merge

    def weight(self) -> torch.Tensor:
        return quantize.dequantize(self.base)

    def kept_weight(self):
        return None if self.kept is None else quantize.dequantize(self.base, self.kept)

    def write_weight(self, matrix, merged):
        if not merged:
            if self.kept is not None:
                quantize.restore(self.base, self.kept)
            self.kept = self.merge_error = None
            return
        if self.kept is None:
            self.kept = quantize.stored(self.base)
        self.merge_error = quantize.write_merged(self.base, matrix)


class ConvKind(LinearKind):
    """nn.Conv1d / nn.Conv2d: A is a conv with the base kernel/stride/padding, B a 1×…×1 conv."""

    batchable = False

    def __init__(self, base: nn.Module):
        if base.groups != 1:
            raise TargetError(f"grouped convolutions (groups={base.groups}) are not supported")
        if base.padding_mode != "zeros":
            raise TargetError(f"conv padding_mode={base.padding_mode!r} is not supported (only 'zeros')")
        self.base, self.transposed = base, False
        self.out_features = base.out_channels
        self.in_features = base.weight[0].numel()
        self.conv = F.conv1d if isinstance(base, nn.Conv1d) else F.conv2d
        self.ones = (1,) * (base.weight.dim() - 2)

    def a_shape(self, r):
        return (r, *self.base.weight.shape[1:])

    def b_shape(self, r):
        return (self.out_features, r, *self.ones)

    def as_matrix(self, t):
        return t.flatten(1)

    def to_layout(self, delta):
        return delta.view(self.base.weight.shape)

    def matrix(self, factor):
        return factor.flatten(1)

    def down_layout(self, a):
        return a.reshape(a.shape[0], *self.base.weight.shape[1:])

    def up_layout(self, b):
        return b.reshape(b.shape[0], b.shape[1], *self.ones)

    def down(self, x, a):
        c = self.base
        return self.conv(x, a, None, c.stride, c.padding, c.dilation)

    def up(self, h, b):
        return self.conv(h, b)

    def add_up_(self, out, h, b) -> None:
        out += self.up(h, b)

    def base_no_bias(self, x):
        c = self.base
        return self.conv(x, c.weight.to(x.dtype), None, c.stride, c.padding, c.dilation)

    def per_out(self, vec):
        return vec.view(-1, *self.ones)

    def vector_shape(self):
        return (1, self.out_features, *self.ones)


class EmbeddingKind(LinearKind):
    """nn.Embedding as a linear map from one-hot ids: W = weight.T (dim × num_embeddings).

    PEFT layout: `lora_embedding_A` (r, num_embeddings), `lora_embedding_B` (dim, r); init reversed
    (A = 0, B normal). Dropout is not applied to ids.
    """

    key_a, key_b, takes_dropout, batchable = "lora_embedding_A", "lora_embedding_B", False, False

    def __init__(self, base: nn.Module):
        self.base, self.transposed = base, True
        self.in_features, self.out_features = base.weight.shape

    def down(self, ids, a):
        e = self.base
        return F.embedding(ids, a.T, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)

    def base_no_bias(self, ids):
        return self.base(ids)

    def init_factors(self, a, b, how):
        with torch.no_grad():  # reversed: A = 0, B ~ N(0, 1) as nn.Embedding; `False` makes both random
            nn.init.normal_(a) if how is False else nn.init.zeros_(a)
            nn.init.normal_(b)

    init_factors_rank_fan_in = init_factors  # A = 0 here whatever its fan-in


def rank_fan_in_uniform_(a: torch.Tensor) -> torch.Tensor:
    """In place, A (r, ...) ~ U(±1/√r): what kaiming_uniform_(a=√5) gives on A stored as (in, r), the layout of
    reference code that computes x·A·B (MatryoshkaLoRA, HypeLoRA), where the fan-in is r. PEFT's (r, in) layout
    gives U(±1/√in) instead (about 10× smaller at in = 768, r = 8)."""
    bound = 1 / math.sqrt(a.shape[0])
    with torch.no_grad():
        return a.uniform_(-bound, bound)


def _init_down_up(down: torch.Tensor, up: torch.Tensor, how) -> None:
    """PEFT's init: `True` → kaiming-uniform(a=√5) down, zero up; "gaussian" → N(0, 1/r) down;
    `False` → both random (a non-identity adapter, for tests)."""
    with torch.no_grad():
        if how == "gaussian":
            nn.init.normal_(down, std=1 / down.shape[0])
        else:
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        if how is False:
            nn.init.kaiming_uniform_(up, a=math.sqrt(5))
        else:
            nn.init.zeros_(up)


def is_supported(module: nn.Module) -> bool:
    supported = (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Linear) + ((Conv1D,) if Conv1D else ())
    return isinstance(module, supported)


def kind_for(module: nn.Module):
    """The kind for a supported module, or None."""
    if quantize.is_quantized(module):  # before nn.Linear: bitsandbytes' modules subclass it
        return QuantLinearKind(module)
    if isinstance(module, nn.Embedding):
        return EmbeddingKind(module)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return ConvKind(module)
    if isinstance(module, nn.Linear) or (Conv1D and isinstance(module, Conv1D)):
        return LinearKind(module)
    return None


SUPPORTED = "nn.Linear (bitsandbytes 4/8-bit too), nn.Conv1d, nn.Conv2d, nn.Embedding, transformers Conv1D"
