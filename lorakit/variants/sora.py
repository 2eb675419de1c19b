"""SoRA — sparse low-rank adaptation (Ding et al., EMNLP 2023, arXiv 2311.11696): a trainable gate g (r) between the
LoRA factors, y = W x + s·B·(g ⊙ A x), made sparse during training by a threshold step on g (the
`sora` optimizer, `lorakit.optim.sora`); ranks whose gate reaches exactly 0 are then cut out (`prune_sora`), leaving
a smaller plain LoRA with a rank per layer."""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError
from . import register_variant
from .base import LowRankVariant


@register_variant
class SoRA(LowRankVariant):
    """Trainable A (r×in), B (out×r) in PEFT's LoRA shapes and keys, and a trainable gate `lora_gate` (r);
    ΔW = s·B·diag(g)·A with s = α/r (α/√r with rsLoRA). `factors()` folds the gate into A (A' = diag(g)·A), so
    merging, `export_lora`, squeezing and batched serving see a plain rank-r LoRA.

    Init (card §22 and the reference `LowRankLinear`): A kaiming-uniform, B = 0, g ~ N(0, 1) — ΔW = 0.
    Option `gate_init="ones"` starts every gate at 1 (the adapter is then a plain LoRA at step 0; not in the
    reference, offered because a N(0, 1) gate starts some ranks nearly shut). `init_lora_weights=False`: A, B
    random and g ~ N(0, 1) whatever `gate_init` says (a non-identity adapter for tests); "gaussian": A ~ N(0, 1/r).

    Choices where the card is silent: the gate is applied in rank space (h = A x; h ⊙ g·s; B h) rather than by
    forming diag(g)·A each step; on Conv layers it scales the rank channels; on Embeddings the rank-space vector the
    lookup returns. The file key is `lora_gate` (PEFT has no SoRA; peft_type "LORAKIT_SORA"). Sparsity is exact
    zeros of g (the threshold step produces them); `prune_sora` removes those ranks and nothing else by default.
    """

    name = "sora"
    peft_type = "LORAKIT_SORA"
    pair_refusal = "a trainable gate sits between A and B (three factors; train it with --optim sora)"
    gate_key = "lora_gate"

    @dataclass
    class Options:
        gate_init: str = "normal"  # "normal": g ~ N(0, 1) (reference); "ones": g = 1

        def __post_init__(self):
            if self.gate_init not in ("normal", "ones"):
                raise ConfigError(f"option gate_init must be 'normal' or 'ones', got {self.gate_init!r}")

    def __init__(self, kind, r, scale, dropout, config, **context):
        super().__init__(kind, r, scale, dropout, config, **context)
        self.lora_A = nn.Parameter(torch.empty(kind.a_shape(r)))
        self.lora_B = nn.Parameter(torch.empty(kind.b_shape(r)))
        self.lora_gate = nn.Parameter(torch.empty(r))
        self._keep: Optional[torch.Tensor] = None  # set only while `prune_sora` exports (ranks kept)

    @torch.no_grad()
    def initialize(self, how):
        self.kind.init_factors(self.lora_A, self.lora_B, how)
        if how is False or self.opts.gate_init == "normal":
            self.lora_gate.normal_()
        else:
            self.lora_gate.fill_(1.0)

    def file_tensors(self):
        return {self.kind.key_a: self.lora_A, self.kind.key_b: self.lora_B, self.gate_key: self.lora_gate}

    @property
    def lora_dtype(self):
        return self.lora_A.dtype

    def factors(self):
        a = self.kind.matrix(self.lora_A) * self.lora_gate[:, None]
        b = self.kind.matrix(self.lora_B)
        if self._keep is not None:
            a, b = a[self._keep], b[:, self._keep]
        return a, b, self.scale

    def _gated(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.kind.per_out(self.lora_gate * self.scale).to(h.dtype)

    def delta(self, x, base_out):
        return self.kind.up(self._gated(self.kind.down(self.dropout(x), self.lora_A)), self.lora_B)

    def add_delta_(self, out, x, base_out):
        h = self.kind.down(self.dropout(x) if self.training else x, self.lora_A)
        self.kind.add_up_(out, h.mul_(self.kind.per_out(self.lora_gate * self.scale).to(h.dtype)), self.lora_B)

    # ---- sparsity ----------------------------------------------------------------------------------
    def kept(self, tol: float = 0.0) -> torch.Tensor:
        """Boolean mask of the ranks whose gate is non-zero (|g| > tol)."""
        return self.lora_gate.detach().abs() > tol

    def extra_repr(self):
        return f"r={self.r}, scale={self.scale:g}, open gates={int(self.kept().sum())}"


def sora_layers(model: nn.Module, name: Optional[str] = None) -> dict[str, SoRA]:
    """"path/adapter" → SoRA variant, for adapter `name` (every SoRA adapter when None), in model order."""
    from ..layers import AdaptedLayer

    out = {}
    for path, layer in model.named_modules():
        if isinstance(layer, AdaptedLayer):
            for n, v in layer.adapters.items():
                if isinstance(v, SoRA) and (name is None or n == name):
                    out[f"{path}/{n}"] = v
    return out


def gate_sparsity(model: nn.Module, name: Optional[str] = None) -> float:
    """Fraction of gate entries that are exactly zero, over adapter `name`'s layers (all SoRA adapters if None)."""
    gates = [v.lora_gate.detach() for v in sora_layers(model, name).values()]
    if not gates:
        raise ConfigError(f"no SoRA adapter{'' if name is None else f' named {name!r}'} on this model")
    total = sum(g.numel() for g in gates)
    return sum(int((g == 0).sum()) for g in gates) / total


def l1_penalty(model: nn.Module, name: Optional[str] = None) -> torch.Tensor:
    """mean |g| over every gate entry of adapter `name` (all SoRA adapters if None): the reference's L1 term
    (`loss += sparse_lambda · l1_penalty(model)`), differentiable. The `sora` optimizer adds this term's gradient
    itself (option `l1="grad"`); add it to the loss yourself only with `l1="loss"`."""
    gates = [v.lora_gate for v in sora_layers(model, name).values()]
    if not gates:
        raise ConfigError(f"no SoRA adapter{'' if name is None else f' named {name!r}'} on this model")
    return sum(g.abs().sum() for g in gates) / sum(g.numel() for g in gates)


@contextlib.contextmanager
def _pruned(variants: dict[str, SoRA], tol: float):
    """While inside, each variant's `factors()` returns only its kept ranks (at least one: a layer whose gates are
    all shut keeps the rank of its largest |g|, an all-zero row of A' = diag(g)·A when tol = 0)."""
    try:
        for v in variants.values():
            keep = v.kept(tol)
            if not keep.any():
                keep = torch.zeros_like(keep)
                keep[v.lora_gate.detach().abs().argmax()] = True
            v._keep = keep
        yield
    finally:
        for v in variants.values():
            v._keep = None


@torch.no_grad()
def prune_sora(model: nn.Module, name: str = "default", directory: str | os.PathLike | None = None,
               new_name: Optional[str] = None, tol: float = 0.0) -> dict[str, int]:
    """Cut the shut ranks of SoRA adapter `name` out: a plain PEFT LoRA whose layer at `path` has rank = number of
    non-zero gates there (`rank_pattern` / `alpha_pattern` for the layers off the most common rank), with
    A' = diag(g)[kept]·A[kept], B' = B[:, kept] and the scale folded into B (written by `lorakit.export_lora`).

    `directory`: write the folder there (PEFT and vLLM load it). `new_name`: also load it into `model` as a plain
    LoRA adapter of that name (the SoRA adapter stays; delete it when done). At least one of the two is required.
    `tol`: also cut ranks with |g| ≤ tol (0 by default: only exact zeros, so the outputs are unchanged; tol > 0
    changes them). A layer with every gate shut keeps one all-zero rank (PEFT refuses r = 0; its ΔW is 0).
    Returns {module path: kept rank}.
    """
    from ..io import export_lora, load_adapter

    if directory is None and new_name is None:
        raise ConfigError("prune_sora needs a directory to write to, a new_name to load the pruned LoRA as, or both")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ConfigError(f"tol must be a number ≥ 0, got {tol!r}")
    variants = sora_layers(model, name)
    if not variants:
        raise ConfigError(f"adapter {name!r} is not a SoRA adapter on this model")
    ranks = {key.rsplit("/", 1)[0]: max(1, int(v.kept(tol).sum())) for key, v in variants.items()}
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="sora_pruned_"))
        with _pruned(variants, tol):
            export_lora(model, directory, name)
        if new_name is not None:
            load_adapter(model, Path(directory), new_name)
    return ranks


__all__ = ["SoRA", "gate_sparsity", "l1_penalty", "prune_sora", "sora_layers"]
