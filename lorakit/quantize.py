"""A quantized frozen base (QLoRA-style): the model's `nn.Linear` weights stored in 4 or 8 bits by bitsandbytes.

    model = quantize_base(model, "nf4")        # before or after `inject`; "nf4" | "fp4" | "int8"
    inject(model, config)                      # adapters keep fp32 master weights; the base stays frozen
    weight_bytes(model)                        # bytes the model's weights take, quantization state included

Adapted layers accept the quantized modules as `base_layer` (see `kinds.QuantLinearKind`); adapters keep fp32
master weights. DoRA works too ("QDoRA"): its row norm ‖W + sBA‖ reads W dequantized to fp32, one layer at a time
(a transient fp32 copy of that layer's weight whenever the norm is recomputed). Merging into a quantized base
dequantizes, merges in fp64/fp32 and re-quantizes, with a `QuantizedMergeWarning` (`merge_errors(model)` gives each
layer's relative error); unmerging puts the original quantized bytes back exactly (they are kept aside while merged).
Adapter files are ordinary PEFT files (adapter tensors only) and load onto quantized and full-precision bases alike.

bitsandbytes' CPU backend looks for a kernel on the Hugging Face Hub when it is imported (through the `kernels`
package). lorakit imports it with that lookup disabled (`import_bnb`), so nothing is fetched at run time; import
lorakit's quantization before importing bitsandbytes yourself.
"""
from __future__ import annotations

import logging
import sys
import warnings

import torch
from torch import nn

from .config import name_matches
from .errors import QuantizeError

METHODS = ("nf4", "fp4", "int8")
INSTALL_HINT = "pip install 'lorakit[quant]'"
BLOCKSIZE = 64              # 4-bit: one absmax per 64 weights (QLoRA's), itself quantized to 8 bits (double quant)
INT8_THRESHOLD = 6.0        # LLM.int8() outlier threshold on activations (transformers' default)
_HUB_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
_FP16_MESSAGE = "MatMul8bitLt: inputs will be cast from"  # logged on every int8 call with fp32/bf16 inputs


class QuantizedMergeWarning(UserWarning):
    """Merging into a quantized base re-quantized its weight; the error is in `merge_errors(model)`."""


# ---- bitsandbytes, imported offline ------------------------------------------------------------
class _Drop(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record):
        return not str(record.msg).startswith(self.prefix)


def import_bnb():
    """bitsandbytes, imported without its Hub kernel lookup; QuantizeError naming the extra when it is missing.

    At import, bitsandbytes' CPU backend calls `kernels.get_kernel("kernels-community/...")` (a Hub download)
    and falls back to its bundled kernels on failure. Hiding the `kernels` package for the import makes that
    lookup fail before any network access; the fallback message it logs is dropped. So is the message int8 layers
    log on every call that their fp32/bf16 inputs are cast to fp16 (that is how LLM.int8() computes).
    """
    if sys.modules.get("bitsandbytes") is not None:
        return sys.modules["bitsandbytes"]
    missing = object()
    saved = sys.modules.get("kernels", missing)
    sys.modules["kernels"] = None  # `from kernels import ...` raises ImportError: no Hub lookup
    log, drop = logging.getLogger("bitsandbytes.backends.cpu.ops"), _Drop(_HUB_MESSAGE)
    log.addFilter(drop)
    try:
        import bitsandbytes
    except ImportError as e:
        raise QuantizeError(f"a quantized base needs bitsandbytes, which is not installed ({e}); "
                            f"install it with: {INSTALL_HINT}") from e
    finally:
        log.removeFilter(drop)
        if saved is missing:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = saved
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_Drop(_FP16_MESSAGE))
    return bitsandbytes


def is_quantized(module: nn.Module) -> bool:
    """A bitsandbytes Linear4bit / Linear8bitLt (False without importing bitsandbytes when it is not loaded)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def _is_4bit(module: nn.Module) -> bool:
    return isinstance(module, sys.modules["bitsandbytes"].nn.Linear4bit)


# ---- quantize_base -----------------------------------------------------------------------------
def quantize_base(model: nn.Module, method: str, compute_dtype: torch.dtype | None = torch.bfloat16,
                  skip=("lm_head",)) -> nn.Module:
    """Store the model's frozen `nn.Linear` weights quantized; returns the same (mutated) model.

    method: "nf4" | "fp4" (bitsandbytes `Linear4bit`, blocksize 64 with double quantization, matmuls in
    `compute_dtype`, outputs in the input's dtype) or "int8" (`Linear8bitLt`, LLM.int8() with outlier threshold
    6.0; `compute_dtype` does not apply: inputs are cast to fp16). Each module is quantized on its weight's device.
    4-bit modules keep bitsandbytes' training layout (see `training_layout`).
    Works before or after `inject`: an adapted layer's `base_layer` is replaced and its adapters follow.
    Left as they are: modules whose path matches `skip` (exact names or dotted suffixes), exact-type `nn.Linear`
    only (not subclasses such as attention's out_proj), Linears whose weight is shared with another module
    (tied), adapters' own modules and `modules_to_save` copies.
    QuantizeError (model unchanged) for an unknown method, a model that already holds quantized modules,
    merged adapters, no Linear to quantize, or bitsandbytes missing.
    """
    if method not in METHODS:
        raise QuantizeError(f"unknown quantization method {method!r}; expected one of {list(METHODS)}")
    bnb = import_bnb()
    plan = _plan(model, tuple(skip or ()))
    for path, owner, linear in plan:
        quantized = _quantized_linear(bnb, linear, method, compute_dtype)
        if owner is None:
            _set_child(model, path, quantized)
        else:
            _rebase(owner, quantized)
    return model


def _plan(model: nn.Module, skip: tuple) -> list[tuple[str, nn.Module | None, nn.Linear]]:
    """(path, adapted layer or None, linear) of every Linear to quantize; QuantizeError before any change."""
    from .layers import AdaptedLayer, TrainedCopy

    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    plan, inside = [], None
    for path, m in model.named_modules():
        if is_quantized(m):
            raise QuantizeError(f"the model is already quantized: {path!r} is a {type(m).__name__}; "
                                "load a fresh model to quantize it another way")
        if inside is not None and path.startswith(inside):
            continue
        if isinstance(m, AdaptedLayer) and m.merged:
            raise QuantizeError(f"adapters {list(m.merged)} are merged into {path!r}; unmerge before quantizing")
        owner, linear = (m, m.base_layer) if isinstance(m, AdaptedLayer) else (None, m)
        if isinstance(m, (AdaptedLayer, TrainedCopy)) or path.split(".")[0] == "lorakit_shared":
            inside = path + "."
        if type(linear) is nn.Linear and path and not name_matches(list(skip), path) \
                and uses.get(id(linear.weight), 0) == 1:
            plan.append((path, owner, linear))
    if not plan:
        raise QuantizeError(f"{type(model).__name__} has no nn.Linear to quantize (skip={list(skip)}; Linears "
                            "with tied weights are left out)")
    return plan


def _quantized_linear(bnb, linear: nn.Linear, method: str, compute_dtype) -> nn.Module:
    w = linear.weight.detach()
    bias = linear.bias is not None
    if method == "int8":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                threshold=INT8_THRESHOLD, device="meta")
    else:
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                              compress_statistics=True, quant_type=method, device="meta")
    _store(q, w)
    training_layout(q)
    if bias:
        q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return q.train(linear.training)


def _set_child(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _rebase(layer, quantized: nn.Module) -> None:
    """Give an adapted layer a new base module; its adapters follow the new kind."""
    from .kinds import kind_for

    layer.base_layer = quantized
    layer.kind = kind_for(quantized)
    for variant in layer.adapters.values():
        variant.kind = layer.kind
    layer._stacks.clear()


# ---- what a quantized module stores --------------------------------------------------------------
def _store(module: nn.Module, matrix: torch.Tensor) -> None:
    """Quantize an (out, in) matrix into a bitsandbytes module (new tensors; the old ones are left intact)."""
    bnb = sys.modules["bitsandbytes"]
    if _is_4bit(module):
        w = module.weight
        data, state = bnb.functional.quantize_4bit(matrix.contiguous(), blocksize=BLOCKSIZE, compress_statistics=True,
                                                   quant_type=w.quant_type, quant_storage=torch.uint8)
        module.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_state=state, blocksize=BLOCKSIZE,
                                          compress_statistics=True, quant_type=w.quant_type,
                                          quant_storage=torch.uint8, module=module, bnb_quantized=True)
        module.quant_state = state
        return
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(matrix.to(torch.float16).contiguous())  # as bitsandbytes does
    _install(module, (cb, scb))


def stored(module: nn.Module) -> tuple:
    """A quantized module's stored state: (data, QuantState) for 4-bit, (int8 rows, row scales) for 8-bit."""
    if _is_4bit(module):
        return module.weight.data, module.weight.quant_state
    scb = module.weight.SCB if getattr(module.weight, "SCB", None) is not None else module.state.SCB
    return module.weight.data, scb


def _install(module: nn.Module, state: tuple) -> None:
    """Put a stored state (from `stored`) back into the module, exactly."""
    bnb = sys.modules["bitsandbytes"]
    if _is_4bit(module):
        module.weight.data, module.weight.quant_state = state
        module.quant_state = state[1]
        return
    cb, scb = state
    module.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    module.state.CB = module.state.SCB = None  # the next forward takes CB and SCB from the weight


def dequantize(module: nn.Module, state: tuple | None = None) -> torch.Tensor:
    """The (out, in) fp32 weight of a quantized module (of its current storage, or of `state` from `stored`)."""
    bnb = sys.modules["bitsandbytes"]
    data, qs = stored(module) if state is None else state
    if not _is_4bit(module):
        return bnb.functional.int8_vectorwise_dequant(data, qs).float()
    if getattr(qs, "packing_format_for_cpu", False):
        data, qs = _unpacked(data, qs)
    return bnb.functional.dequantize_4bit(data, qs).float().reshape(qs.shape)


def training_layout(module: nn.Module) -> None:
    """Keep a 4-bit module in bitsandbytes' standard layout, the one its autograd function differentiates.

    On AVX512-BF16 CPUs, bitsandbytes 0.50 repacks a `Linear4bit`'s weight at its first eval forward into an
    inference layout (4x faster single-row matmuls), and a later training forward on it runs a kernel with no
    autograd: the input gradient is silently missing. lorakit turns that repacking off on the modules it
    quantizes or adapts, and converts an already repacked weight back (exactly: same codes and scales).
    """
    if not _is_4bit(module):
        return
    module.support_avx512bf16_for_cpu = False
    data, qs = stored(module)
    if getattr(qs, "packing_format_for_cpu", False):
        _install(module, _unpacked(data, qs))


def _unpacked(data: torch.Tensor, qs) -> tuple:
    """(data, QuantState) in the standard layout with exactly the values of bitsandbytes' CPU inference layout:
    (N, K/2) bytes whose 32-row tiles hold the low/high nibbles of column pairs; absmax (K/blocksize, N) bf16."""
    bnb = sys.modules["bitsandbytes"]
    n, k = qs.shape
    tiles = data.reshape(-1, 32)
    codes = torch.cat([tiles & 0xF, tiles >> 4], dim=-1)                   # (-1, 64): tile rows 0..31, 32..63
    codes = codes.reshape(n // 32, k // 2, 32, 2).transpose(1, 2).reshape(-1)  # row-major (N, K) codes
    flat = ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8).reshape(-1, 1)   # two codes a byte, first one high
    absmax = qs.absmax.float().T.contiguous().reshape(-1)
    state = bnb.functional.QuantState(absmax=absmax, shape=qs.shape, code=qs.code, blocksize=qs.blocksize,
                                      quant_type=qs.quant_type, dtype=getattr(qs, "original_dtype", torch.float32))
    return flat, state


# ---- merging into a quantized base ---------------------------------------------------------------
def write_merged(module: nn.Module, matrix: torch.Tensor) -> float:
    """Re-quantize `module` to hold the (out, in) `matrix`; returns max|deq(Q(matrix)) − matrix| / max|matrix|."""
    target = matrix.float()
    _store(module, target)
    err = (dequantize(module) - target).abs().max() / target.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    warnings.warn("merging into a quantized base re-quantizes its weight (dequantize → merge in fp32 → quantize); "
                  "lorakit.quantize.merge_errors(model) gives each layer's relative error", QuantizedMergeWarning,
                  stacklevel=2)
    return float(err)


def restore(module: nn.Module, state: tuple) -> None:
    """Put the quantized state kept at merge time back (exact unmerge)."""
    _install(module, state)


def merge_errors(model: nn.Module) -> dict[str, float]:
    """{layer path: relative re-quantization error} of every quantized base with adapters merged into it."""
    from .layers import AdaptedLayer

    return {path: m.kind.merge_error for path, m in model.named_modules()
            if isinstance(m, AdaptedLayer) and getattr(m.kind, "merge_error", None) is not None}


# ---- memory ------------------------------------------------------------------------------------
def weight_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model stores: parameters, buffers and bitsandbytes quantization state
    (absmax, codebooks, int8 row scales), each storage counted once (tied weights once)."""
    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())

    for t in (*model.parameters(), *model.buffers()):
        add(t)
    for m in model.modules():
        if not is_quantized(m):
            continue
        data, qs = stored(m)
        add(data)
        if _is_4bit(m):
            for t in (qs.absmax, qs.code, qs.offset, *((qs.state2.absmax, qs.state2.code) if qs.nested else ())):
                add(t)
        else:
            add(qs)
    return sum(seen.values())
