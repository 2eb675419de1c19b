"""Working with transformers' own calls, as PEFT users do.

- `save_pretrained`: injecting into a transformers model routes that model's `save_pretrained` (and so
  `transformers.Trainer` checkpoints) to the adapters, written as PEFT writes them: adapter "default" at the
  folder's root, any other one in `<folder>/<name>/`, each with `base_model_name_or_path` and `task_type`. Without
  this the whole state dict would be written with `base_layer` / `adapters.<name>` keys that `from_pretrained`
  silently skips (random base weights). For a full model folder, `lorakit.merge_and_unload(model)` first: the
  plain model saves as usual.
- `from_pretrained(adapter_dir)`: the equivalent of PEFT's `AutoPeftModelFor*.from_pretrained`: the base named by
  the folder's `base_model_name_or_path` (a local folder or a lorakit model name) plus the adapter.
- `metadata(model)`: what a saved adapter records about its base.
"""
from __future__ import annotations

import os
import types
from pathlib import Path
from typing import Optional

from torch import nn

# PEFT's task types by the transformers head class suffix
_TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
               "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS",
               "ForConditionalGeneration": "SEQ_2_SEQ_LM"}


def is_transformers_model(model: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel"
               for c in type(model).__mro__)


def metadata(model: nn.Module) -> dict:
    """{"base_model_name_or_path", "task_type"} of a transformers model, the keys that are known."""
    out = {}
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if name:
        out["base_model_name_or_path"] = str(name)
    task = next((t for suffix, t in _TASK_TYPES.items() if type(model).__name__.endswith(suffix)), None)
    if task:
        out["task_type"] = task
    return out


def labels(model: nn.Module) -> Optional[dict[int, str]]:
    """The classifier's `id2label` when its config names its labels (not transformers' LABEL_0, LABEL_1, ...)."""
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if not id2label or not type(model).__name__.endswith("ForSequenceClassification"):
        return None
    named = {int(k): str(v) for k, v in id2label.items()}
    return None if all(v == f"LABEL_{k}" for k, v in named.items()) else named


# ---- transformers' save_pretrained on an injected model ------------------------------------------------
def bind_save_pretrained(model: nn.Module) -> None:
    """Route `model.save_pretrained` to `save_pretrained` below (an instance attribute: the class is untouched)."""
    if is_transformers_model(model) and "save_pretrained" not in vars(model):
        model.save_pretrained = types.MethodType(save_pretrained, model)


def unbind_save_pretrained(model: nn.Module) -> None:
    vars(model).pop("save_pretrained", None)


def save_pretrained(model: nn.Module, save_directory, selected_adapters: Optional[list[str]] = None,
                    is_main_process: bool = True, **ignored) -> None:
    """Write the model's adapters (all, or `selected_adapters`) to `save_directory` in PEFT's layout: "default" at
    the root, others in sub-folders. transformers' keyword arguments (`state_dict`, `safe_serialization`, ...) are
    accepted and ignored: the adapters' own tensors are written, always as safetensors."""
    from .io import save_adapter
    from .model import adapter_names

    if not is_main_process:
        return
    names = adapter_names(model) if selected_adapters is None else list(selected_adapters)
    for name in names:
        save_adapter(model, Path(save_directory) / ("" if name == "default" else name), name)


# ---- one-call loading -------------------------------------------------------------------------------
def from_pretrained(adapter_dir: str | os.PathLike, name: str = "default", trainable: bool = False,
                    base: Optional[str] = None, return_tokenizer: bool = False):
    """The base model named by `adapter_dir`'s config (`base_model_name_or_path`, or `base` to override it: a local
    transformers folder or a lorakit model name) with the adapter loaded as `name`; (model, tokenizer) with
    `return_tokenizer`. The task comes from `task_type` (CAUSAL_LM → a causal LM, SEQ_CLS → a classifier whose
    size is the saved head's; labels from the file when it names them)."""
    from .errors import ConfigError
    from .io import load_adapter, read_adapter
    from .io.files import read_labels
    from .models import load_model

    config, tensors = read_adapter(adapter_dir)
    spec = base or config.base_model_name_or_path
    if not spec:
        raise ConfigError(f"{adapter_dir}: adapter_config.json names no base_model_name_or_path; pass base=...")
    task, num_labels = _task(config.task_type, tensors, adapter_dir)
    model, tokenizer = load_model(spec, task, num_labels=num_labels, tokenizer=return_tokenizer)
    id2label = read_labels(adapter_dir)
    if id2label:
        model.config.id2label = id2label
        model.config.label2id = {v: k for k, v in id2label.items()}
    load_adapter(model, adapter_dir, name, trainable=trainable)
    return (model, tokenizer) if return_tokenizer else model


def _task(task_type: Optional[str], tensors: dict, where) -> tuple[str, int]:
    from .errors import ConfigError

    if task_type in (None, "CAUSAL_LM"):
        return "causal-lm", 2
    if task_type == "SEQ_CLS":
        heads = [t for k, t in tensors.items() if k.split(".")[0] in ("classifier", "score") and k.endswith("weight")
                 and t.dim() == 2]
        rows = heads[-1].shape[0] if heads else 2  # the output projection comes last (e.g. classifier.out_proj)
        return ("regression", 1) if rows == 1 else ("classification", rows)
    raise ConfigError(f"{where}: task_type {task_type!r} is not one lorakit loads in one call (CAUSAL_LM, SEQ_CLS); "
                      f"load the base yourself and call lorakit.load_adapter")
