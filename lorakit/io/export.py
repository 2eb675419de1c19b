"""Export any low-rank adapter (VeRA, LoRA-XS, PiSSA's rank-2r change, HypeLoRA's generated factors, ...) as a
plain LoRA folder that PEFT and vLLM load: its ΔW = s·B·A per layer, exactly, from each variant's `factors()`."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch

from ..config import AdapterConfig
from ..errors import MergeError
from ..layers import AdaptedLayer, TrainedCopy
from ..model import get_config, wrappers
from .files import write_folder


@torch.no_grad()
def export_lora(model: torch.nn.Module, directory: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter `name` as a PEFT LoRA (peft_type "LORA") with the same ΔW on every layer.

    The scale is folded into B (lora_alpha = rank on every layer); layers whose rank differs from the most
    common one are listed in `rank_pattern` / `alpha_pattern` by full path. Raises MergeError for a
    variant whose ΔW has no exact low-rank form (squeeze it first).
    """
    config = get_config(model, name)
    tensors, ranks = {}, {}
    for path, w in wrappers(model):
        if isinstance(w, TrainedCopy) and name in w.copies:
            tensors.update({f"{path}.{k}": t for k, t in w.copies[name].state_dict().items()})
        if not (isinstance(w, AdaptedLayer) and name in w.adapters):
            continue
        variant = w.adapters[name]
        factors = variant.factors()
        if factors is None:
            raise MergeError(f"adapter {name!r} ({variant.name}) on {path} has no exact low-rank form to export "
                             f"as a LoRA")
        a, b, s = factors
        ranks[path] = a.shape[0]
        tensors[f"{path}.{w.kind.key_a}"] = w.kind.down_layout(a).float().clone()
        tensors[f"{path}.{w.kind.key_b}"] = w.kind.up_layout(b * s).float().clone()
    return write_folder(directory, plain_config(ranks, config), tensors)


def plain_config(ranks: dict[str, int], like: AdapterConfig) -> AdapterConfig:
    """The config of a plain LoRA with these per-layer ranks and the scale folded into B (lora_alpha = rank): the
    most common rank as `r`, the others in `rank_pattern` / `alpha_pattern` by full path; `modules_to_save`,
    `task_type` and the base's name from `like`."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    other = {p: k for p, k in ranks.items() if k != r}
    return AdapterConfig(r=r, lora_alpha=r, target_modules=sorted(ranks), rank_pattern=other,
                         alpha_pattern={p: float(k) for p, k in other.items()}, modules_to_save=like.modules_to_save,
                         task_type=like.task_type, base_model_name_or_path=like.base_model_name_or_path)
