"""LoRA training step on SmolLM2-135M-Instruct, fp32 and bf16 bases: lorakit vs PEFT, with a per-op breakdown.

Usage: `.venv/bin/python bench/llm_train_step.py [--repeats N] [--no-write]`. Prints a Markdown table and replaces
the `llm_train_step` section of BENCHMARKS.md.

Both systems: LoRA r=16, lora_alpha=32, all linear layers (not lm_head), dropout 0, fp32 adapter weights and AdamW
state; the same batch of 16 VADER movie instructions in SmolLM2's chat template, cut to 64 tokens (left padded), loss
on the reply tokens. Both get the logits only where the loss needs them (`logits_to_keep`, given as position indices
so the head multiplies one contiguous (rows·positions, hidden) matrix: with a count, torch's matmul broadcasts
the 49152×576 head weight over the 16 rows, 0.5 s of a fp32 step and 1.3 s of a bf16 one), so the comparison is
of the adapter path. PEFT keeps fp32 adapters on a bf16 base and runs their matmuls in fp32
(`autocast_adapter_dtype`); lorakit runs them in bf16 with fp32 master weights. The four configurations are
timed round-robin in one process.

A second table times the step `lorakit train` takes (`Instruct.loss`) on the same 16 instructions uncut (the
instruct default `max_length` 256): whole rows, and with the 41-token prefix every row shares (system prompt and
instruction) run once and its keys/values repeated over the rows (`Instruct.share_prefix`, the default).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compare, fmt_ms, header_lines, load_average, markdown_table, write_section  # noqa: E402

R, ALPHA, BATCH, TOKENS, LR = 16, 32, 16, 64, 1e-3
SYSTEMS = ("lorakit fp32", "peft fp32", "lorakit bf16", "peft bf16")
TRAINER = tuple(f"{d}, {rows}" for d in ("fp32", "bf16") for rows in ("whole rows", "shared prefix"))


def make_task(tokenizer, max_length: int):
    """(the instruct task, a batch of the first BATCH training instructions)."""
    from lorakit.data import load_data
    from lorakit.train.tasks import make_task

    data = load_data("vader:movies", "instruct")
    task = make_task("instruct", tokenizer, max_length, 2, data.train.choices)
    return task, task.collate([data.train[i] for i in range(BATCH)])


def make_batch(tokenizer):
    batch = make_task(tokenizer, TOKENS)[1]
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def build(system: str):
    from lorakit.models import load_model

    model, tokenizer = load_model("smollm2", "instruct")
    model = model.to(torch.bfloat16 if system.endswith("bf16") else torch.float32)
    torch.manual_seed(0)
    if system.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    else:
        import lorakit

        lorakit.inject(model, lorakit.AdapterConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                                                    task_type="CAUSAL_LM"))
    return model.train(), tokenizer


def make_step(model, batch):
    """forward (logits at the reply positions only) + cross-entropy + backward + AdamW step + zero_grad."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=LR)
    labels = batch["labels"]
    span = labels.shape[1] - int((labels != -100).int().argmax(-1).min())
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    width = labels.shape[1]
    keep = torch.arange(width - span - 1, width)  # indices, not a count: see `Instruct._forward`

    def step():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=position_ids, logits_to_keep=keep).logits
        loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, -span:], ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def make_trainer_step(model, task, batch, share_prefix: bool):
    """The trainer's step: `Instruct.loss` + backward + AdamW step + zero_grad."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step():
        task.share_prefix = share_prefix
        loss = task.loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def profile(step, rows: int = 12) -> str:
    """The top ops of one step by self CPU time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:rows]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return markdown_table(["op", "calls", "self CPU ms", "share"], [
        [f"`{e.key}`", e.count, f"{e.self_cpu_time_total / 1e3:.0f}", f"{e.self_cpu_time_total / total:.1%}"]
        for e in events])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    load0 = load_average()
    steps, laps = {}, {s: [] for s in SYSTEMS + TRAINER}
    batch = None
    for s in SYSTEMS:
        model, tokenizer = build(s)
        batch = batch or make_batch(tokenizer)
        steps[s] = make_step(model, batch)
        if s.startswith("lorakit"):
            task, uncut = make_task(tokenizer, 256)
            for t in TRAINER:
                if t.startswith(s.split()[1]):
                    steps[t] = make_trainer_step(model, task, uncut, t.endswith("shared prefix"))

    def timed(system):
        def run():
            import time

            t0 = time.perf_counter()
            steps[system]()
            laps[system].append(time.perf_counter() - t0)
        return run

    compare({s: timed(s) for s in SYSTEMS + TRAINER}, warmup=args.warmup, repeats=args.repeats)
    times = {s: laps[s][args.warmup:] for s in SYSTEMS + TRAINER}
    med = {s: statistics.median(t) for s, t in times.items()}
    rows = [[s, fmt_ms(med[s]), f"{fmt_ms(min(times[s]))}–{fmt_ms(max(times[s]))}"] for s in SYSTEMS]
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))  # noqa: E731
    targets = [["lorakit bf16 / lorakit fp32 (≤ 0.5)", f"{med['lorakit bf16'] / med['lorakit fp32']:.3f}",
                f"per-round median {ratio('lorakit bf16', 'lorakit fp32'):.3f}"],
               ["lorakit bf16 / PEFT bf16 (≤ 1.0)", f"{med['lorakit bf16'] / med['peft bf16']:.3f}",
                f"per-round median {ratio('lorakit bf16', 'peft bf16'):.3f}"],
               ["lorakit fp32 / PEFT fp32", f"{med['lorakit fp32'] / med['peft fp32']:.3f}",
                f"per-round median {ratio('lorakit fp32', 'peft fp32'):.3f}"]]
    table = markdown_table(["system", "step ms (median)", "min–max ms"], rows + targets)
    trainer_rows = [[t, fmt_ms(med[t]), f"{fmt_ms(min(times[t]))}–{fmt_ms(max(times[t]))}"] for t in TRAINER]
    trainer_rows += [[f"{d}: shared prefix / whole rows", f"{med[f'{d}, shared prefix'] / med[f'{d}, whole rows']:.3f}",
                      f"per-round median {ratio(f'{d}, shared prefix', f'{d}, whole rows'):.3f}"]
                     for d in ("fp32", "bf16")]
    trainer_table = markdown_table(["lorakit trainer step (uncut rows)", "step ms (median)", "min–max ms"],
                                   trainer_rows)
    ops = {s: profile(steps[s]) for s in ("lorakit fp32", "lorakit bf16", "peft bf16")}
    print(table)
    print(trainer_table)
    for s, t in ops.items():
        print(f"\n{s}\n{t}")
    tokens = int(batch["attention_mask"].sum())
    body = f"""
{header_lines(load0, [f"- Repeats: {args.repeats} timed rounds after {args.warmup} warmup rounds, the four "
                      "configurations round-robin in one process"])}

SmolLM2-135M-Instruct (the dequantized Q4_1 file, see `lorakit.models`), LoRA r={R}, lora_alpha={ALPHA}, all linear
layers, dropout 0; {BATCH} VADER movie instructions in the chat template cut to {TOKENS} tokens ({tokens} real tokens),
loss on the reply tokens with logits only there. Step = forward + cross-entropy + backward + AdamW (fp32 state) +
`zero_grad`. PEFT 0.21.2 runs its fp32 adapters in fp32 on the bf16 base; lorakit casts them to bf16 for the
matmuls (fp32 master weights).

{table}

{trainer_table}

Per-op breakdown of one step (torch.profiler, self CPU time, top ops):

lorakit fp32

{ops['lorakit fp32']}

lorakit bf16

{ops['lorakit bf16']}

PEFT bf16

{ops['peft bf16']}
"""
    if not args.no_write:
        write_section("llm_train_step", "LoRA training step on SmolLM2, fp32 and bf16 (`bench/llm_train_step.py`)",
                      body)


if __name__ == "__main__":
    main()
