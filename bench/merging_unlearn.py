"""Unlearning table of the combining issue (item 5): forget the `format` task (polarity answered in French) from the
multi-task SmolLM2 adapter, keep `polarity`, `source` and `intensity`. Rows: the untouched multi-task adapter, plain
gradient ascent, plain task-vector negation (the `format` single-task adapter as ΔW_forget, λ = 1), and MAAT
(projected ascent → SVD direction pruning → negation → KL / hidden-state repair). Columns: label-scoring accuracy on
each task's test pool (forget = format; retain = the mean of the three others).

    python bench/merging_unlearn.py [--n-eval 200] [--train] [--smoke]

Resumable: each row's adapter is saved under `runs/merging/unlearn/adapters/<row>/` (with its report) and reloaded on
a rerun; each row's accuracies are cached per task (`runs/merging/unlearn/eval/<row>.json`). Needs the trained
`multi` and `format` adapters (`bench/merging_common.ensure_adapter`); without `--train` it stops and says which are
missing. `--smoke`: random adapters in their place, one step per phase, 8 test examples (checks the plumbing only;
its numbers mean nothing; output under `runs/merging/unlearn_smoke/`).

Forget data: the first `--n-train` (64) training examples of `format`; retain data: as many of each other task
(balanced pools from `lorakit.data_tasks`), in batches of `--batch` (8) rows of one task each. Losses: the instruct
task's reply NLL (`Instruct.loss`: reply tokens and EOS only). Hyperparameters (below, `PHASES`) are first guesses,
not tuned on the test pools.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merging_common as mc  # noqa: E402

import lorakit  # noqa: E402
from lorakit.compose import unlearn as U  # noqa: E402

FORGET_TASK = "format"
RETAIN_TASKS = tuple(t for t in mc.TASKS if t != FORGET_TASK)
ASCENT = {"steps": 30, "lr": 0.05, "max_norm": 0.5, "stop_at": 4.0}  # same budget for MAAT and the baseline
PHASES = {"ascent": ASCENT, "prune": {"threshold": 0.8},
          "negation": {"forget_adapter": FORGET_TASK, "lam": 1.0},
          "repair_options": {"steps": 30, "lr": 1e-4, "kl_weight": 1.0, "hidden_weight": 1.0}}
ROWS = ("multi", "gradient-ascent", "negation", "maat")


def batches(task_obj, tasks, n: int, size: int) -> list[dict]:
    """`n` training examples of each task in `tasks`, collated in batches of `size` rows of one task, interleaved."""
    per_task = []
    for t in tasks:
        data = mc.data_tasks.task_split(t, "train", limit=n)
        rows = [data[i] for i in range(len(data))]
        per_task.append([task_obj.collate(rows[i:i + size]) for i in range(0, len(rows), size)])
    return [b for group in zip(*per_task) for b in group]


def build_row(model, row: str, forget, retain, loss_fn, folder: Path, smoke: bool) -> dict:
    """Adapter `row` on the model: loaded from `folder/row` when saved there, else computed and saved."""
    saved = folder / row
    if (saved / "adapter_config.json").is_file():
        lorakit.load_adapter(model, saved, name=row)
        return json.loads((saved / "unlearn_report.json").read_text())
    steps = (lambda opts: {**opts, "steps": 1}) if smoke else (lambda opts: opts)
    started = time.perf_counter()
    if row == "gradient-ascent":
        report = U.gradient_ascent(model, "multi", row, forget, loss_fn=loss_fn, **steps(ASCENT))
    elif row == "negation":
        report = U.negate(model, "multi", FORGET_TASK, row, **{k: v for k, v in PHASES["negation"].items()
                                                               if k != "forget_adapter"})
    elif row == "maat":
        options = {k: (steps(v) if k in ("ascent", "repair_options") else v) for k, v in PHASES.items()}
        report = U.maat(model, "multi", row, forget, retain, loss_fn=loss_fn, evaluate=False, **options)
    else:
        raise KeyError(row)
    report = {"seconds": round(time.perf_counter() - started, 1), "report": report}
    lorakit.save_adapter(model, saved, name=row)
    tmp = saved / "unlearn_report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, saved / "unlearn_report.json")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-eval", type=int, default=200, help="test examples per task (≤ 600)")
    parser.add_argument("--n-train", type=int, default=64, help="forget / retain training examples per task")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--train", action="store_true", help="train the missing multi / format adapters first")
    parser.add_argument("--smoke", action="store_true", help="random adapters, one step per phase (plumbing check)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    out = mc.OUT / ("unlearn_smoke" if args.smoke else "unlearn")
    n_eval = 8 if args.smoke else args.n_eval
    missing = [a for a in ("multi", FORGET_TASK) if not mc.is_trained(a)]
    if missing and not (args.train or args.smoke):
        print(f"adapters not trained yet: {missing}; rerun with --train (or after bench/merging.py trains them)")
        return 2
    model, _ = mc.load_base()
    if args.smoke:
        for name in ("multi", FORGET_TASK):
            lorakit.inject(model, lorakit.AdapterConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), name)
            with torch.no_grad():
                for t in lorakit.adapter_parameters(model, name).values():
                    t.add_(torch.randn_like(t) * 0.01)
    else:
        for name in ("multi", FORGET_TASK):
            lorakit.load_adapter(model, mc.ensure_adapter(name), name=name)
    task_obj = mc.make_task(RETAIN_TASKS[0])  # the instruct loss is the same for every task
    forget = batches(task_obj, [FORGET_TASK], args.n_train, args.batch)
    retain = batches(task_obj, RETAIN_TASKS, args.n_train, args.batch)
    if args.smoke:
        forget, retain = forget[:1], retain[:1]
    reports = {}
    for row in ROWS:
        if row != "multi":
            reports[row] = build_row(model, row, forget, retain, task_obj.loss, out / "adapters", args.smoke)
        lorakit.set_active(model, [row])
        reports.setdefault(row, {})["accuracy"] = {
            t: m["accuracy"] for t, m in mc.cached_row(row, lambda t: mc.evaluate(model, t, n_eval), mc.TASKS, n_eval,
                                                       out / "eval").items()}
        print(f"[{row}] {reports[row]['accuracy']}", flush=True)
    lines = [f"Unlearning `{FORGET_TASK}` from the SmolLM2 multi-task adapter; label-scoring accuracy on {n_eval} test "
             f"examples per task (`python bench/merging_unlearn.py --n-eval {n_eval}{' --smoke' if args.smoke else ''}`)"
             + (" — SMOKE RUN: random adapters, the numbers mean nothing" if args.smoke else "") + ".", "",
             f"| row | forget: {FORGET_TASK} | " + " | ".join(RETAIN_TASKS) + " | retain mean |",
             "|---|" + "---|" * (len(RETAIN_TASKS) + 2)]
    for row in ROWS:
        acc = reports[row]["accuracy"]
        keep = sum(acc[t] for t in RETAIN_TASKS) / len(RETAIN_TASKS)
        lines.append(f"| {row} | {acc[FORGET_TASK]:.3f} | " + " | ".join(f"{acc[t]:.3f}" for t in RETAIN_TASKS)
                     + f" | {keep:.3f} |")
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
