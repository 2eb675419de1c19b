"""The claims runner on tiny MiniLM runs (2 steps, 32 test sentences): a run trains once in a spawned process, writes
predictions that reproduce its test accuracy (also at lower ranks), and is reused afterwards; LoRA-Squeeze and LoRAM
produce their measurements end to end."""
import json
import os

import pytest

from lorakit.claims import runs as runs_module
from lorakit.claims.experiments import ArmComparison, LoramComparison, SqueezeComparison
from lorakit.claims.predictions import PREDICTIONS, accuracy, read_predictions
from lorakit.claims.records import Context
from lorakit.claims.runs import Arm, ensure_run

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TINY = dict(max_train_samples=32, max_eval_samples=32, max_steps=2, per_device_train_batch_size=8, save_steps=0)


def tiny(name, seeds=(0,), **settings):
    return Arm.of(name, name, 0.1, seeds=seeds, **{**TINY, "r": 4, "lora_alpha": 8, "learning_rate": 1e-3,
                                                   **settings})


def test_a_run_trains_once_and_its_predictions_match_its_accuracy(tmp_path, monkeypatch):
    arm = tiny("lora", ranks=(1, 4))
    run = ensure_run(arm, 0, tmp_path)
    rows = read_predictions(run.folder / PREDICTIONS)
    assert len(rows) == run.results["test_examples"] == 32
    assert accuracy(rows) == pytest.approx(run.results["test_accuracy"], abs=1 / 32)
    assert set(rows[0]["predicted_at_rank"]) == {"1", "4"}
    assert accuracy(rows, rank=4) == accuracy(rows)  # rank 4 of a rank-4 adapter is the adapter itself

    def no_training(*args):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(runs_module, "in_subprocess", no_training)
    again = ensure_run(arm, 0, tmp_path)
    assert again.predictions == rows


def test_squeeze_and_comparison_measurements(tmp_path):
    source = tiny("lora-r8", r=8, lora_alpha=16)
    target = tiny("lora-r2", r=2, lora_alpha=4)
    ctx = Context(tmp_path, tmp_path / "bench", progress=False)
    m = SqueezeComparison(source, target, 2).measure(ctx)
    assert len(m.examples["treatment"][0]) == len(m.examples["baseline"][0]) == 32
    squeezed = json.loads((tmp_path / "runs" / "squeeze-lora-r8-r2-seed0" / "results.json").read_text())
    assert squeezed["rank"] == 2 and 0 <= squeezed["test_accuracy"] <= 1
    paired = ArmComparison(source, target, "accuracy").measure(ctx)
    assert paired.replicates["baseline"] == m.replicates["baseline"]  # the r 2 runs were reused


def test_loram_measurement(tmp_path):
    arm = tiny("loram", warmup_ratio=0.0)
    m = LoramComparison(arm, sparsity=0.5, align_samples=16).measure(Context(tmp_path, tmp_path, progress=False))
    assert m.replicate_names == ["seed 0"]
    assert 0 <= m.replicates["treatment"][0] <= 1 and 0 <= m.replicates["baseline"][0] <= 1


def test_collapsed_runs_are_flagged():
    from pathlib import Path

    from lorakit.claims.experiments import collapsed
    from lorakit.claims.runs import Run

    def run(shares):
        results = {"test_accuracy": 0.6, "test_majority_class_rate": 0.6, "test_f1": 0.0,
                   **{f"test_predicted_share_{k}": v for k, v in enumerate(shares)}}
        return Run(results, [], Path("."))

    assert collapsed([run([0.4, 0.6]), run([0.5, 0.5])]) == ""
    flagged = collapsed([run([1.0, 0.0]), run([0.4, 0.6]), run([0.0, 1.0])])
    assert "2 of 3 seeds predict a single class" in flagged
