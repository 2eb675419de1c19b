"""SmolLM2-135M-Instruct served in bf16 vs fp32 by lorakit's Engine, with and without adapters (issue 14).

Usage: `.venv/bin/python bench/serve.py --dtype-compare [--concurrency 1,32] [--rounds 5] [--threads 1]`
(or `bench/serve_dtype.py` with the same flags). Each call is one *run*: it appends its result to
`out/serve_dtype/runs.json` and rewrites the `serve_dtype` section of BENCHMARKS.md from the last two runs
(`--no-write`: print only).

Model: the real SmolLM2-135M-Instruct (`lorakit.models.smollm2_dir()`: Llama, 30 layers, hidden 576, 9 heads / 3 KV
heads, vocab 49152, tied embeddings). Adapters: 8 PEFT LoRA folders, r = 8 on all 7 projections, random A and
non-zero B. At concurrency C, C requests (2 at C = 1) arrive at t = 0 and at most C run at once; prompts of
U[16, 64] random token ids, 16 generated tokens each (greedy, EOS ignored); requests cycle over the adapters
(`lorakit`) or use none (`base`). tokens/s = generated tokens / wall time of the closed loop, driving
`Engine.step()` in-process (no HTTP). One warm-up round, then `--rounds` rounds; inside a round every system runs
once, in an order rotated from round to round, so load changes from other processes hit all systems alike.
Reported: median and min–max over rounds, and the bf16 / fp32 ratio paired per round (median, min–max).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# name -> (dtype, fp32_max_rows or None for the EngineConfig default, adapters?)
SYSTEMS = {
    "base fp32": ("float32", None, False),
    "base bf16": ("bfloat16", None, False),
    "lorakit fp32": ("float32", None, True),
    "lorakit bf16": ("bfloat16", None, True),
    "lorakit bf16, no fp32 copies": ("bfloat16", 0, True),
}
ABLATION_AT = (1,)  # the no-copies ablation only differs from the default at steps of <= fp32_max_rows rows
TARGETS = {"bf16 ≥ 1.5× fp32 at ≥ 32 requests": (32, 1.5), "bf16 ≥ 0.95× fp32 at 1 request": (1, 0.95)}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_adapters(root: Path, model_dir: str, n: int = 8, rank: int = 8) -> list[Path]:
    from serve_workloads import Dims, write_adapter

    dims = Dims.from_config(json.loads((Path(model_dir) / "config.json").read_text()))
    paths = []
    for i in range(n):
        path = root / f"smollm2-r{rank}-{i}"
        if not (path / "adapter_model.safetensors").is_file():
            write_adapter(path, dims, rank, ALL_LINEAR, seed=1000 + i, base_model=model_dir)
        paths.append(path)
    return paths


def make_requests(c: int, vocab: int, seed: int, output: int = 16):
    g = torch.Generator().manual_seed(seed)
    n = max(2, c)
    lengths = torch.randint(16, 65, (n,), generator=g).tolist()
    return [(torch.randint(100, vocab, (k,), generator=g).tolist(), output) for k in lengths]


def run_once(runner, system: str, c: int, prompts, paths: list[Path]) -> float:
    """Generated tokens / s of one closed loop of `prompts` with at most `c` requests running."""
    from lorakit.serve import Engine, EngineConfig, Request, SamplingParams

    _, rows, adapters = SYSTEMS[system]
    opts = dict(max_num_seqs=c, memory_bytes=1 << 30, load_workers=0, max_loras=len(paths))
    if rows is not None:
        opts["fp32_max_rows"] = rows
    engine = Engine(runner, EngineConfig(**opts))
    names = []
    if adapters:
        for i, p in enumerate(paths):
            engine.register_adapter(f"a{i}", str(p))
        names = [f"a{i}" for i in range(len(paths))]
        engine.generate([Request([5, 6, 7], n, SamplingParams(max_tokens=1)) for n in names])  # loaded: not timed
    reqs = [Request(list(ids), names[i % len(names)] if names else None,
                    SamplingParams(max_tokens=out, ignore_eos=True)) for i, (ids, out) in enumerate(prompts)]
    t = time.perf_counter()
    engine.generate(reqs)
    elapsed = time.perf_counter() - t
    engine.close()
    return sum(len(r.output_ids) for r in reqs) / elapsed


def measure(args) -> dict:
    from lorakit.models import smollm2_dir
    from lorakit.serve.llama import LlamaRunner

    torch.set_num_threads(args.threads)
    model_dir = smollm2_dir()
    paths = make_adapters(args.out / "adapters", model_dir)
    by_dtype = {dtype: LlamaRunner.from_dir(model_dir, dtype) for dtype in {d for d, _, _ in SYSTEMS.values()}}
    runners = {system: by_dtype[dtype] for system, (dtype, _, _) in SYSTEMS.items()}
    vocab = by_dtype["float32"].dims.vocab
    cells = [(c, s) for c in args.concurrency for s in SYSTEMS if "no fp32" not in s or c in ABLATION_AT]
    results = {f"{c}|{s}": [] for c, s in cells}
    load0, t0 = os.getloadavg(), time.perf_counter()
    for rnd in range(args.rounds + 1):  # round 0 warms up (oneDNN primitives per shape, page cache)
        shift = rnd % len(cells)
        for c, system in cells[shift:] + cells[:shift]:
            tps = run_once(runners[system], system, c, make_requests(c, vocab, seed=c), paths)
            if rnd:
                results[f"{c}|{system}"].append(tps)
        log(f"round {rnd}/{args.rounds} done, {time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.1f}")
    return {"results": results, "threads": args.threads, "rounds": args.rounds, "load_start": load0,
            "load_end": os.getloadavg(), "seconds": time.perf_counter() - t0,
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "concurrency": args.concurrency}


def summarize(run: dict) -> tuple[list[list[str]], dict]:
    """Table rows of one run and its paired bf16/fp32 ratios {(c, 'lorakit' | 'base'): [per-round ratios]}."""
    res = run["results"]
    rows, ratios = [], {}
    for c in run["concurrency"]:
        for kind in ("base", "lorakit"):
            f32, b16 = res.get(f"{c}|{kind} fp32"), res.get(f"{c}|{kind} bf16")
            if f32 and b16:
                ratios[c, kind] = [b / f for b, f in zip(b16, f32)]
        for system in SYSTEMS:
            tps = res.get(f"{c}|{system}")
            if not tps:
                continue
            dtype = "bf16" if "bf16" in system else "fp32"
            kind = system.split()[0]
            f32 = res.get(f"{c}|{kind} fp32")
            vs_fp32 = _ratio_cell([b / f for b, f in zip(tps, f32)]) if dtype == "bf16" and f32 else "1"
            base = res.get(f"{c}|base {dtype}")
            vs_base = _ratio_cell([a / b for a, b in zip(tps, base)]) if kind == "lorakit" and base else "–"
            rows.append([str(c), system, f"{statistics.median(tps):.1f}", f"{min(tps):.1f}–{max(tps):.1f}",
                         vs_fp32, vs_base])
    return rows, ratios


def _ratio_cell(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}× ({min(values):.2f}–{max(values):.2f})"


def target_lines(runs: list[dict]) -> list[str]:
    """Each target, judged on the paired lorakit bf16 / fp32 medians of every run shown: met only if all meet it."""
    lines = []
    for text, (c_min, goal) in TARGETS.items():
        per_run = []
        for run in runs:
            ratios = summarize(run)[1]
            cs = [c for c in run["concurrency"] if (c >= c_min if c_min > 1 else c == 1) and (c, "lorakit") in ratios]
            per_run += [(c, statistics.median(ratios[c, "lorakit"])) for c in cs]
        if not per_run:
            continue
        worst = min(v for _, v in per_run)
        got = ", ".join(f"{v:.2f}× (C = {c})" for c, v in per_run)
        verdict = "**met**" if worst >= goal else f"**not met** (worst {worst:.2f}×, {goal - worst:.2f} short)"
        lines.append(f"- {text}: {verdict} — lorakit bf16 / fp32, median of paired rounds, per run: {got}")
    return lines


def section(runs: list[dict]) -> str:
    from common import machine_info, markdown_table

    torch.set_num_threads(runs[-1]["threads"])
    parts = [*machine_info(),
             "- Model: SmolLM2-135M-Instruct (`lorakit.models.smollm2_dir()`, 30 layers, hidden 576, vocab 49152); "
             "8 adapters r = 8 on all 7 projections; prompts U[16, 64] tokens, 16 generated tokens per request, "
             "greedy; C requests at t = 0 (2 at C = 1), at most C running; `Engine.step()` driven in-process",
             "- *bf16 / fp32* and *vs base alone*: ratio paired per round (same round, same dtype for base), median "
             "and min–max over the rounds; tokens/s: median and min–max over the rounds",
             "- `lorakit bf16` uses the default `fp32_max_rows` = 4 (steps of ≤ 4 rows run on fp32 copies of the "
             "layer weights; the LM head stays bf16); `no fp32 copies` is fp32_max_rows = 0"]
    body = ["\n".join(parts), ""]
    body += target_lines(runs) + [""]
    for i, run in enumerate(runs, 1):
        la, lb = run["load_start"], run["load_end"]
        body.append(f"### Run {i} of {len(runs)} ({run['date']}; {run['rounds']} rounds after a warm-up round, "
                    f"torch threads {run['threads']}, {run['seconds'] / 60:.1f} min; load average 1/5/15 min "
                    f"{la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} at start, {lb[0]:.2f} / {lb[1]:.2f} / {lb[2]:.2f} "
                    f"at end on {os.cpu_count()} cores{' — other processes were running' if max(la[0], lb[0]) > 1.5 else ''})")
        body.append("")
        body.append(markdown_table(["C", "system", "tokens/s (median)", "min–max", "bf16 / fp32", "vs base alone"],
                                   summarize(run)[0]))
        body.append("")
    return "\n".join(body)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", default="1,32", help="comma-separated concurrent request counts")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the CPU is shared)")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "serve_dtype")
    ap.add_argument("--keep", type=int, default=2, help="runs shown in BENCHMARKS.md (the latest ones)")
    ap.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    run = measure(args)
    store = args.out / "runs.json"
    runs = json.loads(store.read_text()) if store.exists() else []
    runs.append(run)
    store.write_text(json.dumps(runs, indent=1))
    text = section(runs[-args.keep:])
    print(text)
    if not args.no_write:
        from common import write_section

        write_section("serve_dtype", "Serving SmolLM2 in bf16 vs fp32 (`bench/serve.py --dtype-compare`)", text)
        log("wrote the serve_dtype section of BENCHMARKS.md")


if __name__ == "__main__":
    main()
