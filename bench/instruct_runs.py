"""SmolLM2 instruct runs on VADER movies: the acceptance command in fp32 and bf16, with the base's baselines, and on
a quantized base (nf4 with bf16 compute, int8).

Usage: `.venv/bin/python bench/instruct_runs.py [--runs fp32,fp32-repeat,bf16-baselines] [--untimed RUNS]
[--out runs/instruct] [--no-write]`. Each run is `lorakit train --model smollm2 --task instruct --data vader:movies`
with the instruct defaults (plus the flags in `RUNS`), in its own process, one after the other; a finished run
folder is reused, so a table can gather runs made at different times (make timing runs alone on the machine).
Writes the `instruct_runs` section of BENCHMARKS.md: accuracies on the full 2,000-sentence test split (label
scoring and greedy generation) beside the zero-shot / 4-shot base and the majority class, wall time, step time
and peak memory.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, header_lines, load_average, markdown_table, write_section  # noqa: E402

RUNS = {"fp32": [], "fp32-repeat": [], "bf16": ["--bf16"], "bf16-baselines": ["--bf16", "--baselines"],
        "fp32-baselines": ["--baselines"], "nf4-bf16": ["--quantize", "nf4", "--bf16"], "int8": ["--quantize", "int8"]}
# (a repeat is the same command again: its wall time is the second reading)
COMMAND = ["-m", "lorakit", "train", "--model", "smollm2", "--task", "instruct", "--data", "vader:movies"]


def run(name: str, out: Path) -> dict:
    folder = out / name
    if not (folder / "results.json").exists():
        started = time.perf_counter()
        subprocess.run([sys.executable, *COMMAND, *RUNS[name], "--output-dir", str(folder), "--disable-tqdm"],
                       cwd=ROOT, check=True)
        print(f"{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return json.loads((folder / "results.json").read_text())


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f}"  # 2,000 examples: multiples of 0.05 %


def table(results: dict[str, dict], untimed=()) -> str:
    """One row per run; the times of `untimed` runs (made while other work shared the cores) are bracketed."""
    header = ["run", "test acc. (label)", "test acc. (generation)", "unparseable", "zero-shot base (label / gen.)",
              "4-shot base (label / gen.)", "majority class", "wall time", "base / training / test min",
              "s / step", "peak RSS MiB"]
    rows = []
    for name, r in results.items():
        base = f"{pct(r.get('zero_shot_test_accuracy'))} / {pct(r.get('zero_shot_test_generation_accuracy'))}"
        shot = f"{pct(r.get('4_shot_test_accuracy'))} / {pct(r.get('4_shot_test_generation_accuracy'))}" \
            if "4_shot_test_accuracy" in r else "–"
        wall = r.get("wall_seconds")
        phases = " / ".join("–" if r.get(k) is None else f"{r[k] / 60:.1f}"
                            for k in ("baseline_seconds", "train_seconds", "final_test_seconds"))
        times = [f"{wall / 60:.1f} min" if wall else "–", phases, f"{r['seconds_per_step']:.2f}"]
        if name in untimed:
            times = [f"({t})" for t in times]
        rows.append([name, pct(r["test_accuracy"]), pct(r["test_generation_accuracy"]), pct(r["test_unparseable"]),
                     base, shot, pct(r["test_majority_class_rate"]), *times, f"{r['peak_memory_mb']:.0f}"])
    return markdown_table(header, rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="fp32,fp32-repeat,fp32-baselines,bf16-baselines,nf4-bf16,int8")
    ap.add_argument("--untimed", default="", help="runs whose times are not measurements (made on a busy machine)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "instruct"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    load0 = load_average()
    results = {name: run(name, Path(args.out)) for name in args.runs.split(",")}
    first = next(iter(results.values()))
    untimed = [n for n in args.untimed.split(",") if n]
    tab = table(results, untimed)
    print(tab)
    untimed_note = ("\nTimes in brackets are not measurements: those runs (" + ", ".join(untimed) + ") shared the "
                    "cores with other work.") if untimed else ""
    body = f"""
{header_lines(load0)}

`lorakit train --model smollm2 --task instruct --data vader:movies` (+ the run's flags: `--bf16`, `--baselines`,
`--quantize nf4|int8`) with the instruct defaults: LoRA r={first['r']} on all linear layers, lora_alpha 32,
lr {first['learning_rate']:g}, {first['steps']} steps of 16 examples, warmup 0.1, seed {first['seed']}. User message:
`Is the sentiment of this text positive or negative? Answer with one word.\\n\\n{{text}}` in SmolLM2's chat
template (its default system prompt kept); reply `positive` or `negative`. Accuracies (%) on the full movies
test split (2,000 sentences): *label* = the label whose tokens get the higher log-probability after the prompt;
*generation* = the first label word of the greedy reply (16 new tokens at most), replies without one counted wrong
and as unparseable. The base is scored the same way, zero-shot and (with `--baselines`) with 4 balanced training
examples as earlier chat turns. The wall time covers everything: loading, the base's baselines, training,
validation and the test passes; *training* includes
the final validation pass (1,000 sentences, label scoring).{untimed_note}

{tab}
"""
    if not args.no_write:
        write_section("instruct_runs", "SmolLM2 instruct runs on VADER movies (`bench/instruct_runs.py`)", body)


if __name__ == "__main__":
    main()
