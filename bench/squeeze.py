"""LoRA-Squeeze of one 4096×4096 layer from r = 64 to 8 (issue 7): the QR-of-factors route (`lorakit.rank.squeeze`,
exact, never forming ΔW) and the randomized SVD on the factors, against forming the dense ΔW = s·B·A (fp32) and
taking its full SVD (`torch.linalg.svd`) or `torch.svd_lowrank` (q = 18, niter = 2).

Usage: `.venv/bin/python bench/squeeze.py [--no-write] [--size 4096] [--rank 64] [--target 8]`. Each method runs
in a fresh process with one torch thread: median and minimum time of its runs (21; dense: 2-3 — on a shared machine the minimum is the
steadier number), peak memory = peak RSS (VmHWM, reset after
the factors are built) minus the RSS before the call, i.e. ΔW, workspaces and results. "error / optimal" =
‖s·B·A − B'A'‖_F / ‖s·B·A − [s·B·A]_8‖_F, computed from the factors afterwards (1 = the Eckart–Young optimum).
Replaces the `squeeze` section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from common import (header_lines, load_average, markdown_table, peak_rss_bytes, reset_peak_rss,  # noqa: E402
                    rss_bytes, run_subprocess, write_section)

SCALE = 2.0  # alpha / r of the source LoRA
THREADS = 1  # one intra-op thread: on the shared 2-core machine, 2 OpenMP threads made small calls jitter ~80×
METHODS = {  # label → number of timed runs
    "QR of factors, exact (fp64, lorakit default)": 21,
    "QR of factors, exact (fp32)": 21,
    "RSVD on factors (p=10, q=2, fp32)": 21,
    "dense ΔW + torch.linalg.svd (fp32)": 2,
    "dense ΔW + torch.svd_lowrank (q=18, niter=2, fp32)": 3,
}


def factors(n: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(r, n, generator=g) / n ** 0.5
    b = torch.randn(n, r, generator=g) * torch.logspace(0, -2, r)  # a decaying spectrum, as trained adapters have
    return a, b


def run_method(label: str, a: torch.Tensor, b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    from lorakit.rank import squeeze

    if label.startswith("QR") and "fp64" in label:
        return squeeze(a, b, SCALE, target_rank=k)
    if label.startswith("QR"):
        return squeeze(a, b, SCALE, target_rank=k, dtype=torch.float32)
    if label.startswith("RSVD"):
        return squeeze(a, b, SCALE, target_rank=k, method="rsvd", dtype=torch.float32,
                       generator=torch.Generator().manual_seed(1))
    delta = SCALE * (b @ a)
    if "linalg.svd" in label:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return vh[:k] * s[:k, None].sqrt(), u[:, :k] * s[:k].sqrt()
    u, s, v = torch.svd_lowrank(delta, q=k + 10, niter=2)
    return (v[:, :k] * s[:k].sqrt()).T, u[:, :k] * s[:k].sqrt()


def error_ratio(a, b, new_a, new_b, k) -> float:
    from lorakit.rank import factor_svd
    from lorakit.rank.squeeze import frobenius_sq

    a, b, new_a, new_b = a.double(), b.double(), new_a.double(), new_b.double()
    total = frobenius_sq(a, b, SCALE)
    cross = SCALE * float(((b.T @ new_b) * (a @ new_a.T)).sum())  # tr((sBA)ᵀ B'A')
    err_sq = total - 2 * cross + frobenius_sq(new_a, new_b)
    sigma = factor_svd(a, b, SCALE).s
    best_sq = float(sigma[k:].pow(2).sum())
    return max(err_sq, 0.0) ** 0.5 / best_sq ** 0.5


def child(label: str, n: int, r: int, k: int) -> dict:
    torch.set_num_threads(THREADS)
    a, b = factors(n, r)
    run_method(label, a[:, :256], b[:256], k)  # warm up kernels on a small problem
    before = rss_bytes()
    assert reset_peak_rss(), "VmHWM could not be reset"
    times = []
    for _ in range(METHODS[label]):
        t0 = time.perf_counter()
        new_a, new_b = run_method(label, a, b, k)
        times.append(time.perf_counter() - t0)
        del new_a, new_b
    peak = peak_rss_bytes() - before
    new_a, new_b = run_method(label, a, b, k)
    return dict(seconds=statistics.median(times), best=min(times), peak=peak, error=error_ratio(a, b, new_a, new_b, k),
                shape=[list(new_a.shape), list(new_b.shape)])


def main(write: bool, n: int, r: int, k: int) -> None:
    torch.set_num_threads(THREADS)  # as the children (the header reports it)
    load0 = load_average()
    rows, mib = [], 2 ** 20
    results = {}
    for label in METHODS:
        out = run_subprocess([__file__, "--child", label, "--size", str(n), "--rank", str(r), "--target", str(k)])
        results[label] = res = json.loads(out.strip().splitlines()[-1])
        print(label, res, flush=True)
    base = results["QR of factors, exact (fp64, lorakit default)"]
    for label, res in results.items():
        rows.append([label, f"{res['seconds'] * 1e3:.1f}", f"{res['best'] * 1e3:.1f}",
                     f"{res['seconds'] / base['seconds']:.2g}",
                     f"{res['peak'] / mib:.1f}", f"{res['error']:.6f}"])
    table = markdown_table(["method", "median time, ms", "min time, ms", "median / QR route (fp64)", "peak memory, MiB", "error / optimal"], rows)
    extra = [f"- Layer {n}×{n}, rank {r} → {k}, scale {SCALE}; dense ΔW alone is {n * n * 4 / mib:.0f} MiB (fp32); "
             f"the factors are {2 * n * r * 4 / mib:.1f} MiB"]
    body = f"{header_lines(load0, extra)}\n\n{__doc__.split('Usage')[0].strip()}\n\n{table}\n"
    print(body)
    if write:
        write_section("squeeze", "LoRA-Squeeze: QR of factors vs dense SVD (`bench/squeeze.py`)", body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--child", default=None)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--target", type=int, default=8)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.size, args.rank, args.target)))
    else:
        main(not args.no_write, args.size, args.rank, args.target)
