"""Full fine-tuning as a run mode (`variant: full`): no adapter; every parameter of the base model is trained.

The rest of a run is the same as for an adapter (data, trainer, evaluation, metrics, checkpoints, resume); only
the model's preparation and the saved weights differ:

- `prepare`: every parameter trainable (a classification head too) in fp32. With `bf16` the forward runs under
  bf16 autocast while the weights, their gradients and the AdamW state stay fp32 (mixed precision, as
  transformers' `bf16=True`): AdamW on bf16 weights would lose most small updates to rounding. `fp16` is
  refused (it would need loss scaling), as is `quantize` (quantized weights cannot be trained).
  Adapter settings (r, lora_alpha, target_modules, init, eval_ranks, ...) are ignored, said in one line on stderr.
- `save`: `<output_dir>/full_model/` = transformers' `save_pretrained` (config.json + model.safetensors, never a
  pickle) and the tokenizer, so `load_model(<output_dir>/full_model, task)` rebuilds the trained model. Under
  FSDP (`fsdp: full_shard`) the shards are gathered first: the same files one process writes.
- `load_full(run_dir)`: the fine-tuned model; `load_base(run_dir)`: the model it started from;
  `full_deltas(run_dir)`: each nn.Linear's W_trained − W_base (what the analysis tools compare with an adapter's ΔW).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from ..config import AdapterConfig
from ..errors import ConfigError, ModelError
from .args import FULL, RunConfig, _keys

FULL_DIR = "full_model"


def check(config: RunConfig) -> None:
    """ConfigError for settings a full fine-tuning run cannot honour."""
    if config.training.fp16:
        raise ConfigError("variant full with fp16 would need loss scaling, which the trainer does not do; use bf16 "
                          "(fp32 master weights, bf16 autocast) or neither")
    if config.quantize:
        raise ConfigError(f"variant full trains every base weight, which cannot be stored quantized "
                          f"(quantize={config.quantize!r}); drop quantize")


def ignored(config: RunConfig) -> list[str]:
    """`name=value` of the adapter settings a full run ignores: r, lora_alpha and target_modules always, the others
    when they differ from their defaults."""
    default, run_default = AdapterConfig(), RunConfig()
    names = ["r", "lora_alpha", "target_modules"] + sorted(
        k for k in _keys(AdapterConfig) - {"r", "lora_alpha", "target_modules", "variant"}
        if getattr(config.adapter, k) != getattr(default, k))
    out = [f"{k}={getattr(config.adapter, k)!r}" for k in names]
    return out + [f"{k}={getattr(config, k)!r}" for k in ("init", "init_args", "eval_ranks")
                  if getattr(config, k) != getattr(run_default, k)]


def prepare(model: nn.Module, config: RunConfig, show: bool = True) -> nn.Module:
    """Make every parameter trainable; with `bf16`, run the forward under bf16 autocast (weights stay fp32).
    `show`: print which adapter settings are ignored."""
    if show:
        print(f"note: variant {FULL}: no adapter, every parameter of the base is trained; ignoring adapter settings "
              f"{', '.join(ignored(config))}", file=sys.stderr, flush=True)
    model.requires_grad_(True)
    if config.training.bf16:  # as accelerate's mixed precision: the instance's forward wrapped in autocast
        device = next(model.parameters()).device.type
        model.forward = torch.autocast(device, dtype=torch.bfloat16)(model.forward)
    return model


def save(model: nn.Module, tokenizer, folder: str | Path, state: dict | None = None) -> Path:
    """Write the model (safetensors) and tokenizer to `folder`, replacing it whole only once complete.
    `state`: the model's whole state dict when it is sharded (FSDP), else None."""
    from ..models import save_base

    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if state is None:
            save_base(model, tokenizer, str(tmp))
        else:
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def full_folder(path: str | Path) -> Path | None:
    """The `full_model/` folder of a run's output_dir (or `path` itself when it is one), else None."""
    path = Path(path)
    for folder in (path / FULL_DIR, path):
        if folder.name == FULL_DIR and (folder / "config.json").is_file():
            return folder
    return None


def load_full(run_dir: str | Path) -> nn.Module:
    """The fine-tuned model of a full run (its output_dir), in eval mode, fp32, on the CPU."""
    from ..models import load_model

    folder, task, _ = _run(run_dir)
    num_labels = json.loads((folder / "config.json").read_text()).get("num_labels", 2)
    return load_model(str(folder), task, num_labels=num_labels, tokenizer=False)[0]


def full_deltas(run_dir: str | Path, base: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """{module path: W_trained − W_base} (fp32) for every nn.Linear of a full run (the classification head and a
    tied lm_head included). `base`: the model the run started from; default: the run's `base_model` as the run
    loaded it (for tiny-llama the `base_model/` folder it wrote; heads drawn from the run's seed)."""
    tuned = load_full(run_dir)
    base = load_base(run_dir) if base is None else base
    start = {n: m.weight for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    out = {}
    for name, module in tuned.named_modules():
        if isinstance(module, nn.Linear) and name in start and start[name].shape == module.weight.shape:
            out[name] = module.weight.detach().float() - start[name].detach().float().to(module.weight.device)
    return out


def load_base(run_dir: str | Path) -> nn.Module:
    """The model a full run started from, fp32 on the CPU: its results' `base_model` as the run loaded it (for
    tiny-llama the `base_model/` folder it wrote; a classification head drawn from the run's seed)."""
    from ..models import load_model

    folder, task, results = _run(run_dir)
    spec = results.get("base_model")
    if not spec:
        raise ModelError(f"{run_dir}/results.json names no base_model; pass the base model")
    num_labels = json.loads((folder / "config.json").read_text()).get("num_labels", 2)
    return load_model(spec, task, num_labels=num_labels, seed=results.get("seed", 0), tokenizer=False)[0].eval()


def _run(run_dir: str | Path) -> tuple[Path, str, dict]:
    """(full_model folder, task, results) of a full run; ModelError when `run_dir` is not one."""
    from .args import read_yaml

    run_dir = Path(run_dir)
    folder = full_folder(run_dir)
    if folder is None:
        raise ModelError(f"{run_dir} is not a full fine-tuning run: it has no {FULL_DIR}/config.json "
                         f"(train one with variant full)")
    run_dir = folder.parent
    settings = read_yaml(run_dir / "run_config.yaml") if (run_dir / "run_config.yaml").exists() else {}
    results = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").exists() else {}
    return folder, settings.get("task", results.get("task", RunConfig.task)), results


__all__ = ["FULL", "FULL_DIR", "check", "full_deltas", "full_folder", "load_base", "load_full", "prepare", "save"]
