"""LoRAM (Zhang et al., ICLR 2025): train a LoRA on a structurally pruned model, recover it to the full model.

Steps: (0) `prune_structured(model, sparsity)` prunes a copy of the base model one-shot (heads and MLP channels,
magnitude or random scores; see `lorakit.rank.prune`) and returns the `PruningRecord`; (1) `align_pruned` (optional,
the paper's alignment) trains the pruned model's own weights to reproduce the full model's hidden states on
unlabelled text; (2) train a LoRA on the pruned model with lorakit as usual; (3) `recover_adapter(pruned_model,
full_model, name, record)` scatters every trained B row and A column back to the original shapes with zeros at the
pruned indices (`norm_a=True`: pruned A columns ~ N(0, std 1/r) instead, the reference's `normA` option —
`3_recovered_low_rank_matrix_generation.py` fills them with `normal_(std=1/r)`, r = 8 hard-coded there, the
adapter's own r here — which makes ΔW non-zero on the pruned input columns) and injects the result into the full model; (4) merge
(`lorakit.merge_and_unload`) and evaluate on the original model.

Identity (default zero fill): on the kept rows/columns the recovered ΔW equals the pruned model's ΔW, elsewhere it is zero.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from ..errors import ModelError
from ..layers import AdaptedLayer, TrainedCopy
from ..model import attach, get_config, prepare
from .prune import LoRAPrune, PruningRecord, apply_record


def prune_structured(model: nn.Module, sparsity: float = 0.5, metric: str = "magnitude", seed: int = 0,
                     skip_first: float = 0.1, skip_last: bool = True, heads: bool = True,
                     channels: bool = True) -> PruningRecord:
    """One-shot structured pruning of `model` in place (copy it first to keep the original); metric "magnitude"
    (|W| summed per group, L2-normalised per module) or "random". Returns the record for `recover_adapter`."""
    pruner = LoRAPrune(model, adapter="__none__", sparsity=sparsity, metric=metric, seed=seed, skip_first=skip_first,
                       skip_last=skip_last, heads=heads, channels=channels)
    pruner.prune_now()
    return pruner.finalize()


def pruned_copy(model: nn.Module, record: PruningRecord) -> nn.Module:
    """A deep copy of `model` pruned as `record` says (the original is untouched)."""
    out = copy.deepcopy(model)
    apply_record(out, record)
    return out


def align_pruned(pruned_model: nn.Module, full_model: nn.Module, tokenizer, texts: list[str], epochs: int = 1,
                 lr: float = 2e-4, batch_size: int = 32, max_length: int = 128, seed: int = 0,
                 progress: bool = True) -> list[float]:
    """LoRAM's alignment step, in place on `pruned_model`: every weight of its backbone is trained (AdamW) so that
    each layer's hidden states match the full model's on `texts`. Returns the loss per step.

    Loss: for every layer output, the mean over real tokens of the squared error divided by the hidden size,
    averaged over layers.
    Choice: the paper aligns by continual pre-training (the LM loss) on a general corpus. Layer-wise distillation
    from the original model serves the same purpose, and it also works for encoders without an LM head. The full
    model is only read; the pruned model's requires_grad flags and train/eval mode are restored at the end.
    """
    from tqdm.auto import tqdm

    if not texts:
        raise ModelError("align_pruned needs at least one text")
    if any(isinstance(m, AdaptedLayer) for m in pruned_model.modules()):
        raise ModelError("align_pruned aligns the base model: align before injecting the adapter")
    small, teacher = (getattr(m, getattr(m, "base_model_prefix", ""), m) for m in (pruned_model, full_model))
    params = [p for p in small.parameters() if p.is_floating_point()]
    was_training, flags = small.training, [p.requires_grad for p in params]
    teacher.eval()
    small.train()
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    starts = range(0, len(texts), batch_size)
    losses = []
    try:
        with tqdm(total=epochs * len(starts), desc="aligning pruned model", unit="step", disable=not progress) as bar:
            for _ in range(epochs):
                order = torch.randperm(len(texts), generator=gen).tolist()
                for start in starts:
                    batch = tokenizer([texts[i] for i in order[start:start + batch_size]], padding=True,
                                      truncation=True, max_length=max_length, return_tensors="pt")
                    mask = batch["attention_mask"].unsqueeze(-1)
                    with torch.no_grad():
                        want = teacher(**batch, output_hidden_states=True).hidden_states[1:]
                    got = small(**batch, output_hidden_states=True).hidden_states[1:]
                    loss = sum(((g - w).square() * mask).sum() / (mask.sum() * w.shape[-1])
                               for g, w in zip(got, want)) / len(want)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    losses.append(float(loss.detach()))
                    bar.update()
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
            p.grad = None
        small.train(was_training)
    return losses


def _scatter(t: torch.Tensor, dim: int, idx: Optional[list], size: int, fill: Optional[torch.Tensor] = None):
    if idx is None:
        if t.shape[dim] != size:
            raise ModelError(f"adapter factor of size {t.shape[dim]} on dim {dim} does not match {size}")
        return t.detach().clone()
    out = torch.zeros(*t.shape[:dim], size, *t.shape[dim + 1:], dtype=t.dtype, device=t.device) if fill is None \
        else fill.to(t.dtype).clone()
    out.index_copy_(dim, torch.tensor(idx, dtype=torch.long, device=t.device), t.detach())
    return out


@torch.no_grad()
def recover_adapter(pruned_model: nn.Module, full_model: nn.Module, name: str = "default",
                    record: Optional[PruningRecord] = None, norm_a: bool = False, seed: int = 0,
                    trainable: bool = False) -> nn.Module:
    """Inject adapter `name` of `pruned_model` into the unpruned `full_model` (in place; returned), with A/B of
    every pruned Linear zero-filled back to the original shapes per `record`; saved modules (heads) are copied."""
    if record is None:
        raise ModelError("recover_adapter needs the PruningRecord of the pruned model")
    prepared = prepare(full_model, get_config(pruned_model, name), name, initialize=False)
    pruned = dict(pruned_model.named_modules())
    full = dict(full_model.named_modules())
    gen = torch.Generator().manual_seed(seed)
    for path, v in prepared.variants.items():
        src = pruned.get(path)
        if not isinstance(src, AdaptedLayer) or name not in src.adapters:
            raise ModelError(f"{path}: the pruned model has no adapter {name!r} there")
        sv = src.adapters[name]
        if set(v.file_tensors()) != set(sv.file_tensors()) or not hasattr(sv, "lora_A"):
            raise ModelError(f"{path}: recovery needs a plain LoRA adapter, got {sv.name!r}")
        entry = record.modules.get(path, {})
        kind = full[path].kind if isinstance(full[path], AdaptedLayer) else v.kind
        fill = None
        if norm_a and entry.get("in") is not None:
            r = sv.lora_A.shape[0]
            fill = torch.randn(r, kind.in_features, generator=gen).to(sv.lora_A.device) / r
        v.lora_A.copy_(_scatter(sv.lora_A, 1, entry.get("in"), kind.in_features, fill))
        v.lora_B.copy_(_scatter(sv.lora_B, 0, entry.get("out"), kind.out_features))
    for path, c in prepared.copies.items():
        src = pruned.get(path)
        if not isinstance(src, TrainedCopy) or name not in src.copies:
            raise ModelError(f"{path}: the pruned model has no saved copy for {name!r}")
        c.load_state_dict(src.copies[name].state_dict())
    attach(full_model, prepared, trainable=trainable)
    return full_model


def align_texts(specs: str, samples: int = 4000, seed: int = 0) -> list[str]:
    """Up to `samples` training texts drawn (seeded) from comma-separated data specs ("vader:tweets,vader:nyt",
    files), the unlabelled corpus for `align_pruned`."""
    from ..data import load_data

    texts = [t for spec in specs.split(",") if spec.strip() for t in load_data(spec.strip(), seed=seed).train.texts]
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))[:samples].tolist()
    return [texts[i] for i in order]


def loram_experiment(config, sparsity: float = 0.5, metric: str = "magnitude", baseline: bool = True,
                     align: Optional[list[str]] = None, align_epochs: int = 1, align_lr: float = 2e-4,
                     **prune_options) -> dict:
    """LoRAM on a run (`lorakit.train.args.RunConfig`): prune a copy of the base one-shot, align it on the texts
    `align` (when given; `align_pruned`), train the run's LoRA on it, recover it to the full model, merge, and
    evaluate on the original model's test split; with `baseline`, also the frozen-encoder baseline (logistic
    regression on mean-pooled embeddings; encoders only)."""
    import time

    from ..model import merge_and_unload
    from ..train.trainer import Trainer
    from .prune import _run_setup, _timed_eval, parameter_count

    splits, full, tokenizer, adapter, task, inject = _run_setup(config)
    results = {"sparsity": sparsity, "metric": metric, "parameters_full": parameter_count(full)}
    if baseline:
        from ..train.baseline import frozen_encoder_accuracy

        encoder = getattr(full, full.base_model_prefix)
        results["frozen_encoder_test_accuracy"] = frozen_encoder_accuracy(encoder, tokenizer, splits.train,
                                                                          splits.test, config.training.max_length)
    small = copy.deepcopy(full)
    record = prune_structured(small, sparsity, metric=metric, seed=config.training.seed, **prune_options)
    if align:
        started = time.perf_counter()
        losses = align_pruned(small, full, tokenizer, align, epochs=align_epochs, lr=align_lr,
                              max_length=config.training.max_length, seed=config.training.seed,
                              progress=not config.training.disable_tqdm)
        results.update(align_texts=len(align), align_seconds=round(time.perf_counter() - started, 1),
                       align_loss_first=losses[0], align_loss_last=losses[-1])
    torch.manual_seed(config.training.seed)
    inject(small, adapter, "default")
    results["parameters_pruned"] = parameter_count(small)
    trainer = Trainer(small, task, config.training, splits.train, splits.validation)
    trainer.train()
    results.update(_timed_eval(trainer, splits.test, "pruned_test"))
    recover_adapter(small, full, "default", record)
    merged = merge_and_unload(full)
    trainer.model = trainer.wrapped = merged
    results.update(_timed_eval(trainer, splits.test, "test"))
    return results
