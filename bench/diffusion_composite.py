"""LoRA Composite in a diffusers sampling loop: N separate UNet passes per step vs one batched pass (the batch stacked
N times, each copy routed to its LoRA with `lorakit.route`), for N = 2, 3, 4 LoRAs on the attention projections.

Usage: `.venv/bin/python bench/diffusion_composite.py [--rounds 7] [--steps 3] [--threads N] [--smoke]`.
Times whole `sample()` runs of `--steps` DDIM steps (CFG, batch 1 → 2 UNet rows per LoRA), the two modes and all N
interleaved round by round (the order alternates between rounds); reports ms per step, median and min–max over the
rounds, and batched / separate (ratio of the medians, and the min–max of the per-round ratios). Prints a Markdown
table and replaces the `diffusion_composite` section of BENCHMARKS.md (not with `--smoke` / `--no-write`).
Two UNet configs: the tests' fixed one and a larger one. `--smoke`: one round of one step on the test UNet only.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine_info, markdown_table, write_section  # noqa: E402
from lorakit.compose.diffusion import Composite, add_random_loras, sample, tiny_unet  # noqa: E402

CONFIGS = {  # the tests' fixed UNet (per-call overhead dominates) and a larger one (compute dominates)
    "test": dict(sample_size=8, block_out_channels=(32, 64), cross_attention_dim=32),
    "medium": dict(sample_size=32, block_out_channels=(64, 128), cross_attention_dim=64),  # one CFG pass ≈ 100 ms
}
COUNTS = (2, 3, 4)
TOKENS, GUIDANCE = 16, 7.5


def setup(config: dict) -> tuple:
    """The UNet with max(COUNTS) LoRAs, a DDIM scheduler, and fixed latents / prompt embeddings."""
    from diffusers import DDIMScheduler

    unet = add_random_loras(tiny_unet(**config), [f"l{i}" for i in range(max(COUNTS))])
    gen = torch.Generator().manual_seed(0)
    size, dim = config["sample_size"], config["cross_attention_dim"]
    latents = torch.randn(1, 4, size, size, generator=gen)
    cond, uncond = torch.randn(2, 1, TOKENS, dim, generator=gen)
    return unet, DDIMScheduler(), latents, cond, uncond


def timed(args, n: int, batched: bool, steps: int) -> float:
    unet, scheduler, latents, cond, uncond = args
    schedule = Composite([f"l{i}" for i in range(n)], batched=batched)
    start = time.perf_counter()
    sample(unet, scheduler, latents, cond, uncond, steps, GUIDANCE, schedule)
    elapsed = time.perf_counter() - start
    assert schedule.passes == (1 if batched else n) * steps
    return elapsed / steps


def measure(args, rounds: int, steps: int, warmup: int) -> dict[tuple[int, bool], list[float]]:
    """Seconds per step for each (N, batched), interleaved; the first `warmup` rounds are dropped."""
    times = {(n, b): [] for n in COUNTS for b in (False, True)}
    for r in range(warmup + rounds):
        keys = list(times) if r % 2 == 0 else list(reversed(times))
        for n, batched in keys:
            dt = timed(args, n, batched, steps)
            if r >= warmup:
                times[(n, batched)].append(dt)
    return times


def table(times: dict[tuple[int, bool], list[float]]) -> str:
    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1e3:.1f} ({min(values) * 1e3:.1f}–{max(values) * 1e3:.1f})"

    rows = []
    for n in COUNTS:
        sep, bat = times[(n, False)], times[(n, True)]
        ratios = [b / s for s, b in zip(sep, bat)]
        rows.append([n, ms(sep), ms(bat), f"{statistics.median(bat) / statistics.median(sep):.2f} "
                     f"({min(ratios):.2f}–{max(ratios):.2f})"])
    return markdown_table(["LoRAs N", "separate: N passes, ms/step", "batched: 1 pass, ms/step",
                           "batched / separate"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--smoke", action="store_true", help="one round of one step on the tiny test UNet")
    parser.add_argument("--no-write", action="store_true", help="print only (default: also BENCHMARKS.md)")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    rounds, steps, warmup = (1, 1, 0) if opts.smoke else (opts.rounds, opts.steps, 1)
    load = load_average()
    tables = []
    for label, config in CONFIGS.items():
        if opts.smoke and label != "test":
            continue
        with torch.no_grad():
            times = measure(setup(config), rounds, steps, warmup)
        tables.append(f"### {label} UNet: {config}\n\n{table(times)}")
    body = "\n".join([
        *machine_info(),
        f"- diffusers {version('diffusers')}; UNet2DConditionModel, 4 latent channels, layers_per_block 1; "
        f"LoRAs r=4 on to_q/to_k/to_v/to_out.0; DDIM, CFG {GUIDANCE}, batch 1 (2 UNet rows per LoRA), float32",
        f"- {rounds} rounds of {steps}-step sample() runs, interleaved ({warmup} warm-up round dropped); "
        f"median (min–max) over the rounds; target (composition issue): batched / separate ≤ 0.9",
        f"- Load average (1/5/15 min) at start: {load}, at end: {load_average()}", "", "\n\n".join(tables)])
    print(body)
    if not (opts.smoke or opts.no_write):
        write_section("diffusion_composite", "LoRA Composite: N separate UNet passes vs one batched pass "
                      "(`bench/diffusion_composite.py`)", body)


if __name__ == "__main__":
    main()
