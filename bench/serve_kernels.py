"""The engine's LoRA kernels for decode rows: fused (`lorakit.kernels`, the default where it is built) vs the eager
per-adapter segments and rank-bucketed bmm (where the eager path switches: `bmm_min_adapters`).

One fused q/k/v projection of the benchmark model (hidden 1024 → 3 × 1024), decode rows, one row per adapter, n
distinct adapters of rank r. Times the LoRA add-on only (the base GEMM is the same for both): `segment` (two
small GEMMs per adapter plus one per module), `bmm` with stacks reused from the previous step (the set of
adapters did not change) and rebuilt (it did), and `fused` (one shrink and one expand per module for all rows).
Also the base GEMM of those rows, for scale.

Usage: `.venv/bin/python bench/serve_kernels.py [--quick] [--no-write]`; replaces the `serve_kernels` section of
BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from lorakit import kernels  # noqa: E402
from common import compare, header_lines, load_average, markdown_table, write_section  # noqa: E402
from lorakit.serve.adapters import AdapterSpec, GroupWeights, LoadedAdapter  # noqa: E402
from lorakit.serve.lora import LoraStep, Segment, StackCache  # noqa: E402

HIDDEN = 1024


def adapter(i: int, r: int) -> LoadedAdapter:
    g = torch.Generator().manual_seed(i)
    parts = [(k * r, (k + 1) * r, k * HIDDEN, (k + 1) * HIDDEN, torch.randn(r, HIDDEN, generator=g) * 0.01)
             for k in range(3)]
    group = GroupWeights.of(torch.randn(3 * r, HIDDEN, generator=g), parts)
    spec = AdapterSpec(f"a{i}", "", {}, {}, 0)
    return LoadedAdapter(spec, {(0, "qkv"): group}, 0)


def measure(n: int, r: int, repeats: int) -> dict[str, float]:
    adapters = [adapter(i, r) for i in range(n)]
    segments = [Segment(a, i, i + 1, True) for i, a in enumerate(adapters)]
    x = torch.randn(n, HIDDEN)
    w = torch.randn(3 * HIDDEN, HIDDEN)
    out = torch.zeros(n, 3 * HIDDEN)
    warm = StackCache()

    def run(kernel, stacks):
        LoraStep(segments, stacks, kernel, bmm_min_adapters=1).apply(0, "qkv", x, out)

    run("bmm", warm)
    fns = {"base GEMM": lambda: torch.nn.functional.linear(x, w),
           "segment": lambda: run("segment", StackCache()),
           "bmm, stacks reused": lambda: run("bmm", warm),
           "bmm, stacks rebuilt": lambda: run("bmm", StackCache()),
           "fused": lambda: run("fused", warm)}
    with torch.inference_mode():
        return compare(fns, warmup=3, repeats=repeats, min_seconds=0.3)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with kernels.using("compiled"):
        kernels.sgmv()
    load = load_average()
    counts, ranks = ((1, 4, 16), (8,)) if args.quick else ((1, 2, 4, 8, 16, 32, 64), (8, 64))
    rows, crossover = [], {}
    for r in ranks:
        for n in counts:
            t = measure(n, r, 3 if args.quick else 9)
            reused = t["bmm, stacks reused"]
            rows.append([r, n] + [f"{t[k] * 1e6:.0f}" for k in t]
                        + [f"{t['segment'] / reused:.2f}", f"{reused / t['fused']:.2f}"])
            if t["bmm, stacks reused"] < t["segment"] and r not in crossover:
                crossover[r] = n
            print(rows[-1], flush=True)
    table = markdown_table(["rank", "adapters", "base GEMM µs", "segment µs", "bmm reused µs", "bmm rebuilt µs",
                            "fused µs", "segment / bmm reused", "bmm reused / fused"], rows)
    notes = ["- Smallest adapter count where bmm (stacks reused) beats segments: "
             + ", ".join(f"r={r}: {n}" for r, n in crossover.items())
             + " (the eager path's default `bmm_min_adapters` is 4;\n  with the compiled kernels, `auto` runs"
             " `fused`)."]
    body = header_lines(load, ["- One fused q/k/v projection (1024 → 3072), one decode row per adapter, fp32, "
                               "2 threads; median µs of the LoRA add-on alone (base GEMM shown for scale)"]) + \
        "\n\n" + table + "\n\n" + "\n".join(notes)
    print(body)
    if not args.no_write:
        write_section("serve_kernels",
                      "Serving kernels for decode: fused, segments, rank-bucketed bmm (bench/serve_kernels.py)", body)


if __name__ == "__main__":
    main()
