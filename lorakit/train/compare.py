"""`compare`: variants × learning rates × seeds on one task, one table and two plots.

Each run lives in `<output_dir>/runs/<variant>-lr<lr>-seed<seed>/` with its own files; a run that already has
`results.json` is reused, so an interrupted sweep continues where it stopped. The summary is
`results.csv` (one row per run, each run in its own process), `results.md` (mean ± std over seeds per variant
and learning rate, best learning rate per variant), `accuracy_vs_lr.png` (or the task's main metric) and
`training_curves.png`. For classification `results.md` also sets each accuracy beside the test split's
majority-class rate, with positive-class and macro F1, the predicted-label shares and the runs that predict a
single class. With `eval_ranks`, every run is also tested at those ranks and `results.md` gets an AURAC
table (plus `accuracy_by_rank.csv`, `aurac.json`, `accuracy_vs_rank.png`).

`full` is an entry like a variant: full fine-tuning (no adapter, every parameter trained; `lorakit.train.full`),
so `--variants lora,full` sets LoRA beside full fine-tuning (it has no rank, so no row in the AURAC table).
"""
from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import ConfigError
from ..variants import variant_names
from . import checkpoint
from .args import FULL, RunConfig
from .plots import plot_curves, plot_sweep
from .run import saved_settings, train
from .tasks import PREDICTED_SHARE, TASKS, format_number, single_class_warning
from .trainer import read_metrics

EFFECTS = "effects.json"
EFFECT_COLUMNS = {"intruders": "intruders", "intruder_layers": "layers with intruders", "ece": "ECE", "mce": "MCE",
                  "ace": "ACE", "brier": "Brier", "base_perplexity": "base perplexity (held-out)",
                  "perplexity": "perplexity (held-out)", "kl": "KL(base ‖ tuned)"}
COLUMNS = ["variant", "learning_rate", "seed", "trainable_parameters", "steps", "seconds_per_step",
           "train_seconds", "peak_memory_mb"]


def variant_settings(name: str, overrides: dict | None = None) -> dict:
    """Settings for a sweep entry: a registered variant, `rslora`, `<variant>+rslora` or `full` (full fine-tuning),
    plus `overrides` (any run settings for this entry, e.g. its own `r` or `options`; with a `variant` key the name
    is just a label)."""
    overrides = dict(overrides or {})
    if "variant" in overrides:
        return overrides
    if name == FULL:
        return {"variant": FULL, **overrides}
    base, _, extra = name.partition("+")
    if name == "rslora":
        base, extra = "lora", "rslora"
    if base not in variant_names() or extra not in ("", "rslora"):
        raise ConfigError(f"unknown variant {name!r} for compare; use one of {variant_names()}, 'rslora', "
                          f"'<variant>+rslora' or {FULL!r} (full fine-tuning)")
    return {"variant": base, "use_rslora": extra == "rslora", **overrides}


def compare(settings: dict, variants: list[str], learning_rates: list[float], seeds: list[int],
            per_variant: dict[str, dict] | None = None, analyse: bool = False,
            texts: list[str] | None = None) -> list[dict]:
    """Run every combination on the task in `settings` (flat run settings) and write the summary files.
    `per_variant`: settings that apply to one entry of `variants` only (its rank, options, targets, ..., and
    `learning_rates`, a list that replaces `learning_rates` for that entry: methods differ in their lr scale).
    `analyse`: also measure what each run did to its model (`lorakit.analysis.run_effects`: intruder dimensions,
    calibration or forgetting on held-out `texts`), cached in each run's `effects.json`, tabled in `results.md`."""
    per_variant = per_variant or {}
    unknown = sorted(set(per_variant) - set(variants))
    if unknown:
        raise ConfigError(f"per-variant settings for {unknown}, which are not in the sweep {variants}")
    specs = {v: variant_settings(v, per_variant.get(v)) for v in variants}  # refuse bad names before any run
    if not learning_rates or not seeds:
        raise ConfigError("compare needs at least one learning rate and one seed")
    out = Path(settings.get("output_dir", "compare"))
    rates = {v: [float(x) for x in specs[v].pop("learning_rates", None) or learning_rates] for v in variants}
    grid = [(v, lr, s) for v in variants for lr in rates[v] for s in seeds]
    configs = {key: RunConfig.from_flat({**settings, **specs[key[0]], "learning_rate": key[1], "seed": key[2],
                                         "output_dir": str(out / "runs" / f"{key[0]}-lr{key[1]:g}-seed{key[2]}")})
               for key in grid}
    for config in configs.values():  # refuse to mix finished runs made with other settings into this table
        _check_reusable(Path(config.training.output_dir), config)
    task = TASKS[next(iter(configs.values())).task]
    rows, curves = [], {}
    bar = tqdm(configs.items(), desc="compare", unit="run", disable=bool(settings.get("disable_tqdm")))
    for (variant, lr, seed), config in bar:
        run_dir = Path(config.training.output_dir)
        done = run_dir / "results.json"
        if done.exists():
            results = json.loads(done.read_text())
        else:  # a run stopped part-way continues from its newest checkpoint
            results = run_one(config, resume=bool(checkpoint.checkpoints(run_dir / "checkpoints")))
        results["variant"] = variant
        rows.append(results)
        curves[(variant, lr, seed)] = _losses(run_dir / "metrics.jsonl")
    metric = "test_" + task.main_metric
    _write_csv(out / "results.csv", rows, metric)
    groups = group_runs(rows, metric, select="validation_" + task.main_metric)
    best = best_learning_rates(groups, task.greater_is_better)
    (out / "results.md").write_text(summary(groups, best, metric, task.greater_is_better, settings)
                                    + class_summary(groups))
    ranks = next(iter(configs.values())).eval_ranks
    if ranks:
        table = rank_summary(groups, best, metric, ranks, out)
        (out / "results.md").write_text((out / "results.md").read_text() + table)
    if analyse:
        effects = {key: run_effects_of(config, texts) for key, config in configs.items()}
        (out / "results.md").write_text((out / "results.md").read_text() + effects_summary(groups, best, effects))
    plot_sweep(rows, out / f"{task.main_metric}_vs_lr.png", metric)
    plot_curves(curves, out / "training_curves.png", {v: lr for v, (lr, _, _) in best.items()})
    print((out / "results.md").read_text())
    return rows


def run_one(config: RunConfig, resume: bool = False) -> dict:
    """One run of a sweep, in a fresh (spawned) process: its peak memory is its own, not what earlier runs
    left in this process, and every run starts from the same clean state."""
    return in_subprocess(train, config, resume)


def in_subprocess(fn, *args):
    """fn(*args) in a fresh spawned process (its memory and torch state are its own)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def run_effects_of(config: RunConfig, texts: list[str] | None = None) -> dict:
    """`run_effects` of a finished run, read from its `effects.json` when there, else measured (in a spawned
    process) and saved there."""
    from ..analysis.run_effects import run_effects

    path = Path(config.training.output_dir) / EFFECTS
    if not path.is_file():
        effects = in_subprocess(run_effects, config.training.output_dir, config, texts)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(effects, indent=1))
        os.replace(tmp, path)
    return json.loads(path.read_text())


def effects_summary(groups: dict, best: dict, effects: dict) -> str:
    """Markdown: per variant at its best learning rate, the means over seeds of what `run_effects` measured."""
    names = [n for n in EFFECT_COLUMNS if all(n in e for e in effects.values())]
    lines = ["", "What each update did to its model (`--analyse`; means over seeds, each variant at its best "
             "learning rate): intruder dimensions (k 10, ε 0.5: among the top 10 left singular vectors of W₀ + ΔW, "
             "those with no base singular vector at |cos| ≥ 0.5) summed over the layers, the layers that have any, "
             "and, by task, calibration on the test split (ECE, MCE, ACE with 10 bins; Brier) or perplexity and "
             "KL(base ‖ tuned) on held-out text outside the task (the base's perplexity beside it).", "",
             "| variant | learning rate | " + " | ".join(EFFECT_COLUMNS[n] for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for variant, (lr, _, _) in best.items():
        runs = [e for (v, rate, _), e in effects.items() if v == variant and rate == lr]
        cells = []
        for n in names:
            value = statistics.fmean(e[n] for e in runs)
            cells.append(f"{value:.1f} of {runs[0]['layers']}" if n == "intruder_layers" else _num(value))
        lines.append(f"| {variant} | {lr:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def group_runs(rows: list[dict], metric: str, select: str | None = None) -> dict[tuple[str, float], dict]:
    """Per (variant, learning rate): the runs and the metric's mean and std over seeds; `chosen_by`: the mean of
    `select` (the metric the best learning rate is picked on), or of `metric` when a run lacks `select`."""
    groups: dict[tuple[str, float], dict] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["learning_rate"]), {"runs": []})["runs"].append(r)
    for g in groups.values():
        values = [r[metric] for r in g["runs"]]
        g["mean"], g["std"] = statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
        picked = [r.get(select, math.nan) for r in g["runs"]] if select else []
        g["chosen_by"] = statistics.fmean(picked) if picked and not any(map(math.isnan, picked)) else g["mean"]
    return groups


def best_learning_rates(groups: dict, greater_is_better: bool) -> dict[str, tuple[float, float, float]]:
    """variant → (best learning rate, mean, std): the learning rate with the best `chosen_by` (validation when
    available, so the test metric is not also the one that chose), reported with its test mean and std."""
    best: dict[str, tuple[float, float, float]] = {}
    key: dict[str, float] = {}
    for (variant, lr), g in groups.items():
        score = g.get("chosen_by", g["mean"])
        if variant not in best or math.isnan(key[variant]) or (
                score > key[variant] if greater_is_better else score < key[variant]):
            best[variant], key[variant] = (lr, g["mean"], g["std"]), score  # ties keep the first; NaN never wins
    return best


def summary(groups: dict, best: dict, metric: str, greater_is_better: bool, settings: dict) -> str:
    """Markdown: mean ± std over seeds per (variant, lr), then the best learning rate per variant."""
    lines = [f"# compare: {settings.get('model', 'minilm')} on {settings.get('data', 'vader:movies')}", "",
             f"Metric: `{metric}` (mean ± std over seeds), {'higher' if greater_is_better else 'lower'} is better.",
             "", "| variant | learning rate | seeds | " + metric + " | trainable params | s/step | peak MB |",
             "|---|---|---|---|---|---|---|"]
    for (variant, lr), g in groups.items():
        rs = g["runs"]
        step, peak = statistics.fmean(r["seconds_per_step"] for r in rs), max(r["peak_memory_mb"] for r in rs)
        lines.append(f"| {variant} | {lr:g} | {len(rs)} | {_num(g['mean'])} ± {_num(g['std'])} "
                     f"| {rs[0]['trainable_parameters']:,} | {_num(step)} | {peak:.0f} |")
    lines += ["", "Best learning rate per variant (chosen on the validation split when the runs report it):", "",
              "| variant | learning rate | " + metric + " |", "|---|---|---|"]
    lines += [f"| {v} | {lr:g} | {_num(m)} ± {_num(s)} |" for v, (lr, m, s) in best.items()]
    return "\n".join(lines) + "\n"


def class_summary(groups: dict, split: str = "test") -> str:
    """Markdown for classification sweeps ('' otherwise): per (variant, lr), accuracy beside the split's
    majority-class rate, positive-class and macro F1, the predicted-label shares (means over seeds) and how many
    runs predict a single class, then a warning naming those runs."""
    if not all(f"{split}_macro_f1" in r for g in groups.values() for r in g["runs"]):
        return ""
    mean = lambda rs, name: _num(statistics.fmean(r[f"{split}_{name}"] for r in rs))  # noqa: E731
    lines = ["", f"Classification on the {split} split: accuracy against the majority-class rate (the accuracy of "
             "always predicting the most frequent label), F1 of the positive class (label 1) and macro F1, the "
             "share of examples predicted as each label (means over seeds):", "",
             "| variant | learning rate | accuracy | majority class | f1 | macro f1 | predicted labels | "
             "single-class runs |", "|---|---|---|---|---|---|---|---|"]
    single = []
    for (variant, lr), g in groups.items():
        rs = g["runs"]
        shares = " · ".join(f"{label}: {_num(v)}" for label, v in _predicted_shares(rs, split).items())
        one = [r for r in rs if single_class_warning(r, split)]
        single += [f"{variant} lr {lr:g} seed {r.get('seed')}" for r in one]
        lines.append(f"| {variant} | {lr:g} | {mean(rs, 'accuracy')} | {mean(rs, 'majority_class_rate')} "
                     f"| {mean(rs, 'f1')} | {mean(rs, 'macro_f1')} | {shares} | {len(one)} of {len(rs)} |")
    if single:
        lines += ["", f"**Warning**: {len(single)} run(s) predict a single class for every {split} example, so their "
                  f"accuracy is only that class's share of the split: {', '.join(single)}."]
    return "\n".join(lines) + "\n"


def _predicted_shares(runs: list[dict], split: str) -> dict[str, float]:
    """label → mean share of the `split` examples predicted as it, over `runs`."""
    start = f"{split}_{PREDICTED_SHARE}"
    labels = [k.removeprefix(start) for k in runs[0] if k.startswith(start)]
    return {label: statistics.fmean(r[start + label] for r in runs) for label in labels}


def _num(value: float) -> str:
    return format_number(float(value))


def rank_summary(groups: dict, best: dict, metric: str, ranks: list[int], out: Path) -> str:
    """Each variant at its best learning rate, tested at every eval rank (mean over seeds): a Markdown table with
    AURAC v1/v2, plus `accuracy_by_rank.csv`, `aurac.json` and `accuracy_vs_rank.png` in `out`."""
    from ..analysis.aurac import write_rank_report

    best = {v: b for v, b in best.items() if all(f"{metric}@r{k}" in r for k in ranks  # (not full fine-tuning)
                                                 for r in groups[v, b[0]]["runs"])}
    curves = {v: {k: statistics.fmean(r[f"{metric}@r{k}"] for r in groups[v, lr]["runs"]) for k in ranks}
              for v, (lr, _, _) in best.items()}
    scores = write_rank_report(curves, out, metric=metric)
    lines = ["", f"{metric} by rank (each variant at its best learning rate; AURAC: area under the curve over rank "
             f"(v1) and log2 rank (v2)):", "",
             "| variant | " + " | ".join(f"r={k}" for k in ranks) + " | AURAC v1 | AURAC v2 |",
             "|---|" + "---|" * (len(ranks) + 2)]
    lines += [f"| {v} | " + " | ".join(_num(c[k]) for k in ranks) +
              f" | {_num(scores[v]['aurac_v1'])} | {_num(scores[v]['aurac_v2'])} |" for v, c in curves.items()]
    return "\n".join(lines) + "\n"


# settings that do not change a run's numbers: a finished run made with other values is still reused
_COSMETIC = {"disable_tqdm", "logging_steps", "save_steps", "per_device_eval_batch_size"}


def _check_reusable(run_dir: Path, config: RunConfig) -> None:
    import yaml

    from .args import read_yaml

    saved_file = run_dir / "run_config.yaml"
    if not saved_file.exists() or not (run_dir / "results.json").exists() and \
            not checkpoint.checkpoints(run_dir / "checkpoints"):
        return
    saved, wanted = read_yaml(saved_file), yaml.safe_load(yaml.safe_dump(saved_settings(config)))
    # a setting newer than the saved run is compared with its default (the value the run effectively had)
    defaults = yaml.safe_load(yaml.safe_dump(RunConfig().to_flat()))
    saved = {**{k: v for k, v in defaults.items() if k in wanted}, **saved}
    changed = sorted(k for k in set(saved) | set(wanted) if k not in _COSMETIC and saved.get(k) != wanted.get(k))
    if changed:
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in changed[:4])
        raise ConfigError(f"{run_dir} holds a run made with other settings ({diff}); choose another output_dir "
                          "or delete that run folder")


def _write_csv(path: Path, rows: list[dict], metric: str) -> None:
    extra = sorted({k for r in rows for k in r if k.startswith(("test_", "validation_"))})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + extra, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _losses(path: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(path)]
