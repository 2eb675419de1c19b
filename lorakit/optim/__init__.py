"""Variant-aware optimizers and gradient transforms, selectable by name (`--optim lorapro`, `optim_args`).

Each module in this package registers factories with `@register_optimizer(name)`: `factory(model, args,
**options) -> torch.optim.Optimizer` (args: the run's `TrainingArguments`). An optimizer that must act around
each step (refresh a projector, resample layers, shrink a factor) defines `before_optimizer_step(trainer)` /
`after_optimizer_step(trainer)`; the trainer registers it as a hook. They also work in any torch loop.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

from ..errors import ConfigError

_FACTORIES: dict[str, Callable] = {}


def register_optimizer(name: str):
    def add(factory):
        _FACTORIES[name] = factory
        return factory
    return add


def optimizer_names() -> list[str]:
    _discover()
    return sorted(_FACTORIES)


def lora_pairs(model) -> list[tuple[str, object]]:
    """("module.path/adapter", variant) for every adapter with trainable `lora_A` and `lora_B`, found by walking the
    model's adapted layers: A is paired with the B of its own module, never by parameter order. (Closed forms that
    need ΔW = s·B·A exactly use `Variant.trained_pairs` instead.)"""
    import torch

    from ..layers import AdaptedLayer

    pairs = []
    for path, layer in model.named_modules():
        if isinstance(layer, AdaptedLayer):
            for name, v in layer.adapters.items():
                a, b = getattr(v, "lora_A", None), getattr(v, "lora_B", None)
                if isinstance(a, torch.nn.Parameter) and isinstance(b, torch.nn.Parameter) and a.requires_grad \
                        and b.requires_grad:
                    pairs.append((f"{path}/{name}", v))
    return pairs


def trained_adapters(model, optimizer: str) -> list[tuple[str, object]]:
    """("module.path/adapter", variant) for every adapter with trainable state (its own or its shared module's),
    for optimizers with a closed form over ΔW = const + s·B·diag(w)·A (`Variant.trained_pairs`).
    UnsupportedFeatureError naming the first adapter whose ΔW is not of that form, or whose pair has a frozen
    factor: never a silent fallback."""
    from ..errors import UnsupportedFeatureError
    from ..layers import AdaptedLayer

    found = []
    for path, layer in model.named_modules():
        if not isinstance(layer, AdaptedLayer):
            continue
        for name, v in layer.adapters.items():
            owners = [v] + ([v.shared] if v.shared is not None else [])
            if not any(p.requires_grad for o in owners for p in o.parameters()):
                continue  # a frozen adapter
            where = f"adapter {name!r} on {path!r}"
            try:
                pairs = v.trained_pairs()
            except UnsupportedFeatureError as e:
                raise UnsupportedFeatureError(f"{optimizer} cannot train {where}: {e}. Its closed form needs "
                                              f"ΔW = s·B·A of two trainable factors; use another optimizer "
                                              f"(e.g. adamw) for this variant") from None
            if any(not (p.a.requires_grad and p.b.requires_grad) for p in pairs):
                raise UnsupportedFeatureError(f"{optimizer} cannot train {where}: one of its factors is frozen "
                                              f"({optimizer} moves A and B together)")
            found.append((f"{path}/{name}", v))
    return found


def make_optimizer(name: str, model, args, **options):
    """The registered optimizer `name` over `model`'s trainable parameters."""
    if name not in optimizer_names():
        raise ConfigError(f"unknown optimizer {name!r}; available: {optimizer_names()}")
    return _FACTORIES[name](model, args, **options)


_discovered = False


def _discover() -> None:
    global _discovered
    if not _discovered:
        _discovered = True
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{info.name}")


__all__ = ["lora_pairs", "make_optimizer", "trained_adapters", "optimizer_names", "register_optimizer"]
