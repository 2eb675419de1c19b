"""Learned combination weights for a task whose adapter is not in the pool, from 32 labelled examples of it, against
the controls "The Appeal and Reality of Recycling LoRAs" (Liu et al. 2026) shows are needed (the combining issue,
item 4; `lorakit.compose.learn`).

Setup (SmolLM2-135M-Instruct, bf16 base, fp32 adapters; tasks on VADER sentences, `merging_common`):
- target task T (`--target`, default "format": polarity answered in French); pool = the other task adapters
  (default polarity, source, intensity — with "format" held out, polarity is a highly relevant adapter in the pool;
  `--target intensity` or `source` gives a pool without one);
- few-shot set: the first 32 examples of T's train pool (class-balanced, seeded), 4 batches of 8, loss = the
  instruct task's reply cross-entropy (`Instruct.loss`, chat template, SmolLM2's default system prompt);
- budget: the search runs 40 objective evaluations (40 forward passes over the 32 examples); the gradient rows run
  20 epochs = 80 steps of 8, about the same compute (a forward + backward step costs ≈ 2.2 forwards on this CPU);
- evaluation: label-scoring accuracy on T's test pool (`merging_common.evaluate`, ≤ 600 examples).

Rows: base zero-shot; LoraHub search (delta space, w ∈ [−1.5, 1.5], l1 0.05, (1+1)-ES, budget 40, seed 0);
LoraHub search in the reference's factor space ((Σ wB)(Σ wA)); gradient per-layer scalars (init 1/N, AdamW lr
1e-2, 80 steps); uniform average; best single adapter (lowest few-shot loss); a random-LoRA pool (the pool's
configs, random A and B, each layer's ‖ΔW‖_F = the real pool's mean) searched the same way; a fresh LoRA (the pool's
config: r 16, α 32, all linear layers) trained on the same 32 examples, AdamW lr 1e-3, 80 steps of 8.

Usage: `.venv/bin/python bench/merging_learned.py [--target format] [--n 600] [--no-train] [--rows a,b]`.
Resumable: adapters are `lorakit train` runs reused by `merging_common.ensure_adapter`; each row's metrics (and its
learned weights and search trace) are cached in `runs/merging/learned/<target>/<row>.json` and a re-run computes only
the missing rows. Rows whose adapters are not trained are skipped with a note (`--no-train`), or trained first.
The table is printed and written to `runs/merging/learned/<target>/table.md`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merging_common as C  # noqa: E402

SHOTS = 32
BATCH = 8
BUDGET = 40  # objective evaluations = passes over the few-shot set
EPOCHS = 20  # gradient rows: about the search's compute (a forward+backward step of 8 costs ≈ 2.2 forwards of 8 here)
SEED = 0
ROWS = ("base", "lorahub", "lorahub_factor", "scalars", "uniform", "best_single", "random_pool", "fresh")
NOTES = {
    "base": "zero-shot, no adapter",
    "lorahub": f"(1+1)-ES on Σ wᵢΔWᵢ, w ∈ [−1.5, 1.5], l1 0.05, {BUDGET} evaluations",
    "lorahub_factor": f"the same search on (Σ wᵢBᵢ)(Σ wᵢAᵢ) (LoraHub's own mix), {BUDGET} evaluations",
    "scalars": f"per-layer λ, init 1/N, AdamW lr 1e-2, {EPOCHS} epochs",
    "uniform": "Σ ΔWᵢ / N",
    "best_single": "the pool adapter with the lowest few-shot loss",
    "random_pool": "random LoRAs (pool configs, matched ‖ΔW‖ per layer), searched as lorahub",
    "fresh": f"new LoRA (pool config), AdamW lr 1e-3, {EPOCHS} epochs",
}


def few_shot(task: str, tokenizer_task):
    data = C.task_data(task).train
    examples = [data[i] for i in range(SHOTS)]
    return [tokenizer_task.collate(examples[i:i + BATCH]) for i in range(0, SHOTS, BATCH)]


def run_row(row, model, pool, batches, loss_fn, target: str, n):
    """Build the row's adapter on `model` (or none), evaluate it on the target task; returns (metrics, extra)."""
    import lorakit
    from lorakit.compose import learn
    from lorakit.compose.fit import mean_loss
    from lorakit.compose.unlearn import fit_adapter

    new, extra = f"learned_{row}", {}
    began = time.perf_counter()
    if row == "lorahub":
        r = learn.learn_weights(model, pool, batches, new, loss_fn, budget=BUDGET, seed=SEED)
        extra = dict(weights=dict(zip(pool, r.weights)), objective=r.objective, few_shot_loss=r.loss, trace=r.trace)
    elif row == "lorahub_factor":
        r = learn.learn_weights(model, pool, batches, new, loss_fn, space="lorahub", budget=BUDGET, seed=SEED)
        extra = dict(weights=dict(zip(pool, r.weights)), objective=r.objective, few_shot_loss=r.loss, trace=r.trace)
    elif row == "scalars":
        r = learn.learn_scalars(model, pool, batches, new, loss_fn, steps=EPOCHS * len(batches), lr=1e-2)
        mean = {p: sum(lam[p] for lam in r.weights.values() if p in lam) / len(r.weights) for p in pool}
        extra = dict(mean_weights=mean, few_shot_loss_before=r.loss_before, few_shot_loss=r.loss_after,
                     trace=r.trace[::len(batches)])
    elif row == "uniform":
        learn.uniform_average(model, pool, new)
        extra = dict(few_shot_loss=mean_loss(model, batches, loss_fn))
    elif row == "best_single":
        best, losses = learn.best_single(model, pool, batches, loss_fn)
        learn.mix(model, [best], [1.0], new)
        extra = dict(chosen=best, few_shot_losses=losses)
    elif row == "random_pool":
        randoms = [n for n in lorakit.adapter_names(model) if n.startswith("random")]
        if not randoms:
            randoms = learn.random_pool(model, pool, seed=SEED)
        r = learn.learn_weights(model, randoms, batches, new, loss_fn, budget=BUDGET, seed=SEED)
        extra = dict(weights=r.weights, objective=r.objective, few_shot_loss=r.loss, trace=r.trace)
    elif row == "fresh":
        config = lorakit.get_config(model, pool[0])
        trace = fit_adapter(model, new, config, batches, steps=EPOCHS * len(batches), lr=1e-3, loss_fn=loss_fn,
                            seed=SEED)["loss"]
        extra = dict(trace=trace[::len(batches)], few_shot_loss=mean_loss(model, batches, loss_fn))
    extra["build_seconds"] = round(time.perf_counter() - began, 1)
    print(f"[{row}] built in {extra['build_seconds']} s: "
          f"{ {k: v for k, v in extra.items() if k not in ('trace',)} }", file=sys.stderr, flush=True)
    try:
        if row == "base":
            with lorakit.disabled(model):
                metrics = C.evaluate(model, target, n)
        else:
            lorakit.set_active(model, [new])
            metrics = C.evaluate(model, target, n)
    finally:
        if new in lorakit.adapter_names(model):
            lorakit.delete_adapter(model, new)
    return metrics, extra


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="format", choices=C.TASKS)
    p.add_argument("--n", type=int, default=600, help="test examples (class-balanced, ≤ 600)")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--no-train", action="store_true", help="skip rows whose adapters are not trained yet")
    args = p.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    pool = [t for t in C.TASKS if t != args.target]
    folder = C.OUT / "learned" / args.target
    folder.mkdir(parents=True, exist_ok=True)

    missing = [a for a in pool if not C.is_trained(a)]
    if missing and args.no_train:
        print(f"adapters not trained yet: {missing}; only the base row runs", file=sys.stderr)
        rows = [r for r in rows if r == "base"]
    import lorakit

    results = {}
    model = None
    for row in rows:
        path = folder / f"{row}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("n_requested") == args.n:
                results[row] = saved
                continue
        if model is None:
            model, _ = C.load_base()
            task = C.make_task(args.target)
            batches = few_shot(args.target, task)
            if row != "base" or len(rows) > 1:
                for name in pool:
                    lorakit.load_adapter(model, C.ensure_adapter(name), name=name)
        metrics, extra = run_row(row, model, pool, batches, task.loss, args.target, args.n)
        results[row] = {**metrics, **extra, "n_requested": args.n}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results[row], indent=1))
        tmp.replace(path)
        print(f"[{row}] accuracy {metrics['accuracy']:.4f} on {metrics['n']} ({metrics['seconds']} s)",
              file=sys.stderr, flush=True)

    lines = [f"Target task **{args.target}** (its adapter not in the pool; pool: {', '.join(pool)}), {SHOTS} "
             f"labelled train examples, label-scoring accuracy on its test pool.", "",
             "| row | accuracy | macro F1 | few-shot loss | weights / choice | what |", "|---|---|---|---|---|---|"]
    for row in rows:
        r = results.get(row)
        if r is None:
            continue
        w = r.get("weights") or r.get("mean_weights") or r.get("chosen") or ""
        if isinstance(w, dict):
            w = ", ".join(f"{k} {v:+.2f}" for k, v in w.items())
        elif isinstance(w, list):
            w = ", ".join(f"{v:+.2f}" for v in w)
        loss = r.get("few_shot_loss")
        lines.append(f"| {row} | {r['accuracy']:.4f} | {r.get('macro_f1', float('nan')):.4f} | "
                     f"{'' if loss is None else f'{loss:.4f}'} | {w} | {NOTES[row]} |")
    table = "\n".join(lines)
    (folder / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
