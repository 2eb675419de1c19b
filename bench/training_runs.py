"""End-to-end training numbers: the README demo (accuracy, time), the LoRA/rsLoRA/DoRA `compare` sweep, and the
comparison of every variant (issue 4).

Usage: `.venv/bin/python bench/training_runs.py [--part demo|compare|variants|optimizers|both] [--no-write]
[--output-dir D]`. `demo`/`compare` replace their sections of BENCHMARKS.md (the sweep's PNGs go to bench/figures/);
`variants` / `optimizers` run `lorakit compare --variant-settings docs/<variant|optimizer>_sweep.yaml` and write
docs/<variant|optimizer>_comparison.md (+ PNGs in docs/). Whole runs on real data: demo ~5 min, sweep ~15-20,
variants ~50, optimizers ~45 on 2 cores. With `--output-dir`, finished runs in that folder are reused (an
interrupted sweep continues).
"""
from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, header_lines, load_average, write_section  # noqa: E402

import lorakit.demo  # noqa: E402
from lorakit.cli import main as cli  # noqa: E402

FIGURES = ROOT / "bench" / "figures"
SWEEP = ["--variants", "lora,rslora,dora", "--lrs", "3e-4", "1e-3", "3e-3", "--seeds", "2", "--data", "vader:movies",
         "--max-train-samples", "1000", "--max-eval-samples", "500", "--r", "8", "--lora-alpha", "16",
         "--target-modules", "all-linear", "--per-device-train-batch-size", "16", "--max-length", "64",
         "--warmup-ratio", "0.06", "--disable-tqdm"]


def demo(write: bool) -> None:
    load0 = load_average()
    with tempfile.TemporaryDirectory() as out:
        got = lorakit.demo.main(["--output-dir", out])
    r = got["results"]
    body = f"""{header_lines(load0)}

`make demo` (= `python -m lorakit.demo`): all-MiniLM-L6-v2 on the VADER movie-review snippets
({r['steps']} steps of 32 = one epoch of the 7,072-sentence training split; test split 2,000 sentences).

| | test accuracy |
|---|---|
| frozen encoder: mean-pooled embeddings + logistic regression | {got['baseline_accuracy']:.4f} |
| LoRA r=8, α=16, dropout 0.05, all linear layers + head, lr 1e-3, warmup 6 %, linear decay, seed 0 | **{got['test_accuracy']:.4f}** |
| the saved adapter reloaded into a fresh model | {got['reloaded_accuracy']:.4f} |

Whole demo (data, baseline embeddings, training, evaluation, save, reload): **{got['seconds']:.0f} s**;
training alone {r['train_seconds']:.0f} s ({r['seconds_per_step']:.2f} s/step), peak RSS {r['peak_memory_mb']:.0f} MiB,
{r['trainable_parameters']:,} trainable of {r['total_parameters']:,} parameters.
"""
    print(body)
    if write:
        write_section("demo", "README demo: MiniLM on VADER movies (`bench/training_runs.py --part demo`)", body)


def compare(write: bool) -> None:
    load0 = load_average()
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        assert cli(["compare", *SWEEP, "--output-dir", out]) == 0
        seconds = time.perf_counter() - started
        table = (Path(out) / "results.md").read_text().split("\n", 2)[2]  # drop the title
        FIGURES.mkdir(parents=True, exist_ok=True)
        for name in ("accuracy_vs_lr.png", "training_curves.png"):
            shutil.copy(Path(out) / name, FIGURES / f"compare_{name}")
    body = f"""{header_lines(load0)}

`lorakit compare {' '.join(SWEEP)}`: 3 variants × 3 learning rates × 2 seeds = 18 runs of 63 steps on
1,000 training sentences, scored on 500 test sentences. **Wall time {seconds / 60:.1f} min** (target ≤ 20).

{table}
![accuracy vs learning rate](bench/figures/compare_accuracy_vs_lr.png)
![training curves](bench/figures/compare_training_curves.png)
"""
    print(body)
    if write:
        write_section("compare_sweep", "compare: LoRA vs rsLoRA vs DoRA on reduced movies "
                      "(`bench/training_runs.py --part compare`)", body)


SHARED = ["--model", "minilm", "--data", "vader:movies", "--max-train-samples", "1000", "--max-eval-samples", "500",
          "--num-train-epochs", "1", "--per-device-train-batch-size", "16", "--max-length", "64",
          "--target-modules", "all-linear", "--disable-tqdm"]
PAGES = {  # part → (settings file in docs/, seeds, page title, what the entries vary)
    "variants": ("variant_sweep.yaml", 1, "Every variant on the movies task",
                 "Each entry sets its own variant, rank, options and three learning rates"),
    "optimizers": ("optimizer_sweep.yaml", 2, "Initializations and optimizers on the movies task",
                   "Each entry is LoRA r=8 with its own initialization or optimizer and three learning rates"),
}


def sweep_page(part: str, write: bool, output_dir: str | None) -> None:
    """Run (or reuse) the part's `lorakit compare` sweep and write docs/<page>.md with its table and plots."""
    yaml_name, seeds, title, varies = PAGES[part]
    page = yaml_name.replace("_sweep.yaml", "_comparison")
    flags = ["--variant-settings", f"docs/{yaml_name}", "--seeds", str(seeds), *SHARED]
    load0 = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(output_dir or tmp)
        assert cli(["compare", *[str(ROOT / a) if a.endswith(".yaml") else a for a in flags],
                    "--output-dir", str(out)]) == 0
        with open(out / "results.csv") as f:
            rows = list(csv.DictReader(f))
        train_minutes = sum(float(r["train_seconds"]) for r in rows) / 60
        table = (out / "results.md").read_text().split("\n", 2)[2]
        for name in ("accuracy_vs_lr.png", "training_curves.png"):
            shutil.copy(out / name, ROOT / "docs" / f"{page}_{name}")
    body = f"""# {title}

{header_lines(load0)}

`lorakit compare {' '.join(flags)}` (from the repository root; `bench/training_runs.py --part {part}` runs it and
writes this page). {varies} ([{yaml_name}]({yaml_name})); everything else is shared: all-MiniLM-L6-v2 with every
linear layer adapted and the classification head trained, one epoch (63 steps of 16) on 1,000 training sentences of
VADER movies, scored on 500 test sentences, seeds 0..{seeds - 1}. Trainable parameters include the 770 of the head.
{len(rows)} runs; their training took {train_minutes:.0f} min in all (each run also loads the model and evaluates,
in its own process). *s/step* comes from runs made at different times on a shared machine: differences under
~30 % are noise.

{table}
![accuracy vs learning rate]({page}_accuracy_vs_lr.png)
![training curves]({page}_training_curves.png)
"""
    print(body)
    if write:
        (ROOT / "docs" / f"{page}.md").write_text(body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", choices=["demo", "compare", *PAGES, "both"], default="both")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--output-dir", default=None, help="variants: keep (and reuse) the runs in this folder")
    args = parser.parse_args()
    if args.part in PAGES:
        sweep_page(args.part, not args.no_write, args.output_dir)
    if args.part in ("demo", "both"):
        demo(not args.no_write)
    if args.part in ("compare", "both"):
        compare(not args.no_write)
