"""Full fine-tuning as a run mode (`variant: full`): every parameter trains, `full_model/` (safetensors) reloads to
the trained model's logits, `compare` sets it beside LoRA, a killed run resumes to the same weights, bf16 keeps fp32
master weights, adapter settings are ignored with a note, and FSDP gathers the same weights as one process."""
import csv
import importlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli import main
from lorakit.errors import ConfigError, ModelError
from lorakit.models import tiny_llama
from lorakit.train import RunConfig, evaluate, full_deltas, load_full, train
from lorakit.train.args import read_yaml
from lorakit.train.compare import variant_settings
from lorakit.train.full import FULL_DIR, prepare
from test_cli import write_sentiment

os.environ.setdefault("HF_HUB_OFFLINE", "1")
compare_module = importlib.import_module("lorakit.train.compare")  # `lorakit.train.compare` is also the function


def settings(data, out, **kw):
    return {"model": "tiny-llama", "data": data, "variant": "full", "max_steps": 3, "per_device_train_batch_size": 8,
            "learning_rate": 1e-3, "disable_tqdm": True, "output_dir": str(out), **kw}


class Keep:
    """A step hook that keeps the trainer: once `train` returns, its model is the trained in-memory model."""

    def before_training(self, trainer):
        self.trainer = trainer


class Killed(Exception):
    pass


def test_full_run_trains_every_weight_and_saves_a_model_that_reloads(tmp_path):
    data, out, kept = write_sentiment(tmp_path / "data.jsonl", n=48), tmp_path / "run", Keep()
    results = train(RunConfig.from_flat(settings(data, out)), hooks=[kept])
    model = kept.trainer.model
    assert results["variant"] == "full" and results["weights"] == FULL_DIR and results["r"] is None
    assert results["trainable_parameters"] == results["total_parameters"] == sum(p.numel() for p in model.parameters())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    assert not (out / "adapter").exists() and len((out / "metrics.jsonl").read_text().splitlines()) == 3
    saved = {p.name for p in (out / FULL_DIR).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= saved
    assert not [n for n in saved if n.endswith((".bin", ".pt", ".pth", ".pkl"))]  # never a pickle

    # every Linear of the base moved (W_trained − W_base against the base_model/ the run saved)
    deltas = full_deltas(out)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(deltas) == linears and len(linears) == 2 * 7 + 1  # 2 layers × (q k v o gate up down) + score head
    assert all(d.abs().min() > 0 for d in deltas.values())  # every entry: AdamW moves each one by ~lr

    # the checkpoint holds every parameter, as safetensors
    (ckpt,) = (out / "checkpoints").iterdir()
    assert set(load_file(ckpt / "trainable.safetensors")) == {n for n, _ in model.named_parameters()}

    # full_model/ reloads to the trained model's logits, and `evaluate` scores it as the run did
    ids = torch.randint(4, model.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_full(out)(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=0, atol=1e-6)
    again = evaluate(out, RunConfig.from_flat({k: v for k, v in settings(data, out).items() if k != "variant"}))
    assert again["test_accuracy"] == results["test_accuracy"] and again["test_examples"] == results["test_examples"]


def test_cli_variant_full_says_adapter_settings_are_ignored(tmp_path, capsys):
    data, out = write_sentiment(tmp_path / "data.jsonl", n=32), tmp_path / "run"
    assert main(["train", "--model", "tiny-llama", "--data", data, "--variant", "full", "--r", "8",
                 "--max-steps", "1", "--per-device-train-batch-size", "8", "--disable-tqdm",
                 "--output-dir", str(out)]) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if "ignoring" in line]
    assert len(notes) == 1 and "variant full" in notes[0] and "r=8" in notes[0], captured.err
    assert read_yaml(out / "run_config.yaml")["variant"] == "full"
    assert f"saved {out / FULL_DIR}" in captured.out
    with pytest.raises(ModelError, match="not a full fine-tuning run"):
        load_full(tmp_path)


def test_compare_sets_full_fine_tuning_beside_lora(tmp_path, monkeypatch):
    monkeypatch.setattr(compare_module, "run_one", lambda config, resume=False: train(config, resume))  # in-process
    data, out = write_sentiment(tmp_path / "data.jsonl", n=48), tmp_path / "cmp"
    argv = ["compare", "--variants", "lora,full", "--lrs", "1e-3", "--seeds", "1", "--model", "tiny-llama",
            "--data", data, "--max-steps", "2", "--per-device-train-batch-size", "8", "--r", "2",
            "--eval-ranks", "1,2", "--disable-tqdm", "--output-dir", str(out)]
    assert main(argv) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["lora", "full"]
    params = {r["variant"]: int(r["trainable_parameters"]) for r in rows}
    full_run = out / "runs" / "full-lr0.001-seed0"
    assert params["full"] == json.loads((full_run / "results.json").read_text())["total_parameters"]
    assert params["full"] > 20 * params["lora"] > 0
    assert (full_run / FULL_DIR / "model.safetensors").exists() and not (full_run / "adapter").exists()
    table = (out / "results.md").read_text()
    assert "| full | 0.001 | 1 |" in table and f"{params['full']:,}" in table
    assert set(json.loads((out / "aurac.json").read_text())) == {"lora"}  # full fine-tuning has no rank

    def fail(config, resume=False):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(compare_module, "run_one", fail)
    assert main(argv) == 0  # a restarted sweep reuses both runs: the saved `variant: full` matches


def test_a_killed_full_run_resumes_to_the_same_weights(tmp_path):
    data = write_sentiment(tmp_path / "data.jsonl", n=48)
    kw = dict(max_steps=4, save_steps=2, lr_scheduler_type="cosine", warmup_steps=1)

    class Crash:
        def after_optimizer_step(self, trainer):
            if trainer.step == 2:  # in step 3, after checkpoint-2 was written
                raise Killed

    straight, cut = tmp_path / "straight", tmp_path / "cut"
    train(RunConfig.from_flat(settings(data, straight, **kw)))
    with pytest.raises(Killed):
        train(RunConfig.from_flat(settings(data, cut, **kw)), hooks=[Crash()])
    assert [p.name for p in (cut / "checkpoints").iterdir()] == ["checkpoint-2"]
    assert train(RunConfig.from_flat(settings(data, cut, **kw)), resume=True)["steps"] == 4
    a, b = (load_file(run / FULL_DIR / "model.safetensors") for run in (straight, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (straight, cut)]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_bf16_keeps_fp32_master_weights_and_computes_in_bf16(tmp_path):
    model = tiny_llama(100, "classification", 2, seed=0).requires_grad_(False)
    prepare(model, RunConfig.from_flat({"variant": "full", "bf16": True}), show=False)
    logits = model(input_ids=torch.randint(4, 100, (2, 6))).logits
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters())
    out = tmp_path / "run"
    results = train(RunConfig.from_flat(settings(write_sentiment(tmp_path / "d.jsonl", n=32), out, bf16=True,
                                                 max_steps=1)))
    assert results["trainable_parameters"] == results["total_parameters"]
    assert {t.dtype for t in load_file(out / FULL_DIR / "model.safetensors").values()} == {torch.float32}


def test_settings_round_trip_and_refusals():
    config = RunConfig.from_flat({"variant": "full", "r": 4})
    assert config.full_finetune and config.to_flat()["variant"] == "full"
    assert RunConfig.from_flat(config.to_flat()).full_finetune
    assert not RunConfig.from_flat({"variant": "lora"}).full_finetune
    with pytest.raises(ConfigError, match="unknown setting 'full_finetune'"):  # spelled `variant: full`
        RunConfig.from_flat({"full_finetune": True})
    with pytest.raises(ConfigError, match="fp16"):
        RunConfig.from_flat({"variant": "full", "fp16": True})
    with pytest.raises(ConfigError, match="quantize"):
        RunConfig.from_flat({"variant": "full", "quantize": "nf4"})
    assert variant_settings("full") == {"variant": "full"}
    assert variant_settings("full", {"learning_rates": [1e-5]}) == {"variant": "full", "learning_rates": [1e-5]}
    with pytest.raises(ConfigError, match="'full'"):
        variant_settings("full+rslora")


def test_fsdp_full_fine_tuning_matches_one_process(tmp_path):
    """Sharded over 2 processes (torchrun, gloo): the same losses and the same gathered `full_model/` as one process
    accumulating the same global batch."""
    from tests.test_fsdp import TINY, run_pair, write_copy_task
    from tests.test_resume_ddp import metrics

    data = write_copy_task(tmp_path / "copy.jsonl", n=120)
    one, two, _ = run_pair(tmp_path, 4, 240, max_steps=4, data=data, variant="full", **TINY)
    assert [r["loss"] for r in metrics(two)] == pytest.approx([r["loss"] for r in metrics(one)], abs=1e-4)
    a, b = (load_file(run / FULL_DIR / "model.safetensors") for run in (one, two))
    assert a.keys() == b.keys() and len(a) == 21  # embeddings, 2 × (7 Linear + 2 norms), final norm, lm_head
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6 * a[k].abs().max().item()) for k in a)
