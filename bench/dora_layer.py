"""DoRA on one 4096×4096 nn.Linear: lorakit vs PEFT (inference and a training step) and DoRA vs LoRA.

Usage: `.venv/bin/python bench/dora_layer.py [--repeats N] [--quick] [--no-write]`.
Prints Markdown tables and replaces the `dora_layer` section of BENCHMARKS.md. The memory
numbers come from one subprocess per system (`--memory-child SYSTEM R`), see `memory_child`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import lorakit  # noqa: E402
from common import (Holder, compare, fmt_ms, header_lines, load_average, markdown_table, peak_rss_bytes,  # noqa: E402
                    reset_peak_rss, rss_bytes, run_subprocess, write_section)

D = 4096
TOKENS = (1, 16, 256)
RANKS = (16, 64, 384)
TRAIN_TOKENS = 2048
TRAIN_RANKS = (16, 64)
ALPHA = 16


def base_linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(D, D)


def lorakit_model(lin: nn.Linear, r: int, variant: str, seed: int = 1) -> Holder:
    """lorakit adapter on `lin` (shared, not copied): B non-zero, DoRA magnitude perturbed by ±10%."""
    model = Holder(lin)
    torch.manual_seed(seed)
    lorakit.inject(model, lorakit.AdapterConfig(r=r, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["lin"],
                                                variant=variant, init_lora_weights=False))
    if variant == "dora":
        with torch.no_grad():
            m = model.lin.adapters["default"].lora_magnitude_vector
            m.mul_(1 + 0.1 * torch.randn_like(m))
    return model


def lorakit_params(model: Holder) -> dict[str, torch.Tensor]:
    v = model.lin.adapters["default"]
    out = {"A": v.lora_A, "B": v.lora_B}
    if hasattr(v, "lora_magnitude_vector"):
        out["m"] = v.lora_magnitude_vector
    return out


def peft_model(lin: nn.Linear, r: int, source: Holder | None = None):
    """PEFT DoRA (default settings: no DoRA caching) on `lin`, with `source`'s lorakit tensors copied in."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(Holder(lin), LoraConfig(r=r, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["lin"],
                                                   use_dora=True))
    if source is not None:
        layer = model.base_model.model.lin
        src = lorakit_params(source)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(src["A"])
            layer.lora_B["default"].weight.copy_(src["B"])
            layer.lora_magnitude_vector["default"].weight.copy_(src["m"])
    return model


def peft_params(model) -> dict[str, torch.Tensor]:
    layer = model.base_model.model.lin
    return {"A": layer.lora_A["default"].weight, "B": layer.lora_B["default"].weight,
            "m": layer.lora_magnitude_vector["default"].weight}


def close(ours: torch.Tensor, ref: torch.Tensor, what: str, rel: float = 1e-5) -> float:
    """Assert max|ours − ref| ≤ rel · max(1, max|ref|); returns the relative error."""
    err = (ours - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    assert err <= rel, f"{what}: lorakit and PEFT disagree, relative error {err:.3g} > {rel:g}"
    return err


# ---- inference ---------------------------------------------------------------------------------
def bench_inference(repeats: int, tokens=TOKENS, ranks=RANKS):
    from peft.tuners.lora import dora as peft_dora

    lin = base_linear()
    rows, worst = [], 0.0
    for r in ranks:
        lk_dora = lorakit_model(lin, r, "dora").eval()
        lk_lora = lorakit_model(lin, r, "lora").eval()  # same seed: same A, B as the DoRA adapter
        peft = peft_model(lin, r, lk_dora).eval()
        peft_c = peft_model(lin, r, lk_dora).eval()  # its own DoRA cache (an uncached call clears the cache)
        variant = lk_dora.lin.adapters["default"]
        for t in tokens:
            x = torch.randn(t, D)
            with torch.no_grad():
                ref = peft(x)
                worst = max(worst, close(lk_dora(x), ref, f"DoRA r={r} T={t}"))

                def recompute():  # bump A's version counter: the cached norm is invalid, as after an optimizer step
                    variant.lora_A.add_(0)
                    return lk_dora(x)

                def peft_cached():
                    peft_dora.ENABLE_DORA_CACHING = True
                    try:
                        return peft_c(x)
                    finally:
                        peft_dora.ENABLE_DORA_CACHING = False

                # DoRA vs LoRA (and base) interleaved on their own, so PEFT's large temporaries do not
                # evict W from the cache between them; then PEFT and the uncached variants
                times = compare({"base": lambda: lin(x), "dora": lambda: lk_dora(x), "lora": lambda: lk_lora(x)},
                                warmup=3, repeats=repeats, min_seconds=1.0)
                times.update(compare({"peft": lambda: peft(x), "peft_cached": peft_cached,
                                      "dora_recompute": recompute}, warmup=2, repeats=repeats))
            rows.append(dict(r=r, T=t, **times))
        del lk_dora, lk_lora, peft, peft_c
    return rows, worst


def inference_table(rows) -> str:
    header = ["r", "T", "base Linear ms", "PEFT DoRA ms", "lorakit DoRA ms", "lorakit LoRA ms",
              "**PEFT / lorakit DoRA** (≥ 3 at T ≤ 16)", "**lorakit DoRA / LoRA** (≤ 1.2)",
              "lorakit DoRA, norm recomputed ms", "PEFT DoRA + ENABLE_DORA_CACHING ms"]
    body = []
    for x in rows:
        body.append([x["r"], x["T"], fmt_ms(x["base"]), fmt_ms(x["peft"]), fmt_ms(x["dora"]), fmt_ms(x["lora"]),
                     f"**{x['peft'] / x['dora']:.1f}×**", f"**{x['dora'] / x['lora']:.3f}**",
                     fmt_ms(x["dora_recompute"]), fmt_ms(x["peft_cached"])])
    return markdown_table(header, body)


# ---- training step -----------------------------------------------------------------------------
def make_step(model, x, target):
    """One training step (zero_grad, forward, MSE backward, AdamW step) on `model`'s trainable parameters."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        return loss

    return step


def train_data(seed: int = 2):
    torch.manual_seed(seed)
    return torch.randn(TRAIN_TOKENS, D), torch.randn(TRAIN_TOKENS, D)


def bench_training(repeats: int, ranks=TRAIN_RANKS):
    lin = base_linear()
    x, target = train_data()
    rows, worst = [], 0.0
    for r in ranks:
        lk = lorakit_model(lin, r, "dora").train()
        peft = peft_model(lin, r, lk).train()
        # correctness: one forward/backward gives the same loss and gradients
        losses = {}
        for name, model, params in (("lorakit", lk, lorakit_params(lk)), ("peft", peft, peft_params(peft))):
            model.zero_grad(set_to_none=True)
            losses[name] = torch.nn.functional.mse_loss(model(x), target)
            losses[name].backward()
            losses[name + "_grads"] = {k: p.grad.clone() for k, p in params.items()}
        worst = max(worst, close(losses["lorakit"].detach(), losses["peft"].detach(), f"loss r={r}"))
        for k in ("A", "B", "m"):
            g_ref = losses["peft_grads"][k].view_as(losses["lorakit_grads"][k])
            # gradients are tiny numbers: compare relative to the largest entry
            err = (losses["lorakit_grads"][k] - g_ref).abs().max().item() / g_ref.abs().max().item()
            assert err <= 1e-4, f"grad {k} r={r}: relative error {err:.3g}"
            worst = max(worst, err)
        times = compare({"peft": make_step(peft, x, target),
                         "lorakit": make_step(lk, x, target)}, warmup=1, repeats=repeats)
        rows.append(dict(r=r, **times))
        del lk, peft
    return rows, worst


def memory_child(system: str, r: int) -> dict:
    """Runs in its own process: RSS before any adapter exists, and peaks while building it and training.

    `rss_base` = RSS after the base Linear and the data exist; `peak_build` = peak RSS while building
    the adapter (PEFT computes the dense norm there; the PEFT child first builds the lorakit adapter
    it copies tensors from, outside this window); `peak_step` = peak RSS during 3 training steps
    (VmHWM reset after building, so the build transient is excluded). All in bytes.
    """
    lin = base_linear()
    x, target = train_data()
    rss_base = rss_bytes()
    lk = lorakit_model(lin, r, "dora").train()
    model = lk
    if system == "peft":
        reset_peak_rss()
        model = peft_model(lin, r, lk).train()
        del lk
    step = make_step(model, x, target)
    peak_build = peak_rss_bytes()
    can_reset = reset_peak_rss()
    for _ in range(3):
        step()
    return dict(rss_base=rss_base, peak_build=peak_build, peak_step=peak_rss_bytes(), reset=can_reset)


def bench_memory(ranks=TRAIN_RANKS):
    rows = []
    for r in ranks:
        res = {s: json.loads(run_subprocess([__file__, "--memory-child", s, str(r)]).strip().splitlines()[-1])
               for s in ("peft", "lorakit")}
        rows.append(dict(r=r, **res))
    return rows


def training_table(times, mem) -> str:
    mib = 2**20
    header = ["r", "PEFT step ms", "lorakit step ms", "**lorakit / PEFT time** (≤ 1.0)",
              "PEFT step peak MiB", "lorakit step peak MiB", "**lorakit / PEFT memory** (≤ 1.0)",
              "PEFT build peak MiB", "lorakit build peak MiB"]
    body = []
    for t, m in zip(times, mem):
        p, lk = m["peft"], m["lorakit"]
        assert p["reset"] and lk["reset"], "VmHWM could not be reset; step peaks would include the build"
        dp, dl = (p["peak_step"] - p["rss_base"]) / mib, (lk["peak_step"] - lk["rss_base"]) / mib
        body.append([t["r"], fmt_ms(t["peft"]), fmt_ms(t["lorakit"]), f"**{t['lorakit'] / t['peft']:.2f}**",
                     f"{dp:.0f}", f"{dl:.0f}", f"**{dl / dp:.2f}**",
                     f"{(p['peak_build'] - p['rss_base']) / mib:.0f}",
                     f"{(lk['peak_build'] - lk['rss_base']) / mib:.0f}"])
    return markdown_table(header, body)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="r=16 and T ≤ 16 only, 3 repeats, nothing written")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--memory-child", nargs=2, metavar=("SYSTEM", "R"))
    args = ap.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child[0], int(args.memory_child[1]))))
        return
    load0 = load_average()
    kw = dict(tokens=(1, 16), ranks=(16,)) if args.quick else {}
    repeats = 3 if args.quick else args.repeats
    inf, err_inf = bench_inference(repeats, **kw)
    t_inf = inference_table(inf)
    print(t_inf, flush=True)
    train, err_train = bench_training(max(3, repeats // 2), **({"ranks": (16,)} if args.quick else {}))
    mem = bench_memory(**({"ranks": (16,)} if args.quick else {}))
    t_train = training_table(train, mem)
    print()
    print(t_train)
    body = f"""
{header_lines(load0, [f"- Repeats: median of {repeats} (inference) / {max(3, repeats // 2)} (training) after warmup, "
                      "systems interleaved round-robin in one process"])}

One `nn.Linear(4096, 4096)` (fp32, bias), lora_alpha={ALPHA}, dropout 0, B non-zero and DoRA magnitudes
perturbed by ±10% (identical tensors in both systems). PEFT is `get_peft_model` with default settings
(`use_dora=True`; DoRA caching off). Outputs agree: max relative error {err_inf:.1e} (inference),
{err_train:.1e} (training loss and gradients). Inference runs in eval mode under `torch.no_grad()`.

### Inference

{t_inf}

*norm recomputed*: lorakit DoRA when A's version counter changed before the call, so the cached
row norm is rebuilt (the factored form: W·Aᵀ and A·Aᵀ, never B·A). PEFT with
`peft.tuners.lora.dora.ENABLE_DORA_CACHING = True` (off by default) is shown for reference only.

### Training step (T = {TRAIN_TOKENS}: forward + MSE backward + AdamW step)

{t_train}

Memory is measured in a fresh subprocess per system (`--memory-child SYSTEM R`). *step peak* = peak
RSS (`VmHWM`, reset through `/proc/self/clear_refs` after the adapter and optimizer exist) during 3
training steps, minus the RSS before any adapter existed (base Linear, 2048×4096 input and target
already allocated): adapter parameters, AdamW state, saved activations and temporaries. *build peak* =
peak RSS while building the adapter, minus the same base (PEFT's `update_layer` computes the dense
B·A and norm once there). `ru_maxrss` is not used because the reset also lowers it.
"""
    if not (args.quick or args.no_write):
        write_section("dora_layer", "DoRA on one 4096×4096 layer (`bench/dora_layer.py`)", body)


if __name__ == "__main__":
    main()
