"""LoRA-Squeeze experiment (issue 7): does training at a high rank and squeezing beat training at the low rank?

Per seed, on one classification task (default: MiniLM on vader:movies, subsets as the variant sweep):
- `direct`: LoRA trained at r_tgt (α = 2·r_tgt);
- `r_src`: LoRA trained at r_src (α = 2·r_src) — the source of the next two;
- `post-squeeze`: that adapter squeezed to r_tgt (`squeeze_folder`, exact QR-of-factors route), evaluated as is;
- `cont-squeeze`: the squeezed adapter trained `cont_fraction` × the run's steps more (same lr, fresh optimizer);
- `anneal`: LoRA trained from r_src with in-tuning rank annealing (`RankAnnealer`, 4 linear cuts over the first
  half of the run) down to r_tgt.
All runs use `lorakit.train.run.train` (identical data, schedule and evaluation). Writes `<out>/results.csv` and,
unless --no-write, docs/squeeze_experiment.md + docs/squeeze_experiment.png.

Usage: `.venv/bin/python bench/squeeze_experiment.py [--seeds 2] [--r-src 64] [--r-tgt 8] [--output-dir D]
[--no-write] [--set key=value ...]` (`--set` overrides any flat run setting, e.g. `--set max_train_samples=2000`).
Finished runs in --output-dir are reused.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import yaml

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

BASE = {"model": "minilm", "data": "vader:movies", "max_train_samples": 1000, "max_eval_samples": 500,
        "target_modules": "all-linear", "learning_rate": 1e-3, "num_train_epochs": 1,
        "per_device_train_batch_size": 16, "max_length": 64, "warmup_ratio": 0.06, "disable_tqdm": True,
        "save_steps": 0}
METHODS = ["direct", "r_src", "post-squeeze", "cont-squeeze", "anneal"]


def _flat(settings: dict, **more) -> dict:
    out = dict(settings)
    out.update(more)
    return out


def _train(flat: dict, hooks=(), optimizer=None) -> dict:
    from lorakit.train.args import RunConfig
    from lorakit.train.run import train

    done = Path(flat["output_dir"]) / "results.json"
    if done.is_file():
        return json.loads(done.read_text())
    return train(RunConfig.from_flat(flat), hooks=hooks, optimizer=optimizer)


def one_seed(settings: dict, seed: int, r_src: int, r_tgt: int, out: Path, cont_fraction: float) -> dict:
    """Test metrics of the five methods for one seed: {method: results dict}."""
    import torch

    import lorakit
    from lorakit.io.files import read_adapter
    from lorakit.rank import RankAnnealer, squeeze_folder
    from lorakit.train.args import RunConfig
    from lorakit.train.run import evaluate
    from lorakit.train.trainer import default_optimizer

    got = {}
    common = _flat(settings, seed=seed)
    got["direct"] = _train(_flat(common, r=r_tgt, lora_alpha=2 * r_tgt, output_dir=str(out / f"direct-{seed}")))
    src_dir = out / f"r{r_src}-{seed}"
    src_flat = _flat(common, r=r_src, lora_alpha=2 * r_src, output_dir=str(src_dir))
    got["r_src"] = _train(src_flat)
    squeezed = out / f"post-squeeze-{seed}"
    if not (squeezed / "results.json").is_file():
        squeeze_folder(src_dir / "adapter", squeezed / "adapter", target_rank=r_tgt)
        metrics = evaluate(squeezed / "adapter", RunConfig.from_flat(src_flat))
        (squeezed / "results.json").write_text(json.dumps(metrics, indent=1))
    got["post-squeeze"] = json.loads((squeezed / "results.json").read_text())

    plain, tensors = read_adapter(squeezed / "adapter")

    def load_squeezed(model):  # run.train injects a fresh adapter of the squeezed shape; start it from the squeeze
        params = lorakit.adapter_parameters(model, "default")
        with torch.no_grad():
            for key, t in params.items():
                t.copy_(tensors[key])
        return default_optimizer(model, RunConfig.from_flat(cont_flat).training)

    steps = max(1, round(cont_fraction * got["r_src"]["steps"]))
    cont_flat = _flat(common, r=plain.r, lora_alpha=plain.lora_alpha, target_modules=plain.target_modules,
                      rank_pattern=plain.rank_pattern, alpha_pattern=plain.alpha_pattern, max_steps=steps,
                      output_dir=str(out / f"cont-squeeze-{seed}"))
    got["cont-squeeze"] = _train(cont_flat, optimizer=load_squeezed)
    anneal_flat = _flat(src_flat, output_dir=str(out / f"anneal-{seed}"))
    got["anneal"] = _train(anneal_flat, hooks=[RankAnnealer(None, "default", r_target=r_tgt, cuts=4)])
    return got


def plot(rows: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for i, m in enumerate(METHODS):
        values = [r[metric] for r in rows if r["method"] == m]
        ax.scatter([i] * len(values), values, color="C0", zorder=3)
        if values:
            ax.bar(i, statistics.mean(values), color="C0", alpha=0.3)
    ax.set_xticks(range(len(METHODS)), METHODS)
    ax.set_ylabel(metric)
    lo = min(r[metric] for r in rows)
    ax.set_ylim(max(0.0, lo - 0.05), None)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--r-src", type=int, default=64)
    parser.add_argument("--r-tgt", type=int, default=8)
    parser.add_argument("--cont-fraction", type=float, default=0.1)
    parser.add_argument("--output-dir", default="out/squeeze_experiment")
    parser.add_argument("--docs-dir", default=str(Path(__file__).resolve().parent.parent / "docs"))
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--set", nargs="*", default=[], help="key=value run settings (YAML values)")
    args = parser.parse_args(argv)
    settings = dict(BASE)
    for item in args.set:
        key, _, value = item.partition("=")
        settings[key] = yaml.safe_load(value)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in range(args.seeds):
        for method, res in one_seed(settings, seed, args.r_src, args.r_tgt, out, args.cont_fraction).items():
            rows.append({"method": method, "seed": seed, **{k: v for k, v in res.items() if k.startswith("test_")}})
    metric = "test_accuracy" if "test_accuracy" in rows[0] else sorted(k for k in rows[0] if k.startswith("test_"))[0]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}, key=lambda k: (k != "method", k)))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"| method | {metric} (mean) | per seed |", "|---|---|---|"]
    for m in METHODS:
        values = [r[metric] for r in rows if r["method"] == m]
        lines.append(f"| {m} | {statistics.mean(values):.4f} | {', '.join(f'{v:.4f}' for v in values)} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        docs = Path(args.docs_dir)
        docs.mkdir(parents=True, exist_ok=True)
        plot(rows, metric, docs / "squeeze_experiment.png")
        shown = {k: v for k, v in settings.items() if k != "disable_tqdm"}
        (docs / "squeeze_experiment.md").write_text(
            f"# LoRA-Squeeze: r={args.r_tgt} directly vs r={args.r_src} squeezed (`bench/squeeze_experiment.py`)\n\n"
            f"{__doc__.split('Usage')[0].strip()}\n\nSettings: `{json.dumps(shown)}`, seeds 0..{args.seeds - 1}, "
            f"cont-squeeze steps = {args.cont_fraction} × the run's steps.\n\n{table}\n\n"
            f"![test metric per method](squeeze_experiment.png)\n")
    return rows


if __name__ == "__main__":
    main()
