"""The causal-LM path end to end: a prompt/completion JSONL → `lorakit train --model tiny-llama --task causal-lm`
→ the loss falls, perplexity beats the untrained adapter's, the prompt is masked out of the loss, PEFT 0.21.2 loads
the adapter with the same logits, and `lorakit eval` reproduces the perplexity."""
import json
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.cli import main
from lorakit.models import load_model, train_tokenizer
from lorakit.train import RunConfig, evaluate
from lorakit.train.args import read_yaml
from lorakit.train.run import load_splits
from lorakit.train.tasks import IGNORE, CausalLM
from lorakit.train.trainer import evaluate as evaluate_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
WORDS = "red green blue cat dog sun moon tree fish bird".split()
STEPS = 50


def write_copy_task(path, n=300, seed=0):
    """`copy: w1 w2 w3 =>` → ` w1 w2 w3`: learnable only by reading the prompt."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
            f.write(json.dumps({"prompt": f"copy: {words} =>", "completion": f" {words}"}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A trained run folder. The frozen tiny Llama's random lm_head (std 0.02) after RMSNorm caps logits near
    ±1.3, so the adapter also targets lm_head; rsLoRA makes the PEFT check cover the scale rule too."""
    root = tmp_path_factory.mktemp("causal")
    data = write_copy_task(root / "copy.jsonl")
    run = root / "run"
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    assert main(["train", "--model", "tiny-llama", "--task", "causal-lm", "--data", data, "--r", "8",
                 "--lora-alpha", "16", "--use-rslora", "--target-modules", *targets, "--learning-rate", "1e-2",
                 "--warmup-steps", "5", "--max-steps", str(STEPS), "--per-device-train-batch-size", "16",
                 "--disable-tqdm", "--output-dir", str(run)]) == 0
    return run


def test_collate_masks_the_prompt():
    tok = train_tokenizer(["copy: red cat => red cat", "copy: sun => sun moon"], vocab_size=300)
    task = CausalLM(tok, max_length=64)
    examples = [{"prompt": "copy: red cat =>", "completion": " red cat"}, {"prompt": "copy: sun =>", "completion": " sun"}]
    batch = task.collate(examples)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape and ids.shape[0] == 2
    for i, e in enumerate(examples):
        prompt = [tok.bos_token_id] + tok(e["prompt"], add_special_tokens=False)["input_ids"]
        completion = tok(e["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = len(prompt) + len(completion)
        assert ids[i, :n].tolist() == prompt + completion
        assert labels[i, :len(prompt)].tolist() == [IGNORE] * len(prompt)  # prompt (and <s>) not counted
        assert labels[i, len(prompt):n].tolist() == completion  # completion and </s> counted
        assert (labels[i, n:] == IGNORE).all() and (ids[i, n:] == tok.pad_token_id).all()
        assert mask[i].tolist() == [1] * n + [0] * (ids.shape[1] - n)

    # the loss is the mean next-token cross-entropy over exactly the labelled positions
    torch.manual_seed(0)
    logits = torch.randn(*ids.shape, len(tok))
    model = lambda input_ids, attention_mask: type("Out", (), {"logits": logits})  # noqa: E731
    rows, cols = torch.nonzero(labels[:, 1:] != IGNORE, as_tuple=True)
    expected = F.cross_entropy(logits[rows, cols], labels[rows, cols + 1])
    torch.testing.assert_close(task.loss(model, batch), expected)

    short = CausalLM(tok, max_length=4).collate(examples[:1])  # truncation cuts labels along with the ids
    assert short["input_ids"].shape[1] == 4 and short["labels"].tolist()[0] == [IGNORE] * 4


def test_loss_falls(lm_run):
    losses = [json.loads(line)["loss"] for line in (lm_run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == STEPS
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)


def test_perplexity_beats_the_untrained_adapter(lm_run):
    results = json.loads((lm_run / "results.json").read_text())
    assert results["test_perplexity"] == pytest.approx(math.exp(results["test_loss"]))
    config = RunConfig.from_flat(read_yaml(lm_run / "run_config.yaml"))
    model, tok = load_model(str(lm_run / "base_model"), "causal-lm")  # B = 0: the untrained adapter is the base
    task = CausalLM(tok, config.training.max_length)
    untrained = evaluate_model(model, task, load_splits(config).test, 64, "test")["test_perplexity"]
    assert results["test_perplexity"] < 0.3 * untrained, (results["test_perplexity"], untrained)


def test_adapter_is_peft_format_and_peft_loads_it(lm_run):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    adapter = lm_run / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["task_type"] == "CAUSAL_LM" and saved["use_rslora"]
    assert saved["base_model_name_or_path"] == str(lm_run / "base_model")
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") for k in tensors)
    assert "base_model.model.lm_head.lora_B.weight" in tensors
    assert min(t.abs().max().item() for k, t in tensors.items() if "lora_B" in k) > 0  # trained, not the B=0 init

    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lm_run / "base_model"), adapter).eval()
    ours, tok = load_model(str(lm_run / "base_model"), "causal-lm")
    lorakit.load_adapter(ours, adapter)
    batch = CausalLM(tok, 64).collate([{"prompt": "copy: red cat dog =>", "completion": " red cat dog"},
                                       {"prompt": "copy: sun =>", "completion": " sun"}])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        ref, got = theirs(**inputs).logits, ours(**inputs).logits
        with lorakit.disabled(ours):
            base = ours(**inputs).logits
    assert (got - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    assert (base - ref).abs().max().item() > 1.0  # the adapter changes the output, so the match means something


def test_eval_reproduces_perplexity(lm_run, capsys):
    results = json.loads((lm_run / "results.json").read_text())
    config = RunConfig.from_flat(read_yaml(lm_run / "run_config.yaml"))
    again = evaluate(lm_run, config)
    assert {k: again[k] for k in ("test_loss", "test_perplexity")} == \
        {"test_loss": results["test_loss"], "test_perplexity": results["test_perplexity"]}
    assert again["split"] == "test" and again["test_examples"] == results["test_examples"]
    assert main(["eval", str(lm_run / "adapter"), "--split", "validation"]) == 0  # the run's settings are found
    out = capsys.readouterr().out
    assert f"validation_perplexity  {results['validation_perplexity']:.4g}\n" in out
