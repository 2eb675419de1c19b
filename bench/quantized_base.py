"""A quantized frozen base (QLoRA-style): SmolLM2-135M with LoRA r=16 on all linear layers, fp32 / bf16 / int8 / nf4.

    .venv/bin/python bench/quantized_base.py [--rounds 6] [--write]

Each base lives in its own worker process, so its memory is its own: weight bytes (`lorakit.quantize.weight_bytes`,
quantization state included), RSS after loading (quantized bases are loaded in fp32, quantized, then freed memory is
returned to the OS), and peak RSS during training (VmHWM reset once training starts: weights + activations, logits
and optimizer state). Step time: one AdamW step (forward with loss, backward, update) on a fixed batch of 16 × 64
random token ids; the workers take turns one step at a time (round-robin), median over the timed rounds.
Movies accuracy (test split, label scoring) is read from the full `lorakit train` runs of `bench/instruct_runs.py`
(`runs/instruct/<run>/results.json`, see `ACCURACY_RUNS`); "not run" where there is none. `--write` replaces this
script's section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from common import (ROOT, fmt_ms, header_lines, load_average, markdown_table, peak_rss_bytes,  # noqa: E402
                    reset_peak_rss, rss_bytes, write_section)

BASES = ["fp32", "bf16", "int8", "nf4"]
ACCURACY_RUNS = {"fp32": "fp32", "bf16": "bf16-baselines", "int8": "int8", "nf4": "nf4-bf16"}  # instruct_runs names
BATCH, SEQ, RANK = 16, 64, 16
MIB = 2**20


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def worker(conn, base: str, threads: int) -> None:
    """Load SmolLM2 with `base` weights, add LoRA, then train one step per "step" message."""
    torch.set_num_threads(threads)
    import lorakit
    from lorakit.models import load_model
    from lorakit.quantize import quantize_base, weight_bytes

    model, _ = load_model("smollm2", "causal-lm")
    if base == "bf16":
        model.to(torch.bfloat16)
    elif base != "fp32":
        quantize_base(model, base, compute_dtype=torch.bfloat16)
    _trim()
    info = {"weight_bytes": weight_bytes(model), "rss_loaded": rss_bytes(), "load_peak": peak_rss_bytes()}
    lorakit.inject(model, lorakit.AdapterConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear"))
    info["adapted"] = sum(isinstance(m, lorakit.layers.AdaptedLayer) for m in model.modules())
    info["trainable"] = lorakit.count_parameters(model)[0]
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(10, model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    reset_peak_rss()
    conn.send(info)
    while conn.recv() == "step":
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        conn.send((time.perf_counter() - t0, loss.item()))
    conn.send({"train_peak": peak_rss_bytes()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (one step per base each)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--write", action="store_true", help="replace this script's section of BENCHMARKS.md")
    args = ap.parse_args()
    from lorakit.quantize import import_bnb

    import_bnb()  # before `machine_info` imports PEFT, which imports bitsandbytes (and its Hub kernel lookup)
    load_before = load_average()
    ctx = mp.get_context("spawn")
    workers, info = {}, {}
    for base in BASES:  # load one at a time
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(theirs, base, args.threads), daemon=True)
        proc.start()
        workers[base] = (proc, ours)
        info[base] = ours.recv()
        print(f"{base}: loaded, {info[base]['weight_bytes'] / MIB:.0f} MiB of weights", flush=True)
    times = {b: [] for b in BASES}
    losses = {b: [] for b in BASES}
    for r in range(args.warmup + args.rounds):
        for base, (_, conn) in workers.items():
            conn.send("step")
            dt, loss = conn.recv()
            losses[base].append(loss)
            if r >= args.warmup:
                times[base].append(dt)
        print(f"round {r + 1}: " + ", ".join(f"{b} {fmt_ms(times[b][-1] if times[b] else 0)} ms" for b in BASES),
              flush=True)
    for base, (proc, conn) in workers.items():
        conn.send("done")
        info[base].update(conn.recv())
        proc.join()

    fp32 = info["fp32"]["weight_bytes"]
    rows = []
    for b in BASES:
        i, med = info[b], statistics.median(times[b])
        rows.append([b, f"{i['weight_bytes'] / MIB:.0f} ({i['weight_bytes'] / fp32:.2f}x)",
                     f"{i['rss_loaded'] / MIB:.0f}", f"{i['train_peak'] / MIB:.0f}",
                     f"{(i['train_peak'] - i['rss_loaded']) / MIB:.0f}", fmt_ms(med),
                     f"{med / statistics.median(times['fp32']):.2f}x",
                     f"{losses[b][0]:.3f} → {losses[b][-1]:.3f}", movies_accuracy(b)])
    table = markdown_table(["base", "weight MiB (vs fp32)", "RSS after load MiB", "peak RSS training MiB",
                            "training − loaded MiB", "step ms (median)", "step vs fp32", "loss first → last",
                            "movies acc"], rows)
    a = info["fp32"]
    body = "\n".join([
        header_lines(load_before, [
            f"- bitsandbytes {_bnb_version()}",
            f"- SmolLM2-135M-Instruct (fp32 load), LoRA r={RANK} α={2 * RANK} on all {a['adapted']} linear layers "
            f"({a['trainable']:,} trainable), AdamW lr 1e-4; batch {BATCH} × {SEQ} random token ids",
            f"- {args.rounds} timed rounds after {args.warmup} warm-up, bases interleaved round-robin, one worker "
            "process each; nf4 computes in bf16 (compute_dtype), int8 in fp16 (LLM.int8(), threshold 6.0); the "
            "rest of a quantized model (embeddings, norms, tied lm_head) stays fp32",
        ]),
        "",
        table,
    ])
    print("\n" + body)
    if args.write:
        write_section("quantized_base", "Quantized frozen base: SmolLM2 + LoRA r=16 (`bench/quantized_base.py`)",
                      body)


def movies_accuracy(base: str) -> str:
    """Test accuracy (%) of the full instruct run on this base, with its run name."""
    import json

    name = ACCURACY_RUNS[base]
    found = ROOT / "runs" / "instruct" / name / "results.json"
    if not found.exists():
        return "not run"
    return f"{100 * json.loads(found.read_text())['test_accuracy']:.2f} (`{name}`)"


def _bnb_version() -> str:
    from importlib.metadata import version

    return version("bitsandbytes")


if __name__ == "__main__":
    main()
