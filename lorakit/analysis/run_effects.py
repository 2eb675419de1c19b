"""What a finished training run did to its model beyond the task metric: `lorakit compare --analyse`'s columns, so
LoRA and full fine-tuning (`--variants lora,full`) are set side by side on the same data in one command.

`run_effects(run_dir, config)` loads the run's base and its tuned model (the base + the saved adapter, or the saved
full model) and returns
- `intruders`, `intruder_layers`, `layers`: intruder dimensions at k 10, ε 0.5 (`intruders.layer_intruders`) summed
  over the layers, how many layers have any, and how many were examined. For an adapter: its adapted layers; for
  full fine-tuning: every nn.Linear inside the numbered transformer blocks (the layers `all-linear` adapts; the task
  head is left out, as it is new rather than fine-tuned).
- classification: `ece`, `mce`, `ace`, `brier` of the tuned model's softmax on the test split (`calibration`).
- causal LMs: `base_perplexity`, `perplexity` and `kl` (KL(base ‖ tuned), nats per token) on held-out text outside
  the task (`behaviour.forgetting`): `texts`, default `stdlib_docstrings()`.
Base SVDs are cached (`svd_cache_dir()`), so runs on the same base pay for them once."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..data import GENERATIVE

BLOCK = re.compile(r"(^|\.)(layer|layers|h|blocks)\.\d+\.")


def block_linear_paths(model: torch.nn.Module) -> list[str]:
    """Paths of the nn.Linear modules inside numbered transformer blocks (`...layers.3.mlp.up_proj`)."""
    return [p for p, m in model.named_modules() if isinstance(m, torch.nn.Linear) and BLOCK.search(p)]


def run_effects(run_dir: str | Path, config, texts: list[str] | None = None, k: int = 10,
                epsilon: float = 0.5) -> dict:
    """The intruder counts and, by task, calibration or forgetting of the run in `run_dir` (see the module
    docstring); `config`: the run's `RunConfig` (its data, task and model)."""
    from .. import load_adapter
    from ..models import load_model
    from ..train import full as full_ft
    from ..train.run import _texts, adapter_base, adapter_folder, load_splits
    from .intruders import adapter_intruders, svd_cache_dir, weight_intruders

    splits = load_splits(config)
    full = full_ft.full_folder(run_dir)
    if full is not None:
        from transformers import AutoTokenizer

        base, tuned = full_ft.load_base(run_dir), full_ft.load_full(run_dir).float().eval()
        tokenizer = AutoTokenizer.from_pretrained(str(full))
        found = weight_intruders(base, tuned, block_linear_paths(base), k, epsilon, cache=svd_cache_dir())
    else:
        folder = adapter_folder(run_dir)
        base, tokenizer = load_model(adapter_base(folder, config), config.task, num_labels=splits.train.num_labels,
                                     seed=config.training.seed, texts=_texts(splits.train))
        tuned = base.float().eval()
        load_adapter(tuned, folder, "default")
        found = adapter_intruders(tuned, k=k, epsilon=epsilon, cache=svd_cache_dir())
    out = {"intruders": sum(r["intruders"] for r in found.values()),
           "intruder_layers": sum(r["intruders"] > 0 for r in found.values()), "layers": len(found)}
    if config.task == "classification":
        out.update(_calibration(tuned, tokenizer, config, splits))
    elif config.task in GENERATIVE:
        from .behaviour import forgetting, stdlib_docstrings

        scored = forgetting(tuned, tokenizer, texts or stdlib_docstrings(),
                            reference=base if full is not None else None)
        out.update(base_perplexity=scored["base_perplexity"], perplexity=scored["adapted_perplexity"],
                   kl=scored["kl"])
    return out


@torch.no_grad()
def _calibration(model, tokenizer, config, splits) -> dict:
    from ..claims.predictions import classify
    from ..train.tasks import make_task
    from .calibration import calibration_report

    task = make_task(config.task, tokenizer, config.training.max_length, splits.train.num_labels)
    rows = classify(model, task, splits.test, config.training.per_device_eval_batch_size)
    probs = torch.tensor([r["probabilities"] for r in rows], dtype=torch.float64)
    labels = torch.tensor([r["label"] for r in rows])
    report = calibration_report(probs, labels)
    return {name: report[name] for name in ("ece", "mce", "ace", "brier")}
