"""Gradient checkpointing on SmolLM2-135M-Instruct with LoRA r=16 on all linear layers: peak RSS and step time with
and without it (fp32, CPU, batch 16 × 64 tokens, causal-LM loss on random token ids, AdamW on the adapter).

Usage: `.venv/bin/python bench/gradient_checkpointing.py` (prints a Markdown table; writes nothing). Memory: each
configuration runs in a fresh process: RSS after loading the model, adapter and batch, then the peak RSS (VmHWM,
reset after loading) over 3 training steps, which holds the saved activations, gradients, optimizer state and
temporaries; the step-1 loss shows the configurations compute the same. Time: one more process switches
checkpointing on and off between steps, round-robin (1 warm-up round, then the median of 5 steps per
configuration), so that load changes on a shared machine hit all configurations alike.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from common import header_lines, load_average, markdown_table, peak_rss_bytes, reset_peak_rss, rss_bytes, \
    run_subprocess  # noqa: E402

BATCH, SEQ, RANK, MEMORY_STEPS, WARMUP, TIMED = 16, 64, 16, 3, 1, 5
CONFIGS = {  # label → gradient_checkpointing_kwargs, or None for no checkpointing
    "no checkpointing": None,
    "checkpointing, non-reentrant (lorakit train)": {"use_reentrant": False},
    "checkpointing, reentrant": {"use_reentrant": True},
}


def setup():
    """SmolLM2 (fp32, train mode) with LoRA r=16 on all linear layers, a batch, and AdamW on the adapter."""
    import lorakit
    from lorakit.models import load_model

    model, _ = load_model("smollm2", "causal-lm")
    model = model.float().train()
    torch.manual_seed(0)
    lorakit.inject(model, lorakit.AdapterConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, ids, opt


def configure(model, label: str) -> None:
    kwargs = CONFIGS[label]
    if kwargs is None:
        model.gradient_checkpointing_disable()
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def step(model, ids, opt) -> tuple[float, float]:
    """One training step: (seconds, loss)."""
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, loss.item()


def memory_child(label: str) -> dict:
    model, ids, opt = setup()
    configure(model, label)
    rss_load = rss_bytes()
    assert reset_peak_rss(), "VmHWM could not be reset"
    losses = [step(model, ids, opt)[1] for _ in range(MEMORY_STEPS)]
    return dict(rss_load=rss_load, peak=peak_rss_bytes(), loss1=losses[0])


def timing_child() -> dict:
    model, ids, opt = setup()
    times = {label: [] for label in CONFIGS}
    for round_ in range(WARMUP + TIMED):
        for label in CONFIGS:
            configure(model, label)
            seconds = step(model, ids, opt)[0]
            print(f"round {round_}, {label}: {seconds:.2f} s", file=sys.stderr, flush=True)
            if round_ >= WARMUP:
                times[label].append(seconds)
    return {label: statistics.median(t) for label, t in times.items()}


def main() -> None:
    load0 = load_average()
    mib, rows, mem = 2**20, [], {}
    for label in CONFIGS:
        mem[label] = json.loads(run_subprocess([__file__, "--memory", label]).strip().splitlines()[-1])
        print(f"{label}: {mem[label]}", file=sys.stderr, flush=True)
    times = json.loads(run_subprocess([__file__, "--timing"]).strip().splitlines()[-1])
    base = times["no checkpointing"]
    for label, r in mem.items():
        rows.append([label, f"{r['rss_load'] / mib:.0f}", f"{(r['peak'] - r['rss_load']) / mib:.0f}",
                     f"{r['peak'] / mib:.0f}", f"{times[label]:.2f}", f"{times[label] / base:.2f}",
                     f"{r['loss1']:.6f}"])
    table = markdown_table(["configuration", "RSS after load, MiB", "step peak − RSS after load, MiB",
                            "peak RSS, MiB", "step time (median of 5), s", "time / no checkpointing",
                            "step-1 loss"], rows)
    print(f"{header_lines(load0)}\n\n{__doc__.split('Usage')[0].strip()}\n\n{table}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--memory", default=None, help="(internal) measure one configuration's memory")
    parser.add_argument("--timing", action="store_true", help="(internal) time all configurations, round-robin")
    args = parser.parse_args()
    if args.memory:
        print(json.dumps(memory_child(args.memory)))
    elif args.timing:
        print(json.dumps(timing_child()))
    else:
        main()
