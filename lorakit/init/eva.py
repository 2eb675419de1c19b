"""EVA — Explained Variance Adaptation (Paischer et al., arXiv 2410.07170): `lorakit.initialize(model, "eva", ...)`.

A plain `lora` adapter is re-created with A from the principal directions of each layer's inputs and B = 0:

1. one forward pass finds layers that receive identical inputs (q/k/v, gate/up): they share one PCA;
2. the data is cycled; each remaining layer's inputs (positions with label == `label_mask_value` and padding
   dropped when `use_label_mask`) feed an incremental PCA with round(ρ·r) components (randomized SVD,
   `torch.svd_lowrank(q=2·components, niter=4)` seeded 42, centred, as PEFT's EVA); a layer stops when every
   component it will receive has cosine ≥ τ with the previous batch's estimate;
3. the rank budget Σ r is redistributed to the globally largest explained-variance ratios (each layer capped at
   round(ρ·r)); a layer sharing another's PCA never gets more than the layer computing it (ranks are swapped);
4. the adapter is deleted and re-injected with `rank_pattern` (k_l = 0: layer not adapted) and, with
   `adjust_scaling_factors`, `alpha_pattern` α_l = α·k_l/r_l (the scale α/r is kept); A_l = top-k_l directions
   (divided by √σ_i with `whiten`), B_l = 0, so ΔW = 0 and the base model is unchanged.

Only linear layers (nn.Linear, transformers Conv1D) take part, as in PEFT; other adapted layers (Conv, Embedding)
keep their rank and default init and are left out of the budget. The dataloader is cycled until every layer has
converged, at most `max_steps` forward passes (PEFT has no limit; reaching it raises ConfigError).

Choices where PEFT is the reference: the mask is attention_mask ∧ (labels ≠ label_mask_value) and is applied when
a layer input's leading dims equal the mask's (batch, seq); otherwise (or for batches that are not mappings,
which need `loss_fn` to run the model) every row is used. Layers are matched for identical inputs by a digest of
the first batch's inputs.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from collections.abc import Mapping
from itertools import cycle, islice
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..kinds import ConvKind, EmbeddingKind, LinearKind
from . import passes, register_init

SEED = 42  # the randomized SVD's seed (PEFT's EVA)
NITER = 4  # its subspace iterations
RHO_CEILING = 1000  # above this, ρ is capped at the largest parameter dimension / r (as PEFT)


class IncrementalPCA:
    """Centred PCA updated one batch at a time (Ross et al. 2008 / scikit-learn's incremental PCA), the SVD of
    each update being randomized (`torch.svd_lowrank`, q = 2·k, seeded) as in PEFT. After `update`, `components`
    (k, n) rows are the principal directions (sign-fixed: each row's largest-|·| entry positive), `singular_values`
    (k,), `explained_variance_ratio` (k,)."""

    def __init__(self, k: int, seed: int = SEED, niter: int = NITER):
        self.k, self.seed, self.niter = k, seed, niter
        self.count = 0
        self.mean = self.var = None
        self.components = self.singular_values = self.explained_variance_ratio = None

    def _moments(self, x: torch.Tensor):
        """Running mean and (biased) variance over all rows seen, in float64 (Chan et al.'s pairwise update)."""
        m = x.shape[0]
        total = self.count + m
        batch_sum = x.sum(0, dtype=torch.float64)
        batch_mean = batch_sum / m
        centred = x - batch_mean
        ss = centred.square().sum(0, dtype=torch.float64) - centred.sum(0, dtype=torch.float64).square() / m
        if self.count == 0:
            return batch_sum / total, ss / total
        prev_sum = self.mean * self.count
        mean = (prev_sum + batch_sum) / total
        ss = self.var * self.count + ss + (self.count / m) / total * (prev_sum * m / self.count - batch_sum).square()
        return mean, ss / total

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.float().clone()
        m = x.shape[0]
        mean, var = self._moments(x)
        total = self.count + m
        if self.components is None:
            x -= mean
        else:
            batch_mean = x.mean(0)
            x -= batch_mean
            shift = ((self.count / total) * m) ** 0.5 * (self.mean - batch_mean)
            x = torch.cat([self.singular_values[:, None] * self.components, x, shift[None]])
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            _, s, v = torch.svd_lowrank(x, q=2 * self.k, niter=self.niter)
        vh = v.mT
        rows = torch.arange(vh.shape[0], device=vh.device)
        vh = vh * torch.sign(vh[rows, vh.abs().argmax(1)])[:, None]
        self.count, self.mean, self.var = total, mean, var
        self.components, self.singular_values = vh[:self.k], s[:self.k]
        self.explained_variance_ratio = (s.square() / (var * total).sum())[:self.k]


class _Layer:
    """One layer's PCA and its convergence flags (per component)."""

    def __init__(self, path: str, k: int, tau: float):
        self.path, self.tau = path, tau
        self.pca = IncrementalPCA(k)
        self.converged = torch.zeros(k, dtype=torch.bool)
        self.active = True  # the hook feeds the PCA

    def feed(self, x: torch.Tensor) -> None:
        if x.shape[0] < self.pca.k:  # too few rows for k components this batch (PEFT skips it too)
            return
        prev = self.pca.components
        self.pca.update(x)
        if prev is not None:
            sim = torch.nn.functional.cosine_similarity(self.pca.components, prev.to(self.pca.components.dtype))
            self.converged = (sim >= self.tau).cpu()


def _mask(batch, use_label_mask: bool, label_value: int) -> Optional[torch.Tensor]:
    if not isinstance(batch, Mapping) or not isinstance(batch.get("input_ids"), torch.Tensor):
        return None
    mask = batch.get("attention_mask")
    mask = torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.bool()
    labels = batch.get("labels")
    if use_label_mask and isinstance(labels, torch.Tensor) and labels.shape == mask.shape:
        mask = mask & (labels != label_value)
    return mask


def _rows(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is not None and x.shape[:-1] == mask.shape:
        return x[mask]
    return x.reshape(-1, x.shape[-1])


def _forward(model, batch):
    if not isinstance(batch, Mapping):
        raise ConfigError("eva init: batches that are not mappings of model inputs need loss_fn=(model, batch) -> ...")
    return model(**batch)


def _digest(x: torch.Tensor) -> str:
    x = x.detach().contiguous().cpu()
    return hashlib.sha256(str((x.dtype, tuple(x.shape))).encode() + x.view(torch.uint8).numpy().tobytes()).hexdigest()


def _check(rho, tau, max_steps) -> None:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho >= 1.0:
        raise ConfigError(f"eva init: option rho must be a number >= 1, got {rho!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau <= 1.0:
        raise ConfigError(f"eva init: option tau must be in [0, 1], got {tau!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ConfigError(f"eva init: option max_steps must be a positive int, got {max_steps!r}")


def _distribute(pcas: dict, owner: dict, caps: dict, budget: int) -> dict:
    """Per-layer ranks: the `budget` largest explained-variance ratios over all layers (each layer contributes its
    owner's first caps[layer] ratios); then a layer sharing its owner's PCA never outranks the owner (swap)."""
    keys, values = [], []
    for path, src in owner.items():
        ratios = pcas[src].pca.explained_variance_ratio[:caps[path]]
        keys += [path] * len(ratios)
        values += list(ratios)
    order = torch.stack(values).argsort(descending=True)
    counts = Counter(keys[i] for i in order[:budget].tolist())
    ranks = {path: counts.get(path, 0) for path in owner}
    for path, src in owner.items():
        if src != path and ranks[src] < ranks[path]:
            ranks[src], ranks[path] = ranks[path], ranks[src]
    return ranks


@register_init("eva")
@torch.no_grad()
def init_eva(run, rho: float = 2.0, tau: float = 0.99, whiten: bool = False, use_label_mask: bool = True,
             label_mask_value: int = -100, adjust_scaling_factors: bool = True, max_steps: int = 10_000) -> None:
    """EVA init of plain-LoRA adapter `run.name` (see the module docstring). `run.max_batches` limits the batches
    that are cycled; `run.loss_fn(model, batch)` (if given) is only used to run the forward pass."""
    from ..model import (active_adapters, adapter_parameters, attach, delete_adapter, disabled, get_config, prepare,
                         set_active)

    _check(rho, tau, max_steps)
    model, name = run.model, run.name
    config = get_config(model, name)
    if config.variant != "lora":
        raise ConfigError(f"initialization 'eva' needs adapter {name!r} to be a plain 'lora' adapter, "
                          f"got variant {config.variant!r}")
    layers = passes.adapted_layers(model, name)
    linear = {p: w for p, w in layers.items()
              if isinstance(w.kind, LinearKind) and not isinstance(w.kind, (ConvKind, EmbeddingKind))}
    if not linear:
        raise ConfigError(f"initialization 'eva' needs linear layers; adapter {name!r} has none")
    if rho > RHO_CEILING:
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // config.r)
    rank = {p: config.rank_for(p) for p in linear}
    caps = {p: round(rank[p] * rho) for p in linear}
    budget = sum(rank.values())
    for p, w in linear.items():
        if caps[p] > w.kind.in_features:
            raise ConfigError(f"eva init: rho·r = {caps[p]} components exceed the {w.kind.in_features} input "
                              f"features of {p}; lower option rho or the rank")

    data = run.needs_data("eva")
    if run.max_batches is not None or iter(data) is data:  # a one-shot iterator is cycled from a list
        data = list(islice(data, run.max_batches))
    if hasattr(data, "__len__") and len(data) == 0:
        raise ConfigError("eva init: the dataloader is empty")
    device = next(model.parameters()).device
    forward = (lambda b: run.loss_fn(model, b)) if run.loss_fn else (lambda b: _forward(model, b))
    state = {"mask": None}
    handles = []

    def register(fn):
        for p, w in linear.items():
            handles.append(w.register_forward_hook(lambda mod, args, out, p=p: fn(p, _rows(args[0], state["mask"]))))

    def remove():
        while handles:
            handles.pop().remove()

    try:
        with disabled(model):
            # 1. identical inputs share one PCA: the first layer (model order) with each input owns it
            first = next(iter(data))
            first = passes.to_device(first, device)
            state["mask"] = _mask(first, use_label_mask, label_mask_value)
            digests = {}
            register(lambda p, x: digests.__setitem__(p, _digest(x)))
            forward(first)
            remove()
            missing = sorted(set(linear) - set(digests))
            if missing:
                raise ConfigError(f"eva init: layers {missing} received no input in a forward pass")
            owner_of, owner = {}, {}
            for p in linear:
                owner[p] = owner_of.setdefault(digests[p], p)
            for p in linear:  # layers sharing an input get the largest cap among them
                caps[p] = max(caps[q] for q in linear if owner[q] == owner[p])
            pcas = {p: _Layer(p, caps[p], tau) for p in linear if owner[p] == p}
            # PEFT's order for the pooled ratios: owners first, then the layers that share, each in model order
            owner = {**{p: p for p in pcas}, **{p: o for p, o in owner.items() if o != p}}

            # 2. incremental PCA until the components each layer will receive have converged
            register(lambda p, x: pcas[p].feed(x) if p in pcas and pcas[p].active else None)
            ranks = dict(caps)
            bar = tqdm(total=None, desc="eva", disable=not run.progress, leave=False)
            steps = 0
            for batch in cycle(data):
                for p, layer in pcas.items():
                    layer.active = not bool(layer.converged[:ranks[p]].all())
                done = sum(not layer.active for layer in pcas.values())
                bar.set_description(f"eva: {done}/{len(pcas)} PCAs converged")
                if done == len(pcas):
                    break
                if steps == max_steps:
                    raise ConfigError(f"eva init did not converge in max_steps={max_steps} forward passes "
                                      f"({done}/{len(pcas)} PCAs converged); raise max_steps or lower tau")
                batch = passes.to_device(batch, device)
                state["mask"] = _mask(batch, use_label_mask, label_mask_value)
                forward(batch)
                steps += 1
                bar.update(1)
                if all(layer.pca.components is not None for layer in pcas.values()):
                    ranks = _distribute(pcas, owner, caps, budget)
            bar.close()
    finally:
        remove()

    # 3.–4. re-create the adapter with the new ranks; A = top directions, B = 0
    rank_pattern, alpha_pattern, targets, init = {}, {}, [], {}
    for p in layers:
        r_old, alpha = config.rank_for(p), config.alpha_for(p)
        new = ranks[p] if p in linear else r_old
        if new == 0:
            continue
        if p in linear:
            layer = pcas[owner[p]].pca
            a = layer.components[:new]
            if whiten:
                a = a / layer.singular_values[:new].sqrt()[:, None]
            init[p] = a
            if new != r_old and adjust_scaling_factors:
                alpha = alpha * new / r_old
        targets.append(p)
        if new != config.r:
            rank_pattern[p] = new
        if alpha != config.lora_alpha:
            alpha_pattern[p] = alpha
    if not targets:
        raise ConfigError(f"eva init assigned rank 0 to every layer of adapter {name!r}")
    new_config = dataclasses.replace(config, target_modules=targets, rank_pattern=rank_pattern,
                                     alpha_pattern=alpha_pattern)
    active = active_adapters(model)
    trainable = any(t.requires_grad for t in adapter_parameters(model, name).values())
    delete_adapter(model, name)
    attach(model, prepare(model, new_config, name), trainable=trainable)
    set_active(model, active)
    for p, layer in passes.adapted_layers(model, name).items():
        variant = layer.adapters[name]
        if p in init:
            variant.lora_A.copy_(init[p].to(variant.lora_A.dtype).reshape(variant.lora_A.shape))
            variant.lora_B.zero_()


__all__ = ["IncrementalPCA", "init_eva"]
