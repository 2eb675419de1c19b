"""Full-rank methods vs LoRA at equal trainable-parameter budgets on the planted MLP task (issue 4).

The task is the test suite's (tests/contract.py): a frozen random 64→64→64 MLP learns a teacher that differs by a
planted ΔW on its first layer — rank 4, or full rank — from 2,000 Gaussian inputs (500 held out). Each method gets
its best of three learning rates (mean test MSE over 2 seeds), 600 Adam steps of 200 rows.

Usage: `.venv/bin/python bench/planted_full_rank.py [--no-write]` (~5 min on 2 cores); writes the
`planted_full_rank` section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]
from common import header_lines, load_average, markdown_table, write_section  # noqa: E402
from contract import mse_loss, planted_task  # noqa: E402

import lorakit  # noqa: E402

LRS = (1e-3, 3e-3, 1e-2)
SEEDS = (0, 1)


def shira_init(model, loader):
    lorakit.initialize(model, "shira", dataloader=loader, loss_fn=mse_loss, progress=False)


def methods(budget: int) -> dict[str, tuple[lorakit.AdapterConfig, object]]:
    """Label → (config, data init) at about `budget` trainable parameters on the 64×64 layer."""
    r = budget // 128  # LoRA and SHiRA: r·(64 + 64)
    target = {"target_modules": ["fc1"]}
    out = {f"LoRA r={r}": (lorakit.AdapterConfig(r=r, lora_alpha=r, **target), None)}
    for mask in ("random", "struct", "weight_magnitude", "gradient", "snip"):
        out[f"SHiRA {mask} r={r}"] = (lorakit.AdapterConfig(r=r, variant="shira", options={"mask_type": mask},
                                                            **target), shira_init if mask in ("gradient", "snip")
                                      else None)
    rand_r = {512: 8, 2048: 2}[budget]  # RandLoRA: ⌈64/r⌉·(r + 64) parameters: 576 and 2,112
    for alpha in (rand_r, 20 * rand_r):
        out[f"RandLoRA r={rand_r} α={alpha}"] = (lorakit.AdapterConfig(r=rand_r, lora_alpha=alpha, variant="randlora",
                                                                       **target), None)
    return out


def best(config, init, full_rank: bool) -> tuple[float, float, float, int]:
    """(best lr, mean MSE before, mean MSE after, parameters) over LRS, each the mean over SEEDS."""
    results = []
    for lr in LRS:
        runs = [planted_task(config, steps=600, lr=lr, full_rank=full_rank, seed=s, init=init) for s in SEEDS]
        results.append((lr, statistics.fmean(b for b, _, _ in runs), statistics.fmean(a for _, a, _ in runs),
                        runs[0][2]))
    return min(results, key=lambda t: t[2])


def main(write: bool) -> None:
    torch.set_num_threads(1)  # 64-wide matmuls: threads only add overhead
    load0 = load_average()
    rows = []
    for budget in (512, 2048):
        for label, (config, init) in methods(budget).items():
            cells = [label]
            for full_rank in (False, True):
                lr, before, after, params = best(config, init, full_rank)
                cells += [f"{after / before:.3f} (lr {lr:g})"]
            rows.append([*cells[:1], f"{params:,}", *cells[1:]])
            print(rows[-1], flush=True)
    table = markdown_table(["method", "trainable params", "rank-4 ΔW: MSE after / before",
                            "full-rank ΔW: MSE after / before"], rows)
    body = f"""{header_lines(load0, ["- torch threads for this benchmark: 1"])}

{__doc__.split("Usage")[0].strip()}

{table}

Lower is better; 1.0 = nothing learned. The question the issue asks — do full-rank methods fit a full-rank ΔW
better than LoRA at an equal parameter count? — is answered row by row above (SHiRA's gradient and SNIP masks
pick entries from calibration gradients: they use data the others do not see).
"""
    print(body)
    if write:
        write_section("planted_full_rank", "Planted task: full-rank methods vs LoRA at equal parameters "
                      "(`bench/planted_full_rank.py`)", body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-write", action="store_true")
    main(not parser.parse_args().no_write)
