"""Structured pruning of MiniLM (issue 7): inference time of the unpruned model, the masked model (pruned groups
zeroed by LoRAPrune's mask hooks, full size, as during pruning) and the physically pruned model (rows/columns
removed by `LoRAPrune.finalize`), 50 % of the heads and MLP channels in layers 0-4 (the last layer kept).

Usage: `.venv/bin/python bench/prune.py [--no-write] [--threads 1 2] [--sparsity 0.5]`. Workload: the first 512
sentences of the VADER movies test split, tokenized once (max length 64, padded per batch of 32), classified with
`torch.no_grad()`; the three models run round-robin (`common.compare`: 2 warm-up rounds, 7 timed, median per
model). Which groups are pruned does not change the time, only how many, so magnitude scores are used.
Replaces the `prune` section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from common import compare, header_lines, load_average, markdown_table, write_section  # noqa: E402

from lorakit.data import vader  # noqa: E402
from lorakit.models import load_model  # noqa: E402
from lorakit.rank.prune import LoRAPrune, parameter_count  # noqa: E402

SENTENCES, BATCH, MAX_LENGTH = 512, 32, 64


def batches(tokenizer) -> list[dict]:
    texts = vader("movies").test.texts[:SENTENCES]
    return [tokenizer(texts[i:i + BATCH], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
            for i in range(0, len(texts), BATCH)]


def main(write: bool, threads: list[int], sparsity: float) -> None:
    load0 = load_average()
    full, tokenizer = load_model("minilm", "classification")
    masked = copy.deepcopy(full)
    LoRAPrune(masked, adapter="__none__", sparsity=sparsity, metric="magnitude").prune_now()  # hooks stay on
    pruned = copy.deepcopy(full)
    cut = LoRAPrune(pruned, adapter="__none__", sparsity=sparsity, metric="magnitude")
    cut.prune_now()
    cut.finalize()
    nets = {"unpruned": full.eval(), "masked (zeroed by hooks)": masked.eval(), "pruned (physically smaller)":
            pruned.eval()}
    data = batches(tokenizer)
    with torch.no_grad():
        logits = {k: torch.cat([m(**b).logits for b in data]) for k, m in nets.items()}
    gap = float((logits["masked (zeroed by hooks)"] - logits["pruned (physically smaller)"]).abs().max())
    rows = []
    for n in threads:
        torch.set_num_threads(n)

        def job(model):
            return lambda: [model(**b) for b in data]
        with torch.no_grad():
            times = compare({k: job(m) for k, m in nets.items()})
        base = times["unpruned"]
        for k, t in times.items():
            rows.append([n, k, f"{parameter_count(nets[k]) / 1e6:.2f}M", f"{t:.3f}", f"{SENTENCES / t:.0f}",
                         f"{t / base:.2f}"])
        print(rows[-3:], flush=True)
    table = markdown_table(["torch threads", "model", "parameters", f"median s / {SENTENCES} sentences",
                            "sentences / s", "time / unpruned"], rows)
    extra = [f"- MiniLM (all-MiniLM-L6-v2) + 2-label head; sparsity {sparsity} of heads and MLP channels in layers "
             f"0-4; max |masked − pruned| logit difference {gap:.1e}"]
    body = f"{header_lines(load0, extra)}\n\n{__doc__.split('Usage')[0].strip()}\n\n{table}\n"
    print(body)
    if write:
        write_section("prune", "Structured pruning: masked vs physically pruned MiniLM (`bench/prune.py`)", body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sparsity", type=float, default=0.5)
    args = parser.parse_args()
    main(not args.no_write, args.threads, args.sparsity)
