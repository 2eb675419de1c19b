"""What learned merging (`learn`) and unlearning (`unlearn`) share: the loss of a batch, its mean over batches, and a
short AdamW loop that moves only the tensors it is given.

A batch is a dict of tensors; a loss is `loss_fn(model, batch) -> scalar tensor` (the default `lm_loss`, or e.g.
`task.loss` of the library's `Instruct` task for its left-padded chat batches).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TrainingError

IGNORE = -100
MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "token_type_ids", "pixel_values", "inputs_embeds")
Batches = Union[dict, Sequence[dict]]
LossFn = Callable[[nn.Module, dict], torch.Tensor]


def model_inputs(batch: dict) -> dict:
    """The entries of `batch` a transformers model's forward takes (labels, prompts, choices left out)."""
    return {k: v for k, v in batch.items() if k in MODEL_KEYS}


def lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy of `model(**inputs).logits` against `batch["labels"]` (−100 ignored; the
    logits at t predict the label at t + 1)."""
    out = model(**model_inputs(batch))
    logits = out.logits if hasattr(out, "logits") else out
    labels = batch["labels"][:, 1:].to(logits.device)
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE)


def mean_loss(model: nn.Module, batches: Sequence[dict], loss_fn: Optional[LossFn] = None,
              adapter: Optional[Union[str, Sequence[str]]] = None) -> float:
    """The mean of `loss_fn` (default `lm_loss`) over `batches` (each counts once) under no_grad, with `adapter`
    (a name or names) active when given; TrainingError when it is not finite."""
    from ..model import active_adapters, set_active

    loss_fn = loss_fn or lm_loss
    before = active_adapters(model)
    if adapter is not None:
        set_active(model, adapter)
    try:
        with torch.no_grad():
            values = [float(loss_fn(model, b)) for b in batches]
    finally:
        if adapter is not None:
            set_active(model, before)
    value = sum(values) / len(values)
    if not torch.isfinite(torch.tensor(value)):
        raise TrainingError(f"the loss is {value} (per batch: {values})")
    return value


@contextlib.contextmanager
def only_trainable(model: nn.Module, params: Iterable[nn.Parameter]):
    """Inside: eval mode (no dropout: a loss is a deterministic function of the weights), and only `params`
    require grad. Restores the flags and the mode after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def descend(model: nn.Module, params: list[nn.Parameter], batches: Sequence[dict], loss_fn: LossFn, steps: int,
            lr: float, weight_decay: float = 0.0) -> list[float]:
    """`steps` AdamW steps on `params` only (batch t % len at step t, under `only_trainable`); the loss at every
    step. TrainingError on a non-finite loss."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    trace = []
    with only_trainable(model, params):
        for t in range(steps):
            loss = loss_fn(model, batches[t % len(batches)])
            if not torch.isfinite(loss):
                raise TrainingError(f"non-finite training loss {float(loss)} at step {t}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            trace.append(float(loss.detach()))
        optimizer.zero_grad(set_to_none=True)
    return trace
