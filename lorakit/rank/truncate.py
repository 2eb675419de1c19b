"""Run an adapter at a lower rank without retraining: nested-rank variants natively, plain LoRA by truncation.

`with at_rank(model, k, name):` runs adapter `name` at rank k inside the block:
- DyLoRA / MatryoshkaLoRA: their own rank-k form (`lorakit.variants.dylora.at_rank`);
- plain LoRA: its first k components (rows of A, columns of B), the others zeroed for the block and restored
  after it; the scale stays α/r (the trained one) — the baseline nested-rank methods are compared against.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import ConfigError
from ..layers import AdaptedLayer
from ..variants._nested import NestedRankVariant, at_rank as nested_at_rank


def _adapters(model: nn.Module, name: str) -> list:
    found = [layer.adapters[name] for layer in model.modules()
             if isinstance(layer, AdaptedLayer) and name in layer.adapters]
    if not found:
        raise ConfigError(f"the model has no adapter {name!r}")
    return found


@contextlib.contextmanager
def at_rank(model: nn.Module, k: int, name: str = "default"):
    """Adapter `name` at rank k (clipped to each layer's rank) for the block."""
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"rank must be an integer >= 1, got {k!r}")
    adapters = _adapters(model, name)
    if all(isinstance(v, NestedRankVariant) for v in adapters):
        with nested_at_rank(model, k, name):
            yield model
        return
    if not all(type(v).name == "lora" for v in adapters):
        kinds = sorted({type(v).name for v in adapters})
        raise ConfigError(f"adapter {name!r} ({', '.join(kinds)}) cannot be run at a lower rank; supported: plain "
                          f"LoRA (first k components) and the nested-rank variants dylora, matryoshka_lora")
    saved = []
    with torch.no_grad():
        for v in adapters:
            if k < v.r:
                saved.append((v, v.lora_A[k:].clone(), v.lora_B[:, k:].clone()))
                v.lora_A[k:] = 0
                v.lora_B[:, k:] = 0
    try:
        yield model
    finally:
        with torch.no_grad():
            for v, a, b in saved:
                v.lora_A[k:] = a
                v.lora_B[:, k:] = b


def evaluate_at_ranks(model: nn.Module, ranks, evaluate, name: str = "default") -> dict[int, float]:
    """{k: evaluate(model)} with adapter `name` at each rank k (model in eval mode meanwhile)."""
    was_training = model.training
    model.eval()
    try:
        out = {}
        for k in ranks:
            with at_rank(model, int(k), name):
                out[int(k)] = float(evaluate(model))
        return out
    finally:
        model.train(was_training)
