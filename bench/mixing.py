"""Per-token composition cost: 4 adapters on disjoint token masks vs 1 adapter on every token (`lorakit.route(model,
weights=...)`), whole-model forward, fp32. Target (composition issue): ≤ 1.3× the one-adapter forward.

Usage: `.venv/bin/python bench/mixing.py [--rounds 7] [--only llama|smollm2] [--no-write] [--smoke]`.
Rows: *base* (no adapter), *one adapter* (active on every token), *4 on disjoint masks* (each sequence's tokens cut
into 4 consecutive spans, one adapter each: regional masks), *4 on random disjoint tokens* (each token one adapter
drawn at random), *4 soft on every token* (dense weights: every adapter runs on every token, the price of a soft
mixture). Times are medians over interleaved rounds; ratios are paired per round (median and min–max).
Replaces the `mixing` section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import lorakit  # noqa: E402
from common import fmt_ms, header_lines, load_average, markdown_table, ratio_spread, timed_rounds, write_section  # noqa: E402
from mixed_batch import llama as llama_1024  # noqa: E402

N_ADAPTERS, R = 4, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def with_adapters(model, seed: int = 0):
    torch.manual_seed(seed)
    for i in range(N_ADAPTERS):
        lorakit.inject(model, lorakit.AdapterConfig(r=R, lora_alpha=2 * R, init_lora_weights=False,
                                                    target_modules=TARGETS), f"a{i}")
    return model.eval()


def masks(rows: int, tokens: int, kind: str) -> dict[str, torch.Tensor]:
    if kind == "spans":
        owner = (torch.arange(tokens) * N_ADAPTERS // tokens).expand(rows, tokens)
    else:
        owner = torch.randint(0, N_ADAPTERS, (rows, tokens), generator=torch.Generator().manual_seed(0))
    return {f"a{i}": owner == i for i in range(N_ADAPTERS)}


def cases(model, ids):
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    spans, scattered = masks(*ids.shape, "spans"), masks(*ids.shape, "random")
    soft = torch.full((1, N_ADAPTERS), 1.0 / N_ADAPTERS)

    def base():
        with lorakit.disabled(model):
            return model(input_ids=ids).logits

    def one():
        lorakit.set_active(model, ["a0"])
        return model(input_ids=ids).logits

    def mixed(**kw):
        def run():
            with lorakit.route(model, **kw):
                return model(input_ids=ids).logits
        return run

    return {"base": base, "one adapter": one, "4 on disjoint masks": mixed(weights=spans),
            "4 on random disjoint tokens": mixed(weights=scattered),
            "4 soft on every token": mixed(weights=soft, adapters=names)}


def check(model, ids) -> None:
    """The adapters change the output and the mixes run (their exactness is tested in tests/test_mixing.py)."""
    fns = cases(model, ids)
    with torch.no_grad():
        outs = {k: fn() for k, fn in fns.items()}
    assert not torch.allclose(outs["one adapter"], outs["base"], atol=1e-3), "adapters do not change the output"
    assert torch.isfinite(outs["4 on disjoint masks"]).all()


def bench(label: str, model, ids, rounds: int) -> tuple[str, list[list]]:
    check(model, ids)
    with torch.no_grad():
        times = timed_rounds(cases(model, ids), warmup=2, repeats=rounds)
    rows = []
    for name, ts in times.items():
        rows.append([name, fmt_ms(statistics.median(ts)), f"{fmt_ms(min(ts))}–{fmt_ms(max(ts))}",
                     ratio_spread(ts, times["base"]), ratio_spread(ts, times["one adapter"])])
    head = ["case", "ms (median)", "min–max ms", "/ base (paired)", "**/ one adapter** (≤ 1.3 for masks)"]
    return f"### {label}, input {tuple(ids.shape)}\n\n" + markdown_table(head, rows), rows


def smollm2():
    from lorakit.models import load_model

    model, _ = load_model("smollm2", "causal-lm", tokenizer=False)
    return model.float()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--only", choices=["llama", "smollm2"], default=None)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="2 rounds, small inputs, nothing written")
    args = ap.parse_args()
    load0 = load_average()
    rounds = 2 if args.smoke else args.rounds
    rows, tokens = (4, 16) if args.smoke else (16, 64)
    ids = torch.randint(1, 1000, (rows, tokens), generator=torch.Generator().manual_seed(1))
    out = []
    if args.only in (None, "llama"):
        text, _ = bench("Random Llama, hidden 1024, 4 layers, MLP 2816", with_adapters(llama_1024()), ids, rounds)
        out.append(text)
        print(text, flush=True)
    if args.only in (None, "smollm2"):
        text, _ = bench("SmolLM2-135M-Instruct (fp32, 30 layers, hidden 576)", with_adapters(smollm2()), ids, rounds)
        out.append(text)
        print(text, flush=True)
    body = f"""
{header_lines(load0, [f"- Rounds: {rounds} timed after 2 warmup, all cases interleaved round-robin in one process"])}

{N_ADAPTERS} LoRA adapters (r {R}, α {2 * R}, random non-zero B) on {', '.join(TARGETS)}; `torch.no_grad()`, eval
mode, fp32. *4 on disjoint masks*: `with lorakit.route(model, weights={{name: bool mask}})`, each sequence's
tokens cut into 4 consecutive spans; *random disjoint*: each token's adapter drawn at random; *soft*: weights
1/4 for every adapter on every token. Ratios are per round (paired), median and min–max.

{chr(10).join(o + chr(10) for o in out)}"""
    if not (args.smoke or args.no_write or args.only):
        write_section("mixing", "Per-token composition (`bench/mixing.py`)", body)


if __name__ == "__main__":
    main()
