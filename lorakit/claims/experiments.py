"""Experiments the claims command runs itself (MiniLM on VADER movies, CPU scale), each producing a `Measurement`:

- `ArmComparison`: a treatment arm against a baseline arm, seeds paired, on one metric (`METRICS`);
- `SqueezeComparison`: a high-rank LoRA squeezed to a low rank (LoRA-Squeeze) against LoRA trained at that rank;
- `LoramComparison`: LoRAM's recovered full model against the LoRA on the pruned model it was trained on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import DataError
from .predictions import PREDICTIONS, accuracy, read_predictions
from .records import Context, Measurement
from .runs import TOPK_DIR, Arm, Run, check_predictions, done, ensure_run, in_subprocess, stored_numbers, train_losses
from .stats import Condition, ece


@dataclass(frozen=True)
class Metric:
    """`replicate(run)`: the metric of one run; `examples(run)`: its per-example values (None: per run only)."""

    name: str
    replicate: Callable[[Run], float]
    examples: Optional[Callable[[Run], list]] = None
    statistic: str = "mean"


def _hits(run: Run) -> list[float]:
    return [float(r["predicted"] == r["label"]) for r in run.predictions]


def _confidence_hits(run: Run) -> list[list[float]]:
    return [[max(r["probabilities"]), float(r["predicted"] == r["label"])] for r in run.predictions]


def _rank_weights(ranks) -> dict[int, float]:
    """AURAC v1 (trapezoid over rank / rank range) is linear in the accuracies: its weight on each rank."""
    from ..analysis.aurac import aurac_v1

    return {k: aurac_v1({j: float(j == k) for j in ranks}) for k in ranks}


def _aurac_examples(run: Run) -> list[float]:
    ranks = sorted(int(k) for k in run.predictions[0].get("predicted_at_rank", {}))
    if not ranks:
        raise DataError(f"{run.folder}: the run was not scored at lower ranks")
    w = _rank_weights(ranks)
    return [sum(w[k] * (r["predicted_at_rank"][str(k)] == r["label"]) for k in ranks) for r in run.predictions]


METRICS = {
    "accuracy": Metric("test accuracy", lambda run: accuracy(run.predictions), _hits),
    "aurac": Metric("AURAC v1 over ranks 1, 2, 4, 8 (test accuracy)", lambda run: float(np.mean(_aurac_examples(run))),
                    _aurac_examples),
    "ece": Metric("test ECE (10 bins)", lambda run: ece(*np.array(_confidence_hits(run)).T), _confidence_hits, "ece"),
    "train_loss": Metric("mean training loss over the run", lambda run: float(np.mean(train_losses(run.folder)))),
}


def _describe(arm_label: str, runs: list[Run], metric: Metric) -> str:
    per_seed = ", ".join(f"{metric.replicate(r):.4f}" for r in runs)
    acc = ", ".join(f"{r.results['test_accuracy']:.3f}" for r in runs)
    first = runs[0].results
    return (f"{arm_label}: {metric.name} per seed {per_seed}; test accuracy {acc}; trainable parameters "
            f"{first.get('trainable_parameters', 0):,} (incl. the head); {first.get('seconds_per_step', 0):.3f} s/step"
            + collapsed(runs))


def collapsed(runs: list[Run]) -> str:
    """A warning for the runs that predict one class for every test example (their accuracy is that class's
    share, and their comparison says little about the method), else ''."""
    from ..train.tasks import single_class_warning

    n = sum(single_class_warning(r.results, "test") is not None for r in runs)
    return (f" — **{n} of {len(runs)} seeds predict a single class for every test example** (accuracy = that "
            f"class's share: the run collapsed)") if n else ""


class ArmComparison:
    """`treatment` vs `baseline` (arms with the same seeds), on `metric` (a key of `METRICS`); `conditions`:
    functions (treatment runs, baseline runs) → `Condition`."""

    external, command = False, "python -m lorakit.claims"

    def __init__(self, treatment: Arm, baseline: Arm, metric: str, conditions=()):
        if treatment.seeds != baseline.seeds:
            raise DataError(f"arms {treatment.name} and {baseline.name} must share their seeds to be paired")
        self.treatment, self.baseline, self.metric, self.conditions = treatment, baseline, METRICS[metric], conditions

    def units(self) -> list[tuple[str, float]]:
        return self.treatment.units() + self.baseline.units()

    def measure(self, ctx: Context) -> Measurement:
        runs = {arm: [ensure_run(a, s, ctx.runs_dir) for s in a.seeds]
                for arm, a in (("treatment", self.treatment), ("baseline", self.baseline))}
        m = self.metric
        return Measurement(
            treatment=self.treatment.label, baseline=self.baseline.label,
            replicates={arm: [m.replicate(r) for r in rs] for arm, rs in runs.items()},
            replicate_names=[f"seed {s}" for s in self.treatment.seeds],
            examples=None if m.examples is None else {arm: [m.examples(r) for r in rs] for arm, rs in runs.items()},
            statistic=m.statistic,
            conditions=[c(runs["treatment"], runs["baseline"]) for c in self.conditions],
            details=[_describe(self.treatment.label, runs["treatment"], m),
                     _describe(self.baseline.label, runs["baseline"], m)],
            sources=[str(r.folder) for rs in runs.values() for r in rs])


def adapter_numbers(run: Run, topk: bool = False) -> int:
    """Numbers the adapter stores without the head: VB-LoRA's compact top-k file with `topk`, else its trainable
    parameters (results.json, minus the head's tensors in the adapter file)."""
    folder = run.folder / (TOPK_DIR if topk else "adapter")
    if topk:
        return stored_numbers(folder)
    head = _head_numbers(folder)
    return run.results["trainable_parameters"] - head


def _head_numbers(folder: Path) -> int:
    from safetensors import safe_open

    heads = set(json.loads((folder / "adapter_config.json").read_text()).get("modules_to_save") or ())
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys() if heads & set(k.split(".")))


def fewer_parameters(limit: float, topk: bool = False, what: str = "trainable adapter parameters"):
    """Condition: the treatment's adapter numbers are at most `limit` × the baseline's (head excluded)."""
    def check(treatment: list[Run], baseline: list[Run]) -> Condition:
        t, b = adapter_numbers(treatment[0], topk), adapter_numbers(baseline[0])
        ratio = t / b
        return Condition(f"{what} {t:,} = {ratio:.1%} of the baseline's {b:,} (claimed ≤ {limit:.0%})",
                         ratio <= limit, {"treatment": t, "baseline": b})
    return check


def gates_kept(limit: float):
    """Condition (SoRA): the share of rank gates that are not exactly zero after training, mean over seeds."""
    def check(treatment: list[Run], baseline: list[Run]) -> Condition:
        from safetensors import safe_open

        kept = []
        for run in treatment:
            with safe_open(str(run.folder / "adapter" / "adapter_model.safetensors"), "pt") as f:
                gates = [f.get_tensor(k) for k in f.keys() if "lora_gate" in k]
            if not gates:
                raise DataError(f"{run.folder}: no lora_gate tensors in the adapter (not a SoRA run)")
            kept.append(sum(int((g != 0).sum()) for g in gates) / sum(g.numel() for g in gates))
        share = float(np.mean(kept))
        return Condition(f"ranks kept (non-zero gates) {share:.1%} of r, mean over seeds (claimed ≤ {limit:.0%})",
                         share <= limit, {"kept": kept})
    return check


class SqueezeComparison:
    """LoRA-Squeeze's post-squeeze: `source` (a high-rank LoRA arm) squeezed to `rank` (exact QR route) and scored
    as is, against `baseline` (LoRA trained at that rank), per seed."""

    external, command = False, "python -m lorakit.claims"

    def __init__(self, source: Arm, baseline: Arm, rank: int, minutes: float = 0.4):
        self.source, self.baseline, self.rank, self.minutes = source, baseline, rank, minutes

    def folder(self, seed: int, runs_dir) -> Path:
        return Path(runs_dir) / "runs" / f"squeeze-{self.source.name}-r{self.rank}-seed{seed}"

    def units(self) -> list[tuple[str, float]]:
        return (self.source.units() + self.baseline.units()
                + [(f"squeeze {self.source.name}-seed{s}", self.minutes) for s in self.source.seeds])

    def squeezed(self, seed: int, runs_dir) -> Run:
        src = ensure_run(self.source, seed, runs_dir)
        folder = self.folder(seed, runs_dir)
        if not done(folder):
            in_subprocess(_squeeze_worker, self.source.flat(seed, runs_dir), str(src.folder), str(folder), self.rank)
        run = Run(json.loads((folder / "results.json").read_text()), read_predictions(folder / PREDICTIONS), folder)
        check_predictions(run.predictions, run.results, folder)
        return run

    def measure(self, ctx: Context) -> Measurement:
        m = METRICS["accuracy"]
        treat = [self.squeezed(s, ctx.runs_dir) for s in self.source.seeds]
        base = [ensure_run(self.baseline, s, ctx.runs_dir) for s in self.baseline.seeds]
        src = [ensure_run(self.source, s, ctx.runs_dir) for s in self.source.seeds]
        label = f"{self.source.label}, squeezed to r {self.rank}"
        return Measurement(
            treatment=label, baseline=self.baseline.label,
            replicates={"treatment": [m.replicate(r) for r in treat], "baseline": [m.replicate(r) for r in base]},
            replicate_names=[f"seed {s}" for s in self.source.seeds],
            examples={"treatment": [m.examples(r) for r in treat], "baseline": [m.examples(r) for r in base]},
            details=[f"{label}: test accuracy per seed " + ", ".join(f"{m.replicate(r):.4f}" for r in treat),
                     f"{self.source.label} before squeezing: " + ", ".join(f"{m.replicate(r):.4f}" for r in src)
                     + collapsed(src),
                     _describe(self.baseline.label, base, m)],
            sources=[str(r.folder) for r in treat + base])


def _squeeze_worker(flat: dict, source: str, folder: str, rank: int) -> None:
    from ..rank import squeeze_folder
    from ..train.args import RunConfig
    from .predictions import predict_folder, write_predictions

    out = Path(folder)
    squeeze_folder(Path(source) / "adapter", out / "adapter", target_rank=rank)
    config = RunConfig.from_flat({**flat, "output_dir": folder})
    rows = predict_folder(out / "adapter", config)
    write_predictions(out / PREDICTIONS, rows)
    (out / "results.json").write_text(json.dumps({"test_accuracy": accuracy(rows), "test_examples": len(rows),
                                                  "squeezed_from": source, "rank": rank}, indent=1))


class LoramComparison:
    """LoRAM: prune a copy of MiniLM (50 % of heads and MLP channels, magnitude), align it on other VADER domains,
    train the LoRA on it, recover the LoRA to the full model and merge; per seed the full model's test accuracy
    (treatment) against the pruned model with its own LoRA (baseline). Replicates only (no per-example output)."""

    external, command = False, "python -m lorakit.claims"
    ALIGN = "vader:tweets,vader:amazon,vader:nyt"

    def __init__(self, arm: Arm, sparsity: float = 0.5, align_samples: int = 4000, align_epochs: int = 1):
        self.arm, self.sparsity, self.samples, self.epochs = arm, sparsity, align_samples, align_epochs

    def units(self) -> list[tuple[str, float]]:
        return self.arm.units()

    def measure(self, ctx: Context) -> Measurement:
        rows = []
        for s in self.arm.seeds:
            folder = self.arm.run_dir(s, ctx.runs_dir)
            if not (folder / "results.json").is_file():
                results = in_subprocess(_loram_worker, self.arm.flat(s, ctx.runs_dir), self.sparsity, self.ALIGN,
                                        self.samples, self.epochs)
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "results.json").write_text(json.dumps(results, indent=1, default=str))
            rows.append(json.loads((folder / "results.json").read_text()))
        treat, base = [r["test_accuracy"] for r in rows], [r["pruned_test_accuracy"] for r in rows]
        return Measurement(
            treatment="recovered to the full model, merged", baseline="the pruned model with its LoRA",
            replicates={"treatment": treat, "baseline": base},
            replicate_names=[f"seed {s}" for s in self.arm.seeds],
            details=[f"full model after recovery: {', '.join(f'{x:.4f}' for x in treat)}; pruned model: "
                     f"{', '.join(f'{x:.4f}' for x in base)}; parameters {rows[0].get('parameters_full'):,} → "
                     f"{rows[0].get('parameters_pruned'):,}; alignment loss {rows[0].get('align_loss_first', 0):.3f} → "
                     f"{rows[0].get('align_loss_last', 0):.3f} (seed {self.arm.seeds[0]})"],
            sources=[str(self.arm.run_dir(s, ctx.runs_dir) / "results.json") for s in self.arm.seeds])


def _loram_worker(flat: dict, sparsity: float, align: str, samples: int, epochs: int) -> dict:
    from ..rank.loram import align_texts, loram_experiment
    from ..train.args import RunConfig

    config = RunConfig.from_flat(flat)
    texts = align_texts(align, samples, config.training.seed)
    return loram_experiment(config, sparsity, baseline=False, align=texts, align_epochs=epochs)
