"""`lorakit compare --analyse`: LoRA beside full fine-tuning in one command, with intruder dimensions, calibration
(classification) and forgetting on held-out text (causal LMs) per run, cached in `effects.json`."""
import importlib
import json
import math
import os

import pytest
import torch
from transformers import AutoTokenizer

from lorakit.analysis.calibration import brier, ece
from lorakit.analysis.run_effects import block_linear_paths
from lorakit.cli import main
from lorakit.claims.predictions import classify
from lorakit.train import RunConfig, load_full, train
from lorakit.train.args import read_yaml
from lorakit.train.full import load_base
from lorakit.train.run import load_splits
from lorakit.train.tasks import make_task
from test_causal_lm import write_copy_task
from test_cli import write_sentiment

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread_module")
compare_module = importlib.import_module("lorakit.train.compare")


@pytest.fixture
def in_process(monkeypatch):
    monkeypatch.setattr(compare_module, "run_one", lambda config, resume=False: train(config, resume))
    monkeypatch.setattr(compare_module, "in_subprocess", lambda fn, *args: fn(*args))


def effects(run):
    return json.loads((run / "effects.json").read_text())


def naive_intruders(w0, w1, k=10, epsilon=0.5):
    u0 = torch.linalg.svd(w0.double())[0]
    u = torch.linalg.svd(w1.double())[0][:, :k]
    return int(((u.T @ u0).abs().max(1).values < epsilon).sum())


def test_analyse_sets_lora_beside_full_fine_tuning_on_a_classifier(tmp_path, in_process, monkeypatch):
    data, out = write_sentiment(tmp_path / "data.jsonl", n=48), tmp_path / "cmp"
    argv = ["compare", "--variants", "lora,full", "--lrs", "5e-2", "--seeds", "1", "--model", "tiny-llama",
            "--data", data, "--max-steps", "6", "--per-device-train-batch-size", "8", "--r", "4",
            "--target-modules", "all-linear", "--disable-tqdm", "--analyse", "--output-dir", str(out)]
    assert main(argv) == 0
    lora_run, full_run = out / "runs" / "lora-lr0.05-seed0", out / "runs" / "full-lr0.05-seed0"
    lora, full = effects(lora_run), effects(full_run)

    # full fine-tuning: every linear layer of the 2 blocks, counted as a direct SVD comparison counts them
    base, tuned = load_base(full_run), load_full(full_run)
    paths = block_linear_paths(base)
    assert len(paths) == 2 * 7 == full["layers"]
    modules0, modules1 = dict(base.named_modules()), dict(tuned.named_modules())
    counts = [naive_intruders(modules0[p].weight, modules1[p].weight) for p in paths]
    assert full["intruders"] == sum(counts) and full["intruder_layers"] == sum(c > 0 for c in counts)
    assert any(not torch.equal(modules0[p].weight, modules1[p].weight) for p in paths)  # it did train

    # LoRA: its adapted layers (all-linear: the same 14); calibration of the saved full model, recomputed here
    assert lora["layers"] == 14 and lora["intruders"] >= 0
    splits = load_splits(RunConfig.from_flat(read_yaml(full_run / "run_config.yaml")))
    task = make_task("classification", AutoTokenizer.from_pretrained(str(full_run / "full_model")), 64,
                     splits.train.num_labels)
    rows = classify(tuned, task, splits.test)
    probs = torch.tensor([r["probabilities"] for r in rows], dtype=torch.float64)
    labels = torch.tensor([r["label"] for r in rows])
    assert full["ece"] == pytest.approx(ece(probs, labels), abs=1e-6)
    assert full["brier"] == pytest.approx(brier(probs, labels), abs=1e-6)
    assert 0 <= lora["ece"] <= 1 and "perplexity" not in lora

    table = (out / "results.md").read_text()
    assert "| variant | learning rate | intruders | layers with intruders | ECE | MCE | ACE | Brier |" in table
    assert f"of {lora['layers']} |" in table and f"of {full['layers']} |" in table

    def fail(*args):
        raise AssertionError("a run's effects were measured again")

    monkeypatch.setattr(compare_module, "in_subprocess", fail)
    assert main(argv) == 0  # a rerun reads every effects.json


def test_analyse_measures_forgetting_of_a_causal_lm_on_given_text(tmp_path, in_process):
    data, out = write_copy_task(tmp_path / "copy.jsonl", n=64), tmp_path / "cmp"
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("the moon and the sun were red\nover the tree\n\nfish swim, birds fly.\n\n\n"
                        "a green cat sat by the blue dog\n")
    assert main(["compare", "--task", "causal-lm", "--variants", "lora,full", "--lrs", "1e-2", "--seeds", "1",
                 "--model", "tiny-llama", "--data", data, "--max-steps", "8", "--per-device-train-batch-size",
                 "16", "--r", "4", "--disable-tqdm", "--analyse", "--held-out-text", str(held_out),
                 "--output-dir", str(out)]) == 0
    lora, full = effects(out / "runs" / "lora-lr0.01-seed0"), effects(out / "runs" / "full-lr0.01-seed0")
    # the same base scored on the same text: by the adapter switched off, and by the full run's starting model
    assert lora["base_perplexity"] == pytest.approx(full["base_perplexity"], rel=1e-5)
    for e in (lora, full):
        assert e["kl"] > 0 and e["perplexity"] != e["base_perplexity"] and math.isfinite(e["perplexity"])
        assert "ece" not in e
    table = (out / "results.md").read_text()
    assert "perplexity (held-out) | KL(base ‖ tuned) |" in table


def test_held_out_text_needs_analyse_and_text(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    argv = ["compare", "--model", "tiny-llama", "--data", "x.jsonl", "--output-dir", str(tmp_path / "o"),
            "--held-out-text", str(empty)]
    assert main(argv) == 2 and "add --analyse" in capsys.readouterr().err
    assert main(argv + ["--analyse"]) == 2 and "holds no text" in capsys.readouterr().err
    assert main(argv[:-1] + [str(tmp_path / "missing.txt"), "--analyse"]) == 2
    assert "cannot read the held-out text" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
