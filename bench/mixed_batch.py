"""Mixed-batch LoRA inference: each row its own adapter. Base model vs PEFT `adapter_names` vs `lorakit.route`.

Usage: `.venv/bin/python bench/mixed_batch.py [--repeats N] [--quick] [--no-write] [--threads N]`.
Prints Markdown tables and replaces the `mixed_batch` section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import copy
import random
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import lorakit  # noqa: E402
from common import Holder, compare, fmt_ms, header_lines, load_average, markdown_table, write_section  # noqa: E402
from lorakit.layers import AdaptedLayer  # noqa: E402

HIDDEN, LAYERS, HEADS, MLP, VOCAB = 1024, 4, 16, 2816, 1024
ROWS, TOKENS, R, ALPHA = 64, 16, 16, 32
ADAPTER_COUNTS = (4, 16, 64)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {"q/k/v/o": (HIDDEN, HIDDEN), "gate/up": (HIDDEN, MLP), "down": (MLP, HIDDEN)}  # (d_in, d_out)


def flop_overhead(d_in: int, d_out: int, r: int = R) -> float:
    return r * (d_in + d_out) / (d_in * d_out)


def model_flop_overhead() -> float:
    """LoRA FLOPs / base FLOPs over the adapted Linears of one decoder layer (attention scores and head excluded)."""
    count = {"q/k/v/o": 4, "gate/up": 2, "down": 1}
    lora = sum(c * R * sum(SHAPES[k]) for k, c in count.items())
    base = sum(c * SHAPES[k][0] * SHAPES[k][1] for k, c in count.items())
    return lora / base


def llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=HEADS, intermediate_size=MLP, vocab_size=VOCAB,
                      max_position_embeddings=4 * TOKENS, tie_word_embeddings=False, use_cache=False)
    return LlamaForCausalLM(cfg).eval()


ORDERS = ("shuffled", "grouped")


def row_names(n: int, order: str, seed: int = 0) -> list[str]:
    """ROWS names, each of the n adapters on ROWS/n rows: shuffled with a fixed seed, or grouped by adapter
    (as a server that sorts its batch by adapter would send them)."""
    names = [f"a{i % n}" for i in range(ROWS)]
    random.Random(seed).shuffle(names)
    return sorted(names, key=lambda a: int(a[1:])) if order == "grouped" else names


def add_lorakit_adapters(model: nn.Module, n: int, targets) -> nn.Module:
    """n random adapters (B non-zero), each with its own seed."""
    for i in range(n):
        torch.manual_seed(1000 + i)
        lorakit.inject(model, lorakit.AdapterConfig(r=R, lora_alpha=ALPHA, target_modules=targets,
                                                    init_lora_weights=False), f"a{i}")
    return model.eval()


def peft_copy(base: nn.Module, lk_model: nn.Module, n: int, targets, root=lambda m: m):
    """A PEFT model on a copy of `base` holding the same n adapters (tensors copied from lorakit)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, lora_dropout=0.0)
    peft = get_peft_model(copy.deepcopy(base), cfg, adapter_name="a0")
    for i in range(1, n):
        peft.add_adapter(f"a{i}", cfg)
    inner = root(peft)
    copied = 0
    with torch.no_grad():
        for path, layer in lk_model.named_modules():
            if isinstance(layer, AdaptedLayer):
                target = inner.get_submodule(path)
                for name, v in layer.adapters.items():
                    target.lora_A[name].weight.copy_(v.lora_A)
                    target.lora_B[name].weight.copy_(v.lora_B)
                    copied += 1
    assert copied == n * sum(isinstance(m, AdaptedLayer) for m in lk_model.modules())
    return peft.eval()


def check(ours: torch.Tensor, ref: torch.Tensor, base: torch.Tensor, what: str) -> float:
    """lorakit ≈ PEFT (relative 1e-5), and the adapters really change the output."""
    scale = max(1.0, ref.abs().max().item())
    err = (ours - ref).abs().max().item() / scale
    assert err <= 1e-5, f"{what}: lorakit vs PEFT relative error {err:.3g}"
    assert (ref - base).abs().max().item() / scale > 1e-3, f"{what}: adapters do not change the output"
    return err


def bench_model(base: nn.Module, targets, forward, counts, repeats: int, label: str, **timing):
    """Time base / PEFT / lorakit on `forward(model, **extra)` for each adapter count and row order."""
    rows, worst = [], 0.0
    for n in counts:
        lk = add_lorakit_adapters(copy.deepcopy(base), n, targets)
        peft = peft_copy(base, lk, n, targets, root=lambda p: p.base_model.model)
        for order in ORDERS:
            names = row_names(n, order)

            def run_lk():
                with lorakit.route(lk, names):
                    return forward(lk)

            def run_peft():
                return forward(peft, adapter_names=names)

            with torch.no_grad():
                worst = max(worst, check(run_lk(), run_peft(), forward(base), f"{label} n={n} {order}"))
                times = compare({"base": lambda: forward(base), "peft": run_peft, "lorakit": run_lk},
                                repeats=repeats, **timing)
            rows.append(dict(n=n, order=order, **times))
        del lk, peft
    return rows, worst


def bench_llama(counts, repeats: int):
    torch.manual_seed(5)
    ids = torch.randint(0, VOCAB, (ROWS, TOKENS))
    return bench_model(llama(), TARGETS, lambda m, **kw: m(input_ids=ids, **kw).logits, counts, repeats, "llama",
                       warmup=2)


def bench_linear(counts, repeats: int):
    torch.manual_seed(0)
    holder = Holder(nn.Linear(HIDDEN, HIDDEN))
    x = torch.randn(ROWS, TOKENS, HIDDEN)
    return bench_model(holder, ["lin"], lambda m, **kw: m(x, **kw), counts, repeats, "linear",
                       warmup=3, min_seconds=1.5)


def table(rows, theory: str) -> str:
    header = ["adapters", "rows", "base ms", "PEFT ms", "lorakit ms", "PEFT overhead", "lorakit overhead",
              "**lorakit / PEFT overhead** (≤ 0.33 at 16+)", "**lorakit / base** (≤ 1.15)", "FLOP overhead"]
    body = []
    for x in rows:
        op, ol = x["peft"] / x["base"] - 1, x["lorakit"] / x["base"] - 1
        body.append([x["n"], x["order"], fmt_ms(x["base"]), fmt_ms(x["peft"]), fmt_ms(x["lorakit"]), f"{op:+.1%}", f"{ol:+.1%}",
                     f"**{ol / op:.2f}**" if op > 0 else "n/a (PEFT ≤ base)", f"**{x['lorakit'] / x['base']:.3f}**",
                     theory])
    return markdown_table(header, body)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="4 and 16 adapters, 3 repeats, nothing written")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--only", choices=["llama", "linear"], default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = load_average()
    counts = (4, 16) if args.quick else ADAPTER_COUNTS
    repeats = 3 if args.quick else args.repeats
    out, errs = [], []
    theory_llama = (", ".join(f"{k} {flop_overhead(*s):.2%}" for k, s in SHAPES.items())
                    + f"; layer total {model_flop_overhead():.2%}")
    if args.only in (None, "llama"):
        rows, err = bench_llama(counts, repeats)
        errs.append(err)
        out.append(f"### LlamaForCausalLM (hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads, MLP {MLP}, vocab {VOCAB})"
                   f"\n\n{table(rows, theory_llama)}")
        print(out[-1], flush=True)
    if args.only in (None, "linear"):
        rows, err = bench_linear(counts, repeats)
        errs.append(err)
        out.append(f"### One nn.Linear({HIDDEN}, {HIDDEN}), input ({ROWS}, {TOKENS}, {HIDDEN})\n\n"
                   f"{table(rows, f'{flop_overhead(HIDDEN, HIDDEN):.2%}')}")
        print(out[-1], flush=True)
    body = f"""
{header_lines(load0, [f"- Repeats: median of {repeats} after warmup, base/PEFT/lorakit interleaved round-robin in one process"])}

{ROWS} rows × {TOKENS} tokens, LoRA r={R} (alpha {ALPHA}, random non-zero B) on {', '.join(TARGETS)}; each
of the n adapters gets {ROWS}/n rows, *shuffled* (fixed seed) or *grouped* by adapter (the order a server that
sorts its batch sends; lorakit then needs no gather or scatter at all). *base* is a plain copy
of the model without adapters; PEFT is `model(input_ids, adapter_names=[...])` on a PeftModel holding all
n adapters; lorakit is `with lorakit.route(model, names): model(input_ids)`. Overhead = time/base − 1.
*FLOP overhead* = r(d_in+d_out)/(d_in·d_out), the extra multiply-adds of the LoRA path per adapted layer.
lorakit and PEFT outputs agree (max relative error {max(errs):.1e}); eval mode, `torch.no_grad()`,
`use_cache=False`.

{chr(10).join(o + chr(10) for o in out)}"""
    if not (args.quick or args.no_write or args.only):
        write_section("mixed_batch", "Mixed-batch LoRA (`bench/mixed_batch.py`)", body)


if __name__ == "__main__":
    main()
