"""`python -m lorakit train` as a user runs it: killed with SIGKILL and resumed, and under `torchrun` (2-process DDP).

Both compare against an uninterrupted single-process run of the same settings, on the tiny Llama (no dropout of
its own) and a small JSONL file. Every process gets one thread, so runs are bit-for-bit repeatable.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def write_data(path: Path, n: int = 120) -> Path:
    rng = random.Random(0)
    good, bad = ["good", "great", "lovely", "superb", "warm", "bright"], ["bad", "awful", "dull", "grim", "cold"]
    nouns = ["film", "plot", "actor", "story", "scene", "music", "ending", "cast"]
    with open(path, "w") as f:
        for i in range(n):
            words = rng.sample(good if i % 2 else bad, 2)
            text = f"the {rng.choice(nouns)} was {words[0]} and {words[1]}" + " really" * rng.randrange(4)
            f.write(json.dumps({"text": text, "label": i % 2}) + "\n")
    return path


def flags(data: Path, out: Path, yaml_file: Path | None = None, **settings) -> list[str]:
    """`train` arguments: settings as flags, or written to `yaml_file` and passed as `--config`. (torchrun's own
    parser reads `--r` as an ambiguous abbreviation of its options unless the script's arguments follow `--`;
    the DDP run uses a config file.)"""
    values = dict(model="tiny-llama", data=str(data), task="classification", output_dir=str(out), r=4,
                  lora_alpha=8, learning_rate=5e-3, lr_scheduler_type="cosine", warmup_steps=2, max_length=32,
                  logging_steps=1, seed=3, **settings)
    if yaml_file is not None:
        yaml_file.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
        return ["train", "--config", str(yaml_file), "--disable-tqdm"]
    return ["train", *(f"--{k.replace('_', '-')}={v}" for k, v in values.items()), "--disable-tqdm"]


def start(argv: list[str], log: Path, launcher=(sys.executable,)) -> subprocess.Popen:
    return subprocess.Popen([*launcher, "-m", "lorakit", *argv], env=ENV, cwd=log.parent,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    assert proc.wait(timeout) == 0, log.read_text()[-3000:]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def newest_step(out: Path) -> int:
    try:
        names = os.listdir(out / "checkpoints")
    except FileNotFoundError:
        return 0
    return max((int(n.split("-")[1]) for n in names if n.startswith("checkpoint-")), default=0)


def kill_after_checkpoint(proc: subprocess.Popen, out: Path, step: int, delay: float, log: Path) -> int:
    """SIGKILL `proc` `delay` seconds after a checkpoint of `step` or later appears; returns that checkpoint's step."""
    deadline = time.monotonic() + 120
    while (seen := newest_step(out)) < step:
        assert proc.poll() is None, f"run ended before checkpoint-{step}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.001)
    time.sleep(delay)
    assert proc.poll() is None, f"run finished before the kill (delay {delay:.3f} s): the test needs more steps"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    assert not (out / "results.json").exists()
    return seen


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def adapter_config(out: Path) -> dict:
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    config.pop("base_model_name_or_path")  # the run's own base_model/ folder
    return config


def test_resume_after_sigkill_continues_the_same_curve(tmp_path):
    """Killed right after a checkpoint, resumed, killed again at a random moment, resumed to the end: the per-step
    losses, evaluations, test metrics and adapter equal an uninterrupted run's. lora_dropout 0.1 makes every step
    depend on the restored RNG state."""
    data = write_data(tmp_path / "data.jsonl")
    settings = dict(max_steps=30, per_device_train_batch_size=8, save_steps=1, eval_steps=10, lora_dropout=0.1)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    reference = start(flags(data, ref, **settings), tmp_path / "ref.log")
    first = start(flags(data, cut, **settings), tmp_path / "cut1.log")
    k1 = kill_after_checkpoint(first, cut, 2, 0.0, tmp_path / "cut1.log")
    delay = random.Random(time.time_ns()).uniform(0.0, 0.06)
    second = start(flags(data, cut, **settings) + ["--resume"], tmp_path / "cut2.log")
    k2 = kill_after_checkpoint(second, cut, k1 + 3, delay, tmp_path / "cut2.log")
    assert 0 < len(metrics(cut)) < 30
    finish(start(flags(data, cut, **settings) + ["--resume"], tmp_path / "cut3.log"), tmp_path / "cut3.log")
    finish(reference, tmp_path / "ref.log")

    why = f"(killed after checkpoint-{k1}, then {delay * 1000:.0f} ms after checkpoint-{k2})"
    a, b = metrics(ref), metrics(cut)
    assert [r["step"] for r in b] == list(range(1, 31)), why
    for ra, rb in zip(a, b):
        assert abs(rb["loss"] - ra["loss"]) <= 1e-6, (ra["step"], ra["loss"], rb["loss"], why)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-6, abs=1e-9), why
        assert rb["learning_rate"] == ra["learning_rate"] and rb.get("eval_accuracy") == ra.get("eval_accuracy")
    assert len({r["loss"] for r in a}) == 30
    assert sum("eval_accuracy" in r for r in b) == 3
    ta, tb = adapter_tensors(ref), adapter_tensors(cut)
    assert ta.keys() == tb.keys() and any("lora_B" in k for k in ta) and any("score" in k for k in ta)
    for key in ta:
        assert (ta[key] - tb[key]).abs().max().item() <= 1e-6 * max(1.0, ta[key].abs().max().item()), (key, why)
    assert adapter_config(ref) == adapter_config(cut)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (ref, cut))
    for key in ("test_accuracy", "test_f1", "validation_accuracy", "steps"):
        assert ra[key] == rb[key], key
    assert [p.name for p in (cut / "checkpoints").iterdir() if not p.name.startswith(".tmp")] == ["checkpoint-30"]


def test_ddp_two_processes_match_one_process(tmp_path):
    """torchrun --nproc_per_node 2 with per-device batch 4 = one process with batch 8 (dropout off), and only rank 0
    writes: one metrics line per step, one adapter, one checkpoint."""
    torchrun = Path(sys.executable).with_name("torchrun")
    assert torchrun.exists(), torchrun
    data = write_data(tmp_path / "data.jsonl")
    settings = dict(max_steps=6, save_steps=3, eval_steps=3, lora_dropout=0.0)
    one, two = tmp_path / "one", tmp_path / "two"
    ddp = start(flags(data, two, tmp_path / "two.yaml", per_device_train_batch_size=4, **settings),
                tmp_path / "two.log", launcher=(str(torchrun), "--standalone", "--nproc_per_node=2"))
    single = start(flags(data, one, tmp_path / "one.yaml", per_device_train_batch_size=8, **settings),
                   tmp_path / "one.log")
    finish(ddp, tmp_path / "two.log", timeout=180)
    finish(single, tmp_path / "one.log")

    a, b = metrics(one), metrics(two)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6], (two / "metrics.jsonl").read_text()
    for ra, rb in zip(a, b):
        assert abs(rb["loss"] - ra["loss"]) <= 1e-4, (ra["step"], ra["loss"], rb["loss"])
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
        assert rb["learning_rate"] == ra["learning_rate"]
        assert rb.get("eval_accuracy") == ra.get("eval_accuracy")  # evaluation sharded over ranks, then summed
    assert len({round(r["loss"], 4) for r in a}) == 6
    ta, tb = adapter_tensors(one), adapter_tensors(two)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert (ta[key] - tb[key]).abs().max().item() <= 1e-4 * max(1.0, ta[key].abs().max().item()), key
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert ra["test_accuracy"] == rb["test_accuracy"] and ra["steps"] == rb["steps"] == 6
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert [p.name for p in (two / "checkpoints").iterdir()] == ["checkpoint-6"]  # no leftovers of a second writer
    assert sorted(p.name for p in (two / "adapter").iterdir()) == sorted(p.name for p in (one / "adapter").iterdir())
