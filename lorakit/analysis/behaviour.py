"""How far adapters move a causal LM on text it should still know ("forgetting"), with the base as reference.

`forgetting(model, tokenizer, texts)` scores every text's tokens after its first twice on the same tokens: with the
adapters disabled (`lorakit.disabled`: the base alone) and with the model as it is (its active adapters, or those
named by `adapter`). It returns
- `base_perplexity`, `adapted_perplexity`: exp of the mean next-token negative log-likelihood over all scored tokens
  of all texts (one pooled mean, not a mean of per-text perplexities); `base_nll`, `adapted_nll` are those means;
- `kl`: the mean over the same tokens of KL(p_base ‖ p_adapted) between the two next-token distributions, in nats
  (0 when the adapters change nothing; it grows as they move probability away from what the base predicted);
- `tokens`: how many tokens were scored.
Each text is tokenized alone (with the tokenizer's special tokens, e.g. a leading `<s>`) and cut to `max_length`;
batches are padded on the right and the padding is masked, so the batch size does not change the numbers. Runs on
the model's device, in eval mode, without gradients; the model's mode and active adapters are restored after.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..model import active_adapters, disabled, set_active

__all__ = ["encode", "forgetting", "next_token_logprobs", "stdlib_docstrings", "token_logprobs"]


def encode(tokenizer, texts, max_length: int = 256) -> list[list[int]]:
    """Each text's token ids (special tokens included), at most `max_length` of them."""
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
        raise DataError(f"texts must be a non-empty list of strings, got {type(texts).__name__}"
                        + (f" of {len(texts)}" if isinstance(texts, (list, tuple)) else ""))
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"max_length must be an integer ≥ 2 (a text needs two tokens to predict one), "
                          f"got {max_length!r}")
    return [list(tokenizer(t, truncation=True, max_length=max_length)["input_ids"]) for t in texts]


def _pad_right(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)  # the pad id is masked anyway
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return ids, mask


def next_token_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T − 1, vocab) fp32 log-probabilities of the token after each position but the last."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits[:, :-1].float().log_softmax(-1)


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _batches(model: nn.Module, rows: list[list[int]], batch_size: int):
    """(input_ids, attention_mask, targets, scored) per batch: targets are the ids after the first, `scored` marks
    the real (not padding) ones."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer ≥ 1, got {batch_size!r}")
    device = _device(model)
    for start in range(0, len(rows), batch_size):
        ids, mask = _pad_right(rows[start:start + batch_size], device)
        yield ids, mask, ids[:, 1:], mask[:, 1:].bool()


@contextlib.contextmanager
def _scoring(model: nn.Module, adapter):
    """Eval mode, no gradients, `adapter` (a name or names) active; all restored on exit."""
    was_training, before = model.training, active_adapters(model)
    if adapter is not None:
        set_active(model, adapter)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if adapter is not None:
            set_active(model, before)


def token_logprobs(model: nn.Module, tokenizer, texts, batch_size: int = 8,
                   max_length: int = 256) -> list[torch.Tensor]:
    """Per text, the log-probability (float64, on the CPU) the model as it is gives each of its tokens after the
    first, given the tokens before it."""
    rows = encode(tokenizer, texts, max_length)
    out = []
    with _scoring(model, None):
        for ids, mask, target, scored in _batches(model, rows, batch_size):
            logp = next_token_logprobs(model, ids, mask).gather(-1, target[..., None]).squeeze(-1)
            out += [row[keep].double().cpu() for row, keep in zip(logp, scored)]
    return out


def forgetting(model: nn.Module, tokenizer, texts, adapter=None, batch_size: int = 8, max_length: int = 256,
               reference: nn.Module | None = None) -> dict:
    """Base vs adapted perplexity on `texts` and the mean per-token KL(base ‖ adapted) (see the module docstring).
    `adapter`: the adapter name(s) to score (default: those active now). `reference`: another model to take as the
    base (e.g. the base of a full fine-tune, `model`), on the same device; default: `model` with adapters disabled."""
    rows = encode(tokenizer, texts, max_length)
    if all(len(r) < 2 for r in rows):
        raise DataError("no text has two tokens after tokenizing: there is nothing to predict")
    base_nll = adapted_nll = kl = 0.0
    tokens = 0
    with _scoring(model, adapter), _scoring(reference, None) if reference is not None else contextlib.nullcontext():
        for ids, mask, target, scored in _batches(model, rows, batch_size):
            with disabled(model) if reference is None else contextlib.nullcontext():
                base = next_token_logprobs(model if reference is None else reference, ids, mask)
            adapted = next_token_logprobs(model, ids, mask)
            picked = target[..., None]
            base_nll -= float(base.gather(-1, picked).squeeze(-1)[scored].double().sum())
            adapted_nll -= float(adapted.gather(-1, picked).squeeze(-1)[scored].double().sum())
            p = base.exp()  # Σ_v p_base(v) (log p_base(v) − log p_adapted(v)), 0·log 0 taken as 0
            per_token = torch.where(p > 0, p * (base - adapted), torch.zeros_like(p)).sum(-1)
            kl += float(per_token[scored].double().sum())
            tokens += int(scored.sum())
    base_nll, adapted_nll = base_nll / tokens, adapted_nll / tokens
    return {"base_perplexity": math.exp(min(base_nll, 700)), "adapted_perplexity": math.exp(min(adapted_nll, 700)),
            "kl": kl / tokens, "base_nll": base_nll, "adapted_nll": adapted_nll, "tokens": tokens}


def stdlib_docstrings(n: int = 200) -> list[str]:
    """`n` docstrings (whitespace collapsed, 200–1000 characters, no code examples) of the public functions, classes
    and methods of some standard-library modules, in a fixed order: English prose outside any task's data, always on
    disk (the default held-out text of `forgetting` in `lorakit compare --analyse`; it varies with the Python
    version)."""
    import argparse
    import collections
    import email.message
    import http.client
    import inspect
    import logging
    import pathlib
    import shutil
    import subprocess
    import tarfile
    import textwrap
    import threading
    import unittest
    import urllib.request
    import zipfile

    out = []

    def add(obj):
        doc = inspect.getdoc(obj) or ""
        text = " ".join(doc.split())
        if 200 <= len(text) <= 1000 and ">>>" not in text and text not in out:
            out.append(text)
    for module in (argparse, collections, email.message, http.client, logging, pathlib, shutil, subprocess,
                   tarfile, textwrap, threading, unittest, urllib.request, zipfile):
        for name in sorted(dir(module)):
            if name.startswith("_"):
                continue
            obj = getattr(module, name)
            add(obj)
            if inspect.isclass(obj):
                for member in sorted(vars(obj)):
                    if not member.startswith("_"):
                        add(getattr(obj, member))
    if len(out) < n:
        raise DataError(f"only {len(out)} docstrings found, {n} asked for")
    return out[:n]
