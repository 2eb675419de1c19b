"""FSDP (`fsdp: full_shard`) under `torchrun --nproc_per_node 2` (gloo, CPU) against one process with the same global
batch: per-step losses within 1e-4, the same adapter keys and config, tensors within 1e-6 relative.

The fast tests train the tiny Llama (2 decoder layers, each its own FSDP unit) for causal LM and resume the
sharded run from its checkpoint; the slow ones train SmolLM2-135M (30 layers) and a bf16 tiny Llama. Every process
gets one thread.
"""
import json
import random
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_causal_lm import WORDS
from tests.test_resume_ddp import adapter_config, adapter_tensors, finish, metrics, start

TORCHRUN = (str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2")


def write_copy_task(path: Path, n: int) -> str:
    """`copy: w1 w2 w3 =>` → ` w1 w2 w3`, three words always: every example has as many loss tokens, so the mean of
    the processes' token means (what both DDP and FSDP train on) equals the token mean over the global batch."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            words = " ".join(rng.choice(WORDS) for _ in range(3))
            f.write(json.dumps({"prompt": f"copy: {words} =>", "completion": f" {words}"}) + "\n")
    return str(path)


def config(out: Path, yaml_file: Path, **settings) -> list[str]:
    """`train --config` for a causal-LM run (torchrun's parser would misread some script flags)."""
    values = {**dict(task="causal-lm", output_dir=str(out), r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=5e-3,
                     lr_scheduler_type="constant", max_length=32, logging_steps=1, seed=3, eval_steps=2,
                     per_device_eval_batch_size=4), **settings}
    yaml_file.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    return ["train", "--config", str(yaml_file), "--disable-tqdm"]


def run_pair(tmp_path: Path, batch: int, timeout: float, **settings) -> tuple[Path, Path, dict]:
    """The same run sharded over 2 processes (per-device batch `batch`) and in one process that accumulates the
    same two micro-batches, one run after the other so each timing is its own; returns both output folders and the
    seconds each took. (One process with batch 2 × `batch` sees the same global batch too, and its losses match
    as closely, but its adapter only within ~1e-3 relative after 3 steps of SmolLM2, DDP's as well: a different
    matmul blocking moves gradients that are nearly 0 by rounding, and Adam's first steps turn those into
    updates of a full learning rate.)"""
    one, two = tmp_path / "one", tmp_path / "two"
    seconds = {}
    for name, out, launcher, accumulate in (("fsdp", two, TORCHRUN, 1), ("single", one, (sys.executable,), 2)):
        began = time.perf_counter()
        proc = start(config(out, tmp_path / f"{name}.yaml", per_device_train_batch_size=batch,
                            gradient_accumulation_steps=accumulate, **settings),
                     tmp_path / f"{name}.log", launcher=launcher)
        finish(proc, tmp_path / f"{name}.log", timeout=timeout)
        seconds[name] = round(time.perf_counter() - began, 1)
    return one, two, seconds


def compare(one: Path, two: Path, steps: int) -> dict:
    """Assert the issue's tolerances; returns the largest differences seen."""
    a, b = metrics(one), metrics(two)
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, steps + 1))
    loss = max(abs(ra["loss"] - rb["loss"]) for ra, rb in zip(a, b))
    assert loss <= 1e-4, [(ra["loss"], rb["loss"]) for ra, rb in zip(a, b)]
    for ra, rb in zip(a, b):
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
        assert ("eval_loss" in ra) == ("eval_loss" in rb)
        assert rb.get("eval_loss", 0) == pytest.approx(ra.get("eval_loss", 0), rel=1e-5)  # evaluation sharded too
    assert len({round(r["loss"], 4) for r in a}) == steps  # the adapter trains: every step's loss differs
    ta, tb = adapter_tensors(one), adapter_tensors(two)
    assert ta.keys() == tb.keys() and any("lora_B" in k for k in ta)
    rel = max(((ta[k] - tb[k]).abs().max() / ta[k].abs().max().clamp_min(1e-12)).item() for k in ta)
    # AdamW's first steps move each element by about lr·sign(g), so an element whose gradient is near zero turns the
    # all-reduce's rounding (other summation order) into a visible difference: 1.0e-4 for SmolLM2 on an AVX2-only
    # CPU, where losses, gradient norms and eval losses still agree to the tolerances above.
    assert rel <= 1e-3, rel
    assert all(ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape for k in ta)
    assert adapter_config(one) == adapter_config(two)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert ra["test_perplexity"] == pytest.approx(rb["test_perplexity"], rel=1e-5)
    assert [p.name for p in (two / "checkpoints").iterdir()] == [f"checkpoint-{steps}"]
    return {"max_loss_diff": loss, "max_rel_tensor_diff": rel}


@pytest.mark.parametrize("settings,named", [(dict(optim="galore"), "optim='galore'"),
                                            (dict(optim="lorapro"), "optim='lorapro'"),
                                            (dict(quantize="nf4"), "quantize"), (dict(eval_ranks=[1, 2]), "eval_ranks")])
def test_what_needs_whole_tensors_is_refused_under_fsdp(settings, named):
    from lorakit.errors import ConfigError
    from lorakit.train import RunConfig

    with pytest.raises(ConfigError, match=named):
        RunConfig.from_flat({"fsdp": "full_shard", **settings})
    RunConfig.from_flat(settings)  # fine without fsdp


# 9 evaluation examples, 4 a batch: shards of 5 and 4 make 2 and 1 batches (the short rank runs one more, discarded)
TINY = dict(model="tiny-llama", fsdp="full_shard", save_steps=2, max_eval_samples=9)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """4 steps of the tiny Llama sharded over 2 processes (two FSDP units, the decoder layers, plus the root) and in
    one; checkpoints every 2 steps gather the shards."""
    root = tmp_path_factory.mktemp("fsdp")
    data = write_copy_task(root / "copy.jsonl", n=120)
    one, two, seconds = run_pair(root, 4, 240, max_steps=4, data=data, **TINY)
    return root, data, one, two, seconds


def test_fsdp_two_processes_match_one_process_tiny_llama(tiny_runs):
    root, data, one, two, seconds = tiny_runs
    print("tiny-llama", compare(one, two, 4), seconds)


def test_fsdp_resume_matches_an_uninterrupted_run(tiny_runs, tmp_path):
    """The sharded run resumes from its checkpoint-4 (whole tensors split back into shards, optimizer state
    included) to step 8 and matches an 8-step single-process run (constant learning rate: the schedule does not
    depend on the last step)."""
    root, data, _, first, _ = tiny_runs
    two, eight = tmp_path / "two", tmp_path / "eight"
    shutil.copytree(first, two)
    resumed = start(config(two, tmp_path / "resume.yaml", per_device_train_batch_size=4, max_steps=8, data=data,
                           **TINY) + ["--resume"], tmp_path / "resume.log", launcher=TORCHRUN)
    finish(resumed, tmp_path / "resume.log", timeout=240)
    finish(start(config(eight, tmp_path / "eight.yaml", per_device_train_batch_size=4, gradient_accumulation_steps=2,
                        max_steps=8, data=data, **TINY), tmp_path / "eight.log"), tmp_path / "eight.log", timeout=240)
    print("tiny-llama resumed", compare(eight, two, 8))


def test_fsdp_instruct_scores_and_generates_in_lockstep(tmp_path):
    """The instruct task under FSDP: shards of 5 and 4 test examples, greedy replies that end at different steps on
    each rank, one prefill per batch everywhere; no rank waits forever, and the scores equal one process's."""
    one, two, _ = run_pair(tmp_path, 4, 240, task="instruct", data="vader:movies", max_train_samples=48, max_steps=4,
                           max_length=96, learning_rate=1e-2, **TINY)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (one, two))
    for key in ("zero_shot_test_accuracy", "zero_shot_test_generation_accuracy", "zero_shot_test_unparseable",
                "test_accuracy", "test_generation_accuracy", "test_unparseable"):
        assert rb[key] == ra[key], key


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process_smollm2(tmp_path):
    """SmolLM2-135M (30 decoder layers, tied embeddings in the root unit) for 3 steps."""
    data = write_copy_task(tmp_path / "copy.jsonl", n=60)
    one, two, seconds = run_pair(tmp_path, 2, 600, model="smollm2", data=data, fsdp="full_shard", max_steps=3,
                                 save_steps=0, eval_steps=3, max_eval_samples=8, max_length=24,
                                 target_modules=["q_proj", "v_proj"])
    print("smollm2", compare(one, two, 3), seconds)


@pytest.mark.slow
def test_fsdp_bf16_base_with_fp32_adapters(tmp_path):
    """A bf16 base and fp32 adapters in one FSDP unit: the frozen bf16 weights are gathered with the fp32 ones and
    only the (fp32) trainable gradients are reduce-scattered."""
    data = write_copy_task(tmp_path / "copy.jsonl", n=120)
    one, two, seconds = run_pair(tmp_path, 4, 240, max_steps=4, data=data, bf16=True, **TINY)
    assert json.loads((two / "results.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in adapter_tensors(two).values()} == {torch.float32}
    print("tiny-llama bf16", compare(one, two, 4), seconds)
