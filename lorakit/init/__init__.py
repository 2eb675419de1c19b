"""Data-driven initialization: `lorakit.initialize(model, method, dataloader=..., name=...)`.

An injected adapter is re-initialized from passes over data (gradients of the base weights, activations,
calibration batches). Each method is a function registered with `@register_init(name)`, usually next to
the variant it serves; it receives an `InitRun` (the model, adapter name, data and pass settings) plus
its own keyword options. The passes live in `lorakit.init.passes`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from ..errors import ConfigError

_METHODS: dict[str, Callable] = {}


@dataclass
class InitRun:
    """What an init method works with. `loss_fn(model, batch) -> scalar loss`; by default the batch is a
    mapping of model inputs with labels and the loss is the model output's `.loss`."""

    model: nn.Module
    name: str
    dataloader: Optional[Iterable]
    loss_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None
    max_batches: Optional[int] = None
    progress: bool = True

    def needs_data(self, method: str) -> Iterable:
        if self.dataloader is None:
            raise ConfigError(f"initialization {method!r} runs on data: pass dataloader=...")
        return self.dataloader


def register_init(name: str):
    """Decorator: register `fn(run: InitRun, **options)` as initialization method `name`."""
    def add(fn):
        _METHODS[name] = fn
        return fn
    return add


def init_methods() -> list[str]:
    from ..variants import variant_names

    variant_names()  # importing the variants registers their init methods
    return sorted(_METHODS)


def initialize(model: nn.Module, method: str, dataloader: Optional[Iterable] = None, name: str = "default", *,
               loss_fn: Optional[Callable] = None, max_batches: Optional[int] = None, progress: bool = True,
               **options) -> nn.Module:
    """Initialize adapter `name` of `model` with data-driven `method` (e.g. "lora-sb", "shira-grad").

    Passes run with adapters disabled, in eval mode (no dropout), over at most `max_batches` batches of
    `dataloader` (each a mapping of model inputs, labels included, unless `loss_fn` is given); the model's
    mode is restored afterwards. Returns the model.
    """
    if method not in init_methods():
        raise ConfigError(f"unknown initialization {method!r}; available: {init_methods()}")
    from ..model import get_config

    get_config(model, name)  # AdapterNameError for an unknown adapter
    was_training = model.training
    model.eval()
    try:
        _METHODS[method](InitRun(model, name, dataloader, loss_fn, max_batches, progress), **options)
    finally:
        model.train(was_training)
    return model


__all__ = ["InitRun", "initialize", "init_methods", "register_init"]

from . import eva  # noqa: E402,F401  (registers "eva")
