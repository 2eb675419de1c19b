"""The adapter pool with training trajectories that the generators of `bench/transfer.py` learn from.

13 families (those of `bench/weight_retrieval.py`: polarity, intensity and format on each VADER domain, and source),
one `lorakit train` run each (seed 0, the weight-retrieval recipe: LoRA r 4, α 8 on q_proj / v_proj of SmolLM2's last
4 layers, 60 steps × 8 examples, lr 3e-3, bf16 base) with a checkpoint every `EVERY` steps, all kept, in
`runs/transfer/pool/<family>/`. Resumable: a finished run is skipped.

Usage: `.venv/bin/python bench/transfer_pool.py` (about 13 × 50 s on 2 cores).
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from weight_retrieval import TRAIN, families  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
POOL = ROOT / "runs" / "transfer" / "pool"
EVERY = 6  # steps between checkpoints: 10 per 60-step run
FROM_STEP = 30  # trajectory points used by the generators: steps 30, 36, …, 60 (the first half is mostly init)


def run_dir(family: str) -> Path:
    return POOL / family


def adapter_dir(family: str) -> Path:
    return run_dir(family) / "adapter"


def train_pool(fams: dict) -> None:
    for family, (spec, _) in fams.items():
        folder = run_dir(family)
        if (adapter_dir(family) / "adapter_config.json").is_file():
            continue
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lorakit", "train", "--model", "smollm2", "--task", "instruct",
                        "--data", spec, "--seed", "0", "--output-dir", str(folder), "--overwrite-output-dir", *TRAIN,
                        "--save-steps", str(EVERY), "--save-total-limit", "0"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        print(f"[pool] {family}: {time.perf_counter() - started:.0f} s", flush=True)


def trajectory(family: str, layout) -> torch.Tensor:
    """(points, size) raw vectors of the run's checkpoints from FROM_STEP on, in `layout` (the final adapter's)."""
    from safetensors.torch import load_file

    points = []
    for ckpt in sorted((run_dir(family) / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        if int(ckpt.name.split("-")[1]) < FROM_STEP:
            continue
        state = load_file(str(ckpt / "trainable.safetensors"))
        tensors = {k.replace(".adapters.default.lora_A", ".lora_A.weight").replace(".adapters.default.lora_B",
                                                                                   ".lora_B.weight"): v
                   for k, v in state.items()}
        points.append(layout.raw(tensors))
    if not points:
        raise FileNotFoundError(f"no checkpoints from step {FROM_STEP} in {run_dir(family)}")
    return torch.stack(points)


if __name__ == "__main__":
    train_pool(families())
