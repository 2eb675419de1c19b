"""A whole run from one `RunConfig`: data → model → adapter → train → test → files.

Files in `output_dir`: `adapter/` (PEFT format, with the trained head), `metrics.jsonl` (one line per step),
`results.json` (final metrics, parameter counts, time, memory), `run_config.yaml`, `checkpoints/`,
`training_curves.png` (with matplotlib), and `base_model/` for a tiny-llama base (rebuilt from a seed and a
tokenizer trained on the data, so the run can be served or evaluated later).

Full fine-tuning (`variant: full`, see `lorakit.train.full`) injects no adapter and trains every parameter; it
writes `full_model/` (config.json + model.safetensors + tokenizer) instead of `adapter/`, and results.json gets
`"weights": "full_model"` and `"base_model"`. `load_full(run_dir)` gives the fine-tuned model and
`full_deltas(run_dir)` each nn.Linear's W_trained − W_base; `evaluate` and `lorakit eval` take a full run too.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import yaml

from .. import adapter_parameters, get_config, initialize, inject, load_adapter, read_adapter
from ..variants import get_variant
from ..data import GENERATIVE, load_data
from ..errors import ConfigError
from ..hf import labels
from ..io.files import CONFIG_NAME, write_folder
from ..model import count_parameters
from ..models import MODELS, PEFT_TASK_TYPES, load_model, minilm_dir, save_base
from . import checkpoint, full as full_ft
from .args import RunConfig
from .devices import base_dtype, device_of, resolve_device
from .distributed import Processes, full_tensors, is_sharded
from .full import FULL, FULL_DIR, full_deltas, load_full  # noqa: F401 - re-exported: tools find them here
from .tasks import make_task, single_class_warning
from .trainer import Trainer
from .trainer import evaluate as evaluate_model

ADAPTER_DIR = "adapter"


def load_splits(config: RunConfig):
    """The run's data splits (drawn by `split_seed`), reduced to `max_train_samples` / `max_eval_samples` when set.

    The training `seed` does not move the split, so runs that differ only in seed share their test set.
    """
    seed = config.split_seed
    splits = load_data(config.data, config.task, seed=seed, text_column=config.text_column,
                       label_column=config.label_column)
    if config.max_train_samples:
        splits.train = splits.train.select(config.max_train_samples, seed=seed)
    if config.max_eval_samples:
        splits.validation = splits.validation.select(config.max_eval_samples, seed=seed)
        splits.test = splits.test.select(config.max_eval_samples, seed=seed)
    return splits


def train(config: RunConfig, resume: bool = False, optimizer=None, hooks=()) -> dict:
    """Train, evaluate on the test split, write the run's files; returns the results.

    `optimizer`: a torch optimizer, or a function model → optimizer (called after the adapter is injected).
    """
    args = config.training
    begun = time.perf_counter()
    out = Path(args.output_dir)
    found = checkpoint.checkpoints(out / "checkpoints")
    if not resume and found:
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another output_dir")
    if resume and not found:
        raise ConfigError(f"--resume: {out} holds no checkpoint to continue from")
    splits = load_splits(config)
    model, tokenizer = load_model(config.model, config.task, num_labels=splits.train.num_labels, seed=args.seed,
                                  texts=_texts(splits.train))
    name_labels(model, getattr(splits.train, "label_names", ()))  # saved with the adapter (`/v1/classify` names them)
    base_dir = _base_path(config)
    base = copy.deepcopy(model) if config.model == "tiny-llama" else None  # the base alone, saved once inject works
    model = place(model, config)
    full = config.full_finetune
    if full:
        full_ft.prepare(model, config, show=Processes.from_env().is_main)
    task = make_task(config.task, tokenizer, args.max_length, splits.train.num_labels,
                     getattr(splits.train, "choices", ()))
    baselines = base_model_results(model, task, splits, config)
    adapter = dataclasses.replace(config.adapter, task_type=config.adapter.task_type or PEFT_TASK_TYPES[config.task],
                                  base_model_name_or_path=base_dir)
    torch.manual_seed(args.seed)  # the adapter's initial A (and head copy) follow the run's seed
    if not full:
        inject(model, adapter, "default")
    if base is not None and Processes.from_env().is_main:
        save_base(base, tokenizer, base_dir)
    del base
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def make_trainer():
        return Trainer(model, task, args, splits.train, splits.validation,
                       optimizer=optimizer(model) if callable(optimizer) else optimizer, hooks=hooks)
    trainer = make_trainer()
    schedule = {"learning_rate": args.learning_rate, "total_steps": trainer.total_steps,
                "warmup_steps": trainer.warmup_steps}
    inits = [] if full else [get_variant(adapter.variant).data_init(adapter, schedule)]
    if config.init and not full and config.init not in [i[0] for i in inits if i]:  # (a variant's init runs once)
        inits.append((config.init, config.init_args))
    inits = [i for i in inits if i]
    for method, options in inits:  # also on resume: frozen tensors an init sets are not in checkpoints (inits
        initialize(model, method, dataloader=init_batches(config, task, splits.train), loss_fn=task.loss,
                   progress=not args.disable_tqdm, **options)  # are deterministic)
    if inits:  # an init may replace parameters (EVA re-creates the adapter at new ranks): optimize the new ones
        trainer = make_trainer()
    main = trainer.procs.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.yaml").write_text(yaml.safe_dump(saved_settings(config), sort_keys=False))
    reset_peak_memory()
    started = time.perf_counter()
    history = trainer.train(resume=resume)
    seconds = time.perf_counter() - started
    steps = [r for r in history if "seconds" in r]
    trainable, total = count_parameters(model)
    results = {"model": config.model, "data": config.data, "task": config.task,
               "variant": FULL if full else adapter.variant, "r": None if full else adapter.r,
               "learning_rate": args.learning_rate, "seed": args.seed, "steps": trainer.step,
               "trainable_parameters": trainable, "total_parameters": total, "train_seconds": round(seconds, 2),
               "seconds_per_step": round(sum(r["seconds"] for r in steps) / max(1, len(steps)), 4),
               "peak_memory_mb": round(peak_memory_bytes() / 2**20, 1),
               "dtype": str(base_dtype(args.bf16, args.fp16)).removeprefix("torch."), "device": str(device_of(model)),
               **validation_metrics(trainer, splits.validation)}
    began_test = time.perf_counter()
    results.update(final_test(trainer, splits.test), final_test_seconds=round(time.perf_counter() - began_test, 1),
                   **baselines)
    if config.eval_ranks and not full:
        results.update(rank_results(trainer, splits.test, config.eval_ranks, task.main_metric))
    warnings = report_warnings(results, ("validation", "test"), show=main)
    if warnings:
        results["warnings"] = warnings
    results["wall_seconds"] = round(time.perf_counter() - begun, 1)  # data, model, baselines, training, tests
    if full:
        results.update(weights=FULL_DIR, base_model=base_dir)
        state = full_tensors(model.state_dict()) if is_sharded(model) else None  # every rank: FSDP gathers
    else:
        tensors = full_tensors(adapter_parameters(model, "default"))  # every rank: FSDP gathers the shards
    if main:
        if full:
            full_ft.save(model, tokenizer, out / FULL_DIR, state)
        else:
            write_folder(out / ADAPTER_DIR, get_config(model, "default"), tensors, id2label=labels(model))
        (out / "results.json").write_text(json.dumps(results, indent=1))
        from .plots import plot_run
        plot_run(trainer.history, out / "training_curves.png", task.main_metric)
    return results


def name_labels(model, names) -> None:
    """Give a classifier's config the data's class names (id2label / label2id)."""
    if names and hasattr(getattr(model, "config", None), "id2label"):
        model.config.id2label = dict(enumerate(names))
        model.config.label2id = {n: i for i, n in enumerate(names)}


def place(model, config: RunConfig):
    """The base on the run's device, in its dtype (`bf16` / `fp16`; fp32 to fully fine-tune, which autocasts
    instead), stored quantized when `quantize` is set."""
    args = config.training
    model = model.to(resolve_device(args.device),
                     torch.float32 if config.full_finetune else base_dtype(args.bf16, args.fp16))
    if config.quantize:
        from ..quantize import quantize_base

        quantize_base(model, config.quantize, compute_dtype=base_dtype(args.bf16, args.fp16))
    if config.task in GENERATIVE:
        model.config.use_cache = False  # training and scoring run whole sequences; `generate` turns it on
    return model


def validation_metrics(trainer: Trainer, validation) -> dict:
    """The trained weights on the validation split: the trainer's own evaluation of them when it made one."""
    if trainer.evaluated and trainer.eval_data is validation:
        metrics = {"validation_" + k.removeprefix("eval_"): v for k, v in trainer.evaluated.items()}
    else:
        metrics = trainer.evaluate(validation, "validation")
    return {"validation_examples": len(validation), **metrics}


def final_test(trainer: Trainer, test) -> dict:
    """Test metrics of the trained model; instruct tasks with a label set also generate replies."""
    task = trainer.task
    with generating(task):
        return {"test_examples": len(test), **trainer.evaluate(test, "test")}


def report_warnings(results: dict, prefixes: tuple[str, ...], show: bool = True) -> list[str]:
    """Warnings about the `<prefix>_*` metrics in `results` (a model that predicts a single class), each printed
    on stderr when `show`."""
    found = [w for w in (single_class_warning(results, p) for p in prefixes) if w]
    for warning in found if show else ():
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    return found


def base_model_results(model, task, splits, config: RunConfig) -> dict:
    """The base model alone on the test split, scored as the trained model will be: zero-shot for the instruct
    task, and with `baselines` also k-shot (k = `shots` examples from the training split, balanced over labels).
    Kept in `<output_dir>/baselines.json` (with `baseline_seconds`), which a resumed run reads instead of scoring
    again."""
    if config.task != "instruct" or not task.choices:
        return {}
    args = config.training
    saved = Path(args.output_dir) / "baselines.json"
    if saved.exists():
        results = json.loads(saved.read_text())
        has_shots = any(k.endswith("_shot_test_accuracy") and k[0].isdigit() for k in results)
        if has_shots or not config.baselines:
            return results
    results, began = {}, time.perf_counter()
    score = lambda data, prefix: evaluate_model(  # noqa: E731
        model, task, data, args.per_device_eval_batch_size, prefix, progress=not args.disable_tqdm)
    with generating(task):
        results.update(score(splits.test, "zero_shot_test"))
        if config.baselines:
            shots = pick_shots(splits.train, config.shots, args.seed)
            with whole_prompts(task, model):  # the shots lengthen each prompt past the training max_length
                results.update(score(splits.test.with_shots(shots), f"{config.shots}_shot_test"))
    results["baseline_seconds"] = round(time.perf_counter() - began, 1)
    if Processes.from_env().is_main:
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(results, indent=1))
    return results


def whole_prompts(task, model):
    """Inside the block the task cuts no prompt short of the model's context (`max_position_embeddings`)."""
    return _task_settings(task, max_length=max(task.max_length, getattr(model.config, "max_position_embeddings", 0)))


def pick_shots(train, k: int, seed: int):
    """k training examples, as balanced over the labels as k allows, in a seeded order."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    by_label = {}
    for j in order:
        by_label.setdefault(train.labels[j], []).append(j)
    picked = [j for group in zip(*by_label.values()) for j in group][:k]
    return train.subset(picked)


def generating(task):
    """Let an instruct task also generate replies inside the block."""
    return _task_settings(task, generate=True)


@contextlib.contextmanager
def _task_settings(task, **values):
    """Set the task's attributes inside the block (those it has), then put them back."""
    saved = {k: getattr(task, k) for k in values if hasattr(task, k)}
    for k in saved:
        setattr(task, k, values[k])
    try:
        yield task
    finally:
        for k, v in saved.items():
            setattr(task, k, v)


def rank_results(trainer: Trainer, data, ranks: list[int], metric: str) -> dict:
    """`test_<metric>@r<k>` for each rank k (the adapter run at rank k, see `lorakit.rank.truncate`) and AURAC."""
    from ..analysis.aurac import aurac
    from ..rank.truncate import evaluate_at_ranks

    key = f"test_{metric}"
    curve = evaluate_at_ranks(trainer.model, ranks, lambda _: trainer.evaluate(data, "test")[key])
    return {**{f"{key}@r{k}": v for k, v in curve.items()}, **aurac(curve)}


def init_batches(config: RunConfig, task, dataset) -> list:
    """The first `init_batches` training batches (seeded order) for a data-driven initialization."""
    args = config.training
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed)).tolist()
    size = args.per_device_train_batch_size
    return [task.collate([dataset[j] for j in order[i:i + size]])
            for i in range(0, min(len(order), size * config.init_batches), size)]


def saved_settings(config: RunConfig) -> dict:
    """The flat settings written to `run_config.yaml`: local data and model paths made absolute, so
    `lorakit eval <run>` finds them from any working directory."""
    flat = config.to_flat()
    for key in ("data", "model"):
        if key == "model" and flat[key] in MODELS or str(flat[key]).startswith("vader:"):
            continue
        if os.path.exists(flat[key]):
            flat[key] = os.path.abspath(flat[key])
    return flat


def adapter_folder(path: str | Path) -> Path:
    """The adapter folder `path` names: itself, or the `adapter/` inside a run's output_dir."""
    path = Path(path)
    if (path / ADAPTER_DIR).is_dir() and not (path / CONFIG_NAME).exists():
        return path / ADAPTER_DIR
    return path


def evaluate(adapter_dir: str | Path, config: RunConfig, split: str = "test") -> dict:
    """Metrics of a saved adapter (a run's output_dir or its `adapter/` folder) on a split of `config.data`, after
    what was scored: `data`, `split` and `<split>_examples`. A model that predicts one class is warned about.

    The base model is the adapter's `base_model_name_or_path` when that is a local directory, else `config.model`.
    A full fine-tuning run (or its `full_model/` folder) is evaluated as its saved model.
    """
    full = full_ft.full_folder(adapter_dir)
    if full is None:
        adapter_dir = adapter_folder(adapter_dir)
        spec = adapter_base(adapter_dir, config)
    else:
        spec = str(full)
    splits = load_splits(config)
    data = getattr(splits, split)
    model, tokenizer = load_model(spec, config.task, num_labels=splits.train.num_labels, seed=config.training.seed,
                                  texts=_texts(splits.train))
    model = place(model, config)
    if full is None:
        load_adapter(model, adapter_dir, "default")
    task = make_task(config.task, tokenizer, config.training.max_length, splits.train.num_labels,
                     getattr(splits.train, "choices", ()))
    with generating(task):
        metrics = evaluate_model(model, task, data, config.training.per_device_eval_batch_size, split)
    report_warnings(metrics, (split,))
    return {"data": config.data, "split": split, f"{split}_examples": len(data), **metrics}


def adapter_base(adapter_dir: str | Path, config: RunConfig) -> str:
    """The base model to load a saved adapter on: its `base_model_name_or_path` when that is a local directory,
    else `config.model`."""
    base = read_adapter(adapter_dir)[0].base_model_name_or_path
    return base if base and os.path.isdir(base) else config.model


def saved_paths(output_dir: str | Path) -> list[Path]:
    """What a finished run wrote that one opens next: the adapter (or full model) folder, results.json,
    metrics.jsonl, the plot."""
    out = Path(output_dir)
    names = (ADAPTER_DIR, FULL_DIR, "results.json", "metrics.jsonl", "training_curves.png")
    return [out / n for n in names if (out / n).exists()]


# ---- memory --------------------------------------------------------------------------------------
def reset_peak_memory() -> None:
    """Start a new peak: CUDA's allocator counter, or Linux VmHWM (clear_refs 5)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_bytes() -> int:
    """Peak memory since `reset_peak_memory`: CUDA allocated bytes, else the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _texts(dataset) -> list[str]:
    if hasattr(dataset, "texts") and callable(dataset.texts):
        return dataset.texts()
    if hasattr(dataset, "prompts"):
        return [p + c for p, c in zip(dataset.prompts, dataset.completions)]
    return list(dataset.texts)


def _base_path(config: RunConfig) -> str:
    if config.model == "minilm":
        return str(minilm_dir())
    if config.model == "tiny-llama":
        return os.path.abspath(os.path.join(config.training.output_dir, "base_model"))
    if config.model == "smollm2":
        return "smollm2"  # a lorakit model name (lorakit.from_pretrained and `lorakit serve` resolve it)
    return os.path.abspath(config.model)
