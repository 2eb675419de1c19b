"""LoRAM (Zhang et al., ICLR 2025): train a LoRA on a structurally pruned model, recover it to the full model.

Steps: (0) `prune_structured(model, sparsity)` prunes a copy of the base model one-shot (heads and MLP channels,
magnitude or random scores; see `lorakit.rank.prune`) and returns the `PruningRecord`; (1) the optional alignment
of the pruned model (light continual pre-training) is left to the user; (2) train a LoRA on the pruned model with
lorakit as usual; (3) `recover_adapter(pruned_model, full_model, name, record)` scatters every trained B row and A
column back to the original shapes with zeros at the pruned indices (`norm_a=True`: pruned A columns ~ N(0, 1/r)
instead, the reference's `normA` option, which makes ΔW non-zero on the pruned input columns) and injects the
result into the full model;
(4) merge (`lorakit.merge_and_unload`) and evaluate on the original model.

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
            fill = torch.randn(r, kind.in_features, generator=gen).to(sv.lora_A.device) / r ** 0.5
        v.lora_A.copy_(_scatter(sv.lora_A, 1, entry.get("in"), kind.in_features, fill))
        v.lora_B.copy_(_scatter(sv.lora_B, 0, entry.get("out"), kind.out_features))
    for path, c in prepared.copies.items():
        src = pruned.get(path)
        if not isinstance(src, TrainedCopy) or name not in src.copies:
            raise ModelError(f"{path}: the pruned model has no saved copy for {name!r}")
        c.load_state_dict(src.copies[name].state_dict())
    attach(full_model, prepared, trainable=trainable)
    return full_model


def loram_experiment(config, sparsity: float = 0.5, metric: str = "magnitude", baseline: bool = True,
                     **prune_options) -> dict:
    """LoRAM on a run (`lorakit.train.args.RunConfig`): prune a copy of the base one-shot, train the run's LoRA on
    it, recover it to the full model, merge, and evaluate on the original model's test split; with `baseline`,
    also the frozen-encoder baseline (logistic regression on mean-pooled embeddings; encoders only)."""
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


def main(argv=None) -> dict:
    """`python -m lorakit.rank.loram --config run.yaml [--experiment loraprune|loram] [--metrics lora,random,...]
    [--sparsity 0.5] [--out results.json]`: the issue's experiments on one run config (flat YAML, as `lorakit train`).
    loraprune: one run per metric, each in output_dir/<metric>; loram: one run in output_dir/loram."""
    import argparse
    import dataclasses as dc
    import json

    from ..train.args import RunConfig, read_yaml
    from .prune import prune_experiment

    p = argparse.ArgumentParser(prog="python -m lorakit.rank.loram")
    p.add_argument("--config", required=True)
    p.add_argument("--experiment", choices=["loraprune", "loram"], default="loraprune")
    p.add_argument("--metrics", default="lora,magnitude,random")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    config = RunConfig.from_flat(read_yaml(a.config))

    def under(sub):
        return dc.replace(config, training=dc.replace(config.training,
                                                      output_dir=f"{config.training.output_dir}/{sub}"))
    if a.experiment == "loram":
        results = {"loram": loram_experiment(under("loram"), a.sparsity)}
    else:
        results = {m: prune_experiment(under(m), metric=m, sparsity=a.sparsity) for m in a.metrics.split(",")}
    text = json.dumps(results, indent=1, default=str)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    print(text)
    return results


if __name__ == "__main__":
    main()
