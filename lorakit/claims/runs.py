"""Training runs behind the claims: an `Arm` is one MiniLM / VADER movies training setting; `ensure_run(arm, seed)`
trains it once into `<runs_dir>/runs/<arm>-seed<seed>/` (a `lorakit train` run folder plus `test_predictions.jsonl`)
and reuses that folder afterwards, so arms shared between claims train once. A run stopped part-way resumes from its
checkpoint. Each run trains in a fresh spawned process, as `lorakit compare` does. Lower ranks (`Arm.ranks`) are
scored from the predictions only (no `eval_ranks` in the run: the same numbers, one evaluation pass fewer).

The shared settings (`COMMON`) are those of `lorakit compare` in docs/variant_comparison.md, with 1,000 validation and
test sentences instead of 500 (a tighter bootstrap; about 8 s more per run)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TrainingError
from ..train.compare import in_subprocess
from .predictions import PREDICTIONS, accuracy, classify_at_ranks, predict_folder, read_predictions, \
    write_predictions

COMMON = {"model": "minilm", "data": "vader:movies", "task": "classification", "max_train_samples": 1000,
          "max_eval_samples": 1000, "num_train_epochs": 1, "per_device_train_batch_size": 16, "max_length": 64,
          "target_modules": "all-linear", "disable_tqdm": True}
SEEDS = (0, 1, 2)
TOPK_DIR = "adapter_topk"


@dataclass(frozen=True)
class Arm:
    """A training setting: `settings` (flat `RunConfig` keys) on top of `COMMON`; `minutes`: the cost of one seed
    from nothing on 2 cores; `ranks`: also predict at these ranks; `topk`: also write VB-LoRA's compact file."""

    name: str
    label: str
    settings: tuple
    minutes: float
    seeds: tuple = SEEDS
    ranks: tuple = ()
    topk: bool = False

    @classmethod
    def of(cls, name: str, label: str, minutes: float, ranks=(), topk: bool = False, seeds=SEEDS,
           **settings) -> "Arm":
        return cls(name, label, tuple(sorted(settings.items())), minutes, tuple(seeds), tuple(ranks), topk)

    def flat(self, seed: int, runs_dir: str | Path) -> dict[str, Any]:
        return {**COMMON, **dict(self.settings), "seed": seed, "output_dir": str(self.run_dir(seed, runs_dir))}

    def run_dir(self, seed: int, runs_dir: str | Path) -> Path:
        return Path(runs_dir) / "runs" / f"{self.name}-seed{seed}"

    def units(self) -> list[tuple[str, float]]:
        return [(f"run {self.name}-seed{s}", self.minutes) for s in self.seeds]


@dataclass
class Run:
    results: dict
    predictions: list[dict]
    folder: Path


def done(folder: Path) -> bool:
    return (folder / "results.json").is_file() and (folder / PREDICTIONS).is_file()


def ensure_run(arm: Arm, seed: int, runs_dir: str | Path) -> Run:
    """The finished run of `arm` at `seed`: read when its folder holds results and predictions, else trained (or
    resumed, or only predicted when the results are there) in a spawned process."""
    from ..train import checkpoint
    from ..train.args import RunConfig
    from ..train.compare import _check_reusable

    flat = arm.flat(seed, runs_dir)
    folder = Path(flat["output_dir"])
    config = RunConfig.from_flat(flat)
    _check_reusable(folder, config)  # a folder trained with other settings is refused, never mixed in
    if not done(folder):
        resume = bool(checkpoint.checkpoints(folder / "checkpoints"))
        in_subprocess(_train_worker, flat, resume, list(arm.ranks), arm.topk)
    results = json.loads((folder / "results.json").read_text())
    rows = read_predictions(folder / PREDICTIONS)
    check_predictions(rows, results, folder)
    return Run(results, rows, folder)


def check_predictions(rows: list[dict], results: dict, folder: Path) -> None:
    """The saved predictions must give the run's own test accuracy (one example of slack for float ties)."""
    want = results.get("test_accuracy")
    if want is None or len(rows) != results.get("test_examples", len(rows)):
        raise TrainingError(f"{folder}: results.json and {PREDICTIONS} do not describe the same test split")
    if abs(accuracy(rows) - want) > 1.0 / len(rows) + 1e-12:
        raise TrainingError(f"{folder}: the predictions score {accuracy(rows):.4f}, results.json says {want:.4f}; "
                            "delete the folder to train it again")


class _Keep:
    """A trainer hook that keeps the trainer, to predict with its final model after `train` returns."""

    trainer = None

    def after_training(self, trainer) -> None:
        self.trainer = trainer


def _train_worker(flat: dict, resume: bool, ranks: list, topk: bool) -> None:
    """Train (unless results.json exists), then write the test predictions (and VB-LoRA's compact file)."""
    from ..train.args import RunConfig
    from ..train.run import load_splits, train

    config = RunConfig.from_flat(flat)
    folder = Path(config.training.output_dir)
    if (folder / "results.json").is_file():  # trained, stopped before the predictions: predict from the files
        write_predictions(folder / PREDICTIONS, predict_folder(folder / "adapter", config))
        return
    keep = _Keep()
    train(config, resume=resume, hooks=[keep])
    model, task = keep.trainer.model, keep.trainer.task
    if topk:
        from ..variants.vblora import save_topk

        save_topk(model, folder / TOPK_DIR)
    rows = classify_at_ranks(model, task, load_splits(config).test, ranks, config.training.per_device_eval_batch_size)
    write_predictions(folder / PREDICTIONS, rows)


def train_losses(folder: Path) -> list[float]:
    """The training loss of every logged step of a run (metrics.jsonl)."""
    from ..train.trainer import read_metrics

    return [r["loss"] for r in read_metrics(folder / "metrics.jsonl") if "loss" in r]


def stored_numbers(adapter_dir: Path) -> int:
    """How many numbers the adapter file stores, without the trained copies of `modules_to_save` (the classifier
    head, which every arm trains alike)."""
    from safetensors import safe_open

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    heads = set(config.get("modules_to_save") or ())
    total = 0
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            if heads & set(key.split(".")):
                continue
            n = 1
            for size in f.get_slice(key).get_shape():
                n *= size
            total += n
    return total
