"""ALLoRA's placements against AdamW on the planted task (issue 15).

The task is the test suite's (tests/contract.py): a frozen random 64→64→64 MLP learns a teacher that differs by a
planted rank-4 ΔW on fc1 (1,000 Gaussian training inputs, batches of 100). LoRA r = 4, α = 4 (s = 1), dropout 0,
B = 0 at init, as the paper trains; every row is AdamW(β = (0.9, 0.999), wd 0) with the same learning rate and data:
plain, and with ALLoRA's rate in each placement. Reported: training MSE at a few steps (mean over 3 seeds), the
mean ‖ΔW_i,:‖ of fc1's rows after 10 steps (the "escape from B = 0"), and the relative distance of the final ΔW
from plain AdamW's (0 would mean ALLoRA changed nothing).

Usage: `.venv/bin/python bench/allora_planted.py [--no-write]` (~1 min); writes the `allora_planted` section of
BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]
from common import header_lines, load_average, markdown_table, write_section  # noqa: E402
from contract import mlp, planted_teacher  # noqa: E402

import lorakit  # noqa: E402
from lorakit.optim import make_optimizer  # noqa: E402

STEPS, CHECKPOINTS, SEEDS, LR = 200, (1, 10, 50, 200), (0, 1, 2), 3e-3
ROWS = {  # label → allora options (None: plain AdamW)
    "AdamW (plain LoRA)": None,
    "ALLoRA, paper: output rows of ΔW, on the gradient (default)": dict(granularity="output_row"),
    "ALLoRA, rows of A and B, on the gradient (old default)": dict(granularity="row"),
    "ALLoRA, rows of A and B, on AdamW's update": dict(granularity="row", apply_before_optimizer=False),
}


def run(options, seed, eta):
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(1000, 64, generator=g)
    with torch.no_grad():
        y = planted_teacher()(x)
    model = mlp(0)
    torch.manual_seed(seed)
    lorakit.inject(model, lorakit.AdapterConfig(r=4, lora_alpha=4, target_modules=["fc1"]))
    args = SimpleNamespace(learning_rate=LR, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0) if options is None else \
        make_optimizer("allora", model, args, eta=eta, **options)
    v = model.fc1.adapters["default"]
    losses, escape = {}, None
    for step in range(1, STEPS + 1):
        i = ((step - 1) * 100) % 1000
        loss = torch.nn.functional.mse_loss(model(x[i:i + 100]), y[i:i + 100])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in CHECKPOINTS:
            with torch.no_grad():
                losses[step] = torch.nn.functional.mse_loss(model(x), y).item()
        if step == 10:
            escape = v.delta_weight().detach().norm(dim=1).mean().item()
    return losses, escape, v.delta_weight().detach()


def table(eta):
    results = {label: [run(options, seed, eta) for seed in SEEDS] for label, options in ROWS.items()}
    plain = [dw for _, _, dw in results["AdamW (plain LoRA)"]]
    rows = []
    for label, runs in results.items():
        distance = statistics.mean(((dw - p).norm() / p.norm()).item() for (_, _, dw), p in zip(runs, plain))
        rows.append([label] + [f"{statistics.mean(r[0][s] for r in runs):.3g}" for s in CHECKPOINTS]
                    + [f"{statistics.mean(r[1] for r in runs):.4f}", f"{distance:.3f}"])
    head = ["optimizer"] + [f"MSE @ {s}" for s in CHECKPOINTS] + ["mean ‖ΔW_i‖ @ 10", "‖ΔW − ΔW_AdamW‖/‖ΔW_AdamW‖"]
    return markdown_table(head, rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = load_average()
    body = [f"LoRA r = 4, s = 1 on fc1; AdamW lr {LR:g}, {STEPS} steps of 100 rows; means over seeds "
            f"{list(SEEDS)}. Command: `.venv/bin/python bench/allora_planted.py`.", ""]
    for eta in (1.0, 2.0):
        body += [f"η = {eta:g}:", "", table(eta), ""]
    text = header_lines(load) + "\n\n" + "\n".join(body)
    print(text)
    if not args.no_write:
        write_section("allora_planted", "ALLoRA placements on the planted task (`bench/allora_planted.py`)", text)


if __name__ == "__main__":
    main()
