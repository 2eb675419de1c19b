"""Peak memory of one training step of all-MiniLM-L6-v2 (SEQ_CLS, batch 32): LoRA with AdamW and with LoRA-Pro
against full-parameter training with AdamW, GaLore and LISA (issue 5).

Usage: `.venv/bin/python bench/optimizer_memory.py [--no-write]`. Each configuration runs in a fresh process:
RSS after loading (model, adapter, batch), then the peak RSS over 4 training steps (VmHWM reset after loading),
which holds the optimizer's state, saved activations, gradients and temporaries. Replaces the
`optimizer_memory` section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from common import (header_lines, load_average, markdown_table, peak_rss_bytes, reset_peak_rss,  # noqa: E402
                    rss_bytes, run_subprocess, write_section)
from minilm_train_step import base_model, make_batch  # noqa: E402

STEPS, LR = 4, 1e-4
CONFIGS = {  # label → (adapter rank or None for full-parameter training, optimizer name, its options)
    "LoRA r=16 + AdamW": (16, "adamw", {}),
    "LoRA r=16 + LoRA-Pro": (16, "lorapro", {}),
    "full + AdamW": (None, "adamw", {}),
    "full + GaLore r=64": (None, "galore", {"rank": 64}),
    "full + LISA (2 of 6 layers)": (None, "lisa", {"activated_layers": 2}),
}


def child(label: str) -> dict:
    import lorakit
    from lorakit.optim import make_optimizer
    from lorakit.train.args import TrainingArguments

    rank, name, options = CONFIGS[label]
    batch, labels = make_batch()
    model = base_model().train()
    torch.manual_seed(1)
    if rank:
        lorakit.inject(model, lorakit.AdapterConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                    task_type="SEQ_CLS"))
    else:
        model.requires_grad_(True)
    opt = make_optimizer(name, model, TrainingArguments(output_dir="unused", learning_rate=LR), **options)
    rss_load = rss_bytes()
    assert reset_peak_rss(), "VmHWM could not be reset"
    for _ in range(STEPS):
        F.cross_entropy(model(**batch).logits, labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    trainable = sum(p.numel() for g in opt.param_groups for p in g["params"])
    return dict(rss_load=rss_load, peak_step=peak_rss_bytes(), optimized=trainable)


def main(write: bool) -> None:
    load0 = load_average()
    mib, rows = 2**20, []
    results = {}
    for label in CONFIGS:
        out = run_subprocess([__file__, "--child", label])
        results[label] = json.loads(out.strip().splitlines()[-1])
    base = results["full + AdamW"]
    for label, r in results.items():
        step = (r["peak_step"] - r["rss_load"]) / mib
        rows.append([label, f"{r['optimized']:,}", f"{r['rss_load'] / mib:.0f}", f"{step:.0f}",
                     f"{r['peak_step'] / mib:.0f}", f"{r['peak_step'] / base['peak_step']:.2f}"])
    table = markdown_table(["configuration", "parameters optimized", "RSS after load, MiB",
                            "step peak − RSS after load, MiB", "peak RSS, MiB", "peak / full AdamW"], rows)
    body = f"{header_lines(load0)}\n\n{__doc__.split('Usage')[0].strip()}\n\n{table}\n"
    print(body)
    if write:
        write_section("optimizer_memory", "Training-step memory: LoRA, LoRA-Pro, GaLore, LISA, full fine-tuning "
                      "(`bench/optimizer_memory.py`)", body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
    else:
        main(not args.no_write)
