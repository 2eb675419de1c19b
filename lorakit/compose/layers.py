"""What a merge reads and writes, one adapted layer at a time.

A merge sees each layer as a list of `Part`s, one per source adapter that has the layer: ΔWᵢ = scaleᵢ·Bᵢ·Aᵢ as
float64 (out, in) factors, and the weight wᵢ the merge gives it. Sources are PEFT LoRA folders (`folder_layers`,
no model needed) or adapters on a model (`model_layers`, every mergeable variant through its `factors()`; a
variant without them, e.g. SHiRA's sparse ΔW, enters exactly as (I, ΔW)). A merged layer is one pair (A, B) at
scale 1, written as a PEFT LoRA folder (`write_folder_result`) or attached to the model (`attach_result`).
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional, Sequence

import torch

from ..errors import ConfigError, MergeError

PAIRS = (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B"))


class Part(NamedTuple):
    """One source's term on one layer: ΔWᵢ = scale·b·a with a (r, in), b (out, r) in float64; merged with `weight`."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    weight: float

    def delta(self) -> torch.Tensor:
        """The dense, unweighted ΔWᵢ (out, in): only for element-wise methods, one layer at a time."""
        return (self.b * self.scale) @ self.a

    def weighted(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, w·scale·b): the factors of wᵢ·ΔWᵢ."""
        return self.a, self.b * (self.scale * self.weight)


class Layer(NamedTuple):
    """A layer's parts; `layout` = (pair index into PAIRS, A file shape, B file shape) for folder sources."""

    parts: list[Part]
    layout: Optional[tuple] = None


# ---- sources ------------------------------------------------------------------------------------

def folder_layers(sources: Sequence, weights: Sequence[float]) -> tuple[dict[str, Layer], list]:
    """({path: Layer}, the sources' configs) from PEFT LoRA folders; refuses what does not merge as a sum."""
    from ..io.files import read_adapter

    layers: dict[str, Layer] = {}
    configs = []
    for source, w in zip(sources, weights):
        where = str(source)
        config, tensors = read_adapter(source)
        _check_folder(where, config, tensors)
        configs.append(config)
        for key, a_file in tensors.items():
            kind = next((i for i, (a_key, _) in enumerate(PAIRS) if key.endswith("." + a_key)), None)
            if kind is None:
                continue
            path = key[: -len(PAIRS[kind][0]) - 1]
            b_file = tensors[f"{path}.{PAIRS[kind][1]}"]
            r = a_file.shape[0]
            part = Part(a_file.reshape(r, -1).double(), b_file.reshape(b_file.shape[0], r).double(),
                        config.scale_for(path), float(w))
            layout = (kind, tuple(a_file.shape), tuple(b_file.shape))
            known = layers.setdefault(path, Layer([], layout)).layout
            if known[0] != kind or known[1][1:] != layout[1][1:] or known[2][0] != layout[2][0]:
                raise MergeError(f"{where}: layer {path!r} has factors {layout[1:]}, another adapter has {known[1:]}; "
                                 f"adapters of different base models do not merge")
            layers[path].parts.append(part)
    if not layers:
        raise ConfigError("the adapters hold no LoRA factors to merge")
    return layers, configs


def _check_folder(where: str, config, tensors: dict) -> None:
    if config.use_dora:
        raise MergeError(f"{where} is a DoRA adapter: {DORA_REASON}")
    if config.variant != "lora":
        raise MergeError(f"{where} holds a {config.variant!r} adapter; merge it on its base model "
                         f"(`lorakit merge-adapters --base MODEL`, or merge_adapters on `lorakit.from_pretrained`), "
                         f"or export it to a plain LoRA first (`lorakit export`)")
    copies = sorted(k for k in tensors if not any(k.endswith("." + s) for pair in PAIRS for s in pair))
    if copies:
        raise MergeError(f"{where} carries trained module copies (modules_to_save: {copies[:3]}); two trained "
                         f"heads do not add up, merge adapters without them")


DORA_REASON = ("its magnitude renormalises each row of W + ΔW, so a weighted sum of DoRA changes is not a DoRA "
               "change; fold it into its base with `lorakit merge`, or squeeze it to a plain LoRA on its base first "
               "(`lorakit squeeze`, which decomposes its effective change)")


def model_layers(model: torch.nn.Module, names: Sequence[str], weights: Sequence[float]) -> dict[str, Layer]:
    """{path: Layer} from adapters `names` on `model` (any variant with an additive ΔW); refusals name the reason."""
    from ..layers import AdaptedLayer, TrainedCopy
    from ..model import get_config, wrappers

    for name in names:
        get_config(model, name)  # unknown names raise
    layers: dict[str, Layer] = {}
    for path, wrapper in wrappers(model):
        if isinstance(wrapper, TrainedCopy):
            held = [n for n in names if n in wrapper.copies]
            if held:
                raise MergeError(f"adapter {held[0]!r} trains a copy of {path} (modules_to_save); two trained heads "
                                 f"do not add up: merge adapters without them")
            continue
        if not isinstance(wrapper, AdaptedLayer):
            continue
        for name, w in zip(names, weights):
            if name not in wrapper.adapters:
                continue
            if name in wrapper.merged:
                raise MergeError(f"adapter {name!r} is merged into {path}; unmerge it before merging adapters")
            layers.setdefault(path, Layer([])).parts.append(_variant_part(wrapper, name, float(w)))
    if not layers:
        raise ConfigError(f"adapters {list(names)} hold no layers to merge")
    return layers


def _variant_part(wrapper, name: str, weight: float) -> Part:
    variant = wrapper.adapters[name]
    if not getattr(variant, "mergeable", True):
        raise MergeError(f"adapter {name!r} ({variant.name}) on {variant.path} has a token-dependent ΔW: it has no "
                         f"single weight change to merge")
    with torch.no_grad():
        if variant.row_scale(wrapper.kind.weight()) is not None:
            raise MergeError(f"adapter {name!r} on {variant.path} is {variant.name}: {DORA_REASON}")
        factors = variant.factors()
        if factors is not None:
            a, b, s = factors
            return Part(a.detach().double(), b.detach().double(), float(s), weight)
        delta = variant.delta_weight().detach().double()  # exact below: ΔW = I·ΔW or ΔW·I
    delta = delta.reshape(delta.shape[0], -1)
    m, n = delta.shape
    eye = torch.eye(min(m, n), dtype=delta.dtype, device=delta.device)
    return Part(delta, eye, 1.0, weight) if m <= n else Part(eye, delta, 1.0, weight)


# ---- results --------------------------------------------------------------------------------------

def write_folder_result(out: str | os.PathLike, factors: dict[str, tuple], layers: dict[str, Layer], like) -> None:
    """Write merged (A, B) pairs (scale 1) as a plain PEFT LoRA folder, reshaped to the sources' file layouts."""
    from ..io.files import write_folder
    from ..rank.squeeze import plain_config

    tensors = {}
    for path, (a, b) in factors.items():
        kind, a_shape, b_shape = layers[path].layout
        a_key, b_key = PAIRS[kind]
        k = a.shape[0]
        tensors[f"{path}.{a_key}"] = a.reshape(k, *a_shape[1:]).float().contiguous()
        tensors[f"{path}.{b_key}"] = b.reshape(b_shape[0], k, *b_shape[2:]).float().contiguous()
    write_folder(out, plain_config({p: a.shape[0] for p, (a, _) in factors.items()}, like), tensors)


def attach_result(model: torch.nn.Module, name: str, factors: dict[str, tuple], like,
                  trainable: bool = False) -> None:
    """Add merged (A, B) pairs (scale 1) to `model` as a plain LoRA adapter `name` and make it the active one."""
    from ..model import attach, prepare, set_active
    from ..rank.squeeze import plain_config

    config = plain_config({p: a.shape[0] for p, (a, _) in factors.items()}, like)
    config.modules_to_save = None
    prepared = prepare(model, config, name, initialize=False)  # raises on a taken name before anything changes
    with torch.no_grad():
        for path, (a, b) in factors.items():
            variant = prepared.variants[path]
            kind = variant.kind
            variant.lora_A.copy_(kind.down_layout(a.to(variant.lora_A)))
            variant.lora_B.copy_(kind.up_layout(b.to(variant.lora_B)))
    attach(model, prepared, trainable=trainable)
    set_active(model, [name])
