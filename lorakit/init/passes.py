"""Passes over data for initialization, with a progress bar and bounded memory."""
from __future__ import annotations

from collections.abc import Mapping
from itertools import islice
from typing import Iterator

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..layers import AdaptedLayer
from ..model import disabled, wrappers


def adapted_layers(model, name: str) -> dict[str, AdaptedLayer]:
    """Layers holding adapter `name`, by module path."""
    return {p: w for p, w in wrappers(model) if isinstance(w, AdaptedLayer) and name in w.adapters}


def default_loss(model, batch) -> torch.Tensor:
    """`model(**batch).loss`: the batch must be a mapping of inputs that includes the labels."""
    if not isinstance(batch, Mapping):
        raise ConfigError("batches that are not mappings of model inputs need loss_fn=(model, batch) -> loss")
    out = model(**batch)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ConfigError("the model returned no loss for this batch (labels missing?); pass loss_fn=...")
    return loss


def to_device(batch, device):
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


def batches(run, desc: str) -> Iterator:
    """The run's batches (at most `max_batches`) on the model's device, with a progress bar."""
    data = run.needs_data(desc)
    device = next(run.model.parameters()).device
    total = run.max_batches if run.max_batches is not None else (len(data) if hasattr(data, "__len__") else None)
    for batch in tqdm(islice(data, run.max_batches), total=total, desc=desc, disable=not run.progress,
                      leave=False):
        yield to_device(batch, device)


def weight_gradients(run, desc: str = "gradients", absolute: bool = False) -> dict[str, torch.Tensor]:
    """Σ over batches of ∂loss/∂W (or of |∂loss/∂W| with `absolute`) for the base weight of every layer holding
    adapter `run.name`, as fp32 (out, in) matrices on the weight's device; adapters disabled.

    Memory: one fp32 accumulator per layer plus, at any moment, the gradient of the layer autograd has just
    reached — each gradient is folded into its accumulator and freed as soon as it is complete.
    """
    layers = adapted_layers(run.model, run.name)
    loss_fn = run.loss_fn or default_loss
    sums, hooks, flags = {}, [], {}
    for path, layer in layers.items():
        w = layer.base_layer.weight
        sums[path] = torch.zeros(layer.kind.weight().shape, dtype=torch.float32, device=w.device)
        flags[path] = w.requires_grad

        def fold(param, path=path, kind=layer.kind):
            g = kind.as_matrix(param.grad).float()
            sums[path].add_(g.abs() if absolute else g)
            param.grad = None
        w.requires_grad_(True)
        hooks.append(w.register_post_accumulate_grad_hook(fold))
    try:
        with disabled(run.model), torch.enable_grad():
            for batch in batches(run, desc):
                loss = loss_fn(run.model, batch)
                if not torch.isfinite(loss):
                    raise ConfigError(f"non-finite loss {loss.item()} during the {desc} pass")
                loss.backward()
    finally:
        for h in hooks:
            h.remove()
        for path, layer in layers.items():
            layer.base_layer.weight.requires_grad_(flags[path])
            layer.base_layer.weight.grad = None
    return sums
