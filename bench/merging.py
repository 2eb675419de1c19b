"""Merging SmolLM2 LoRA adapters trained on four distinct instruct tasks on VADER text: one table of label-scoring
accuracy on all four tasks for the base (zero-shot), each single-task adapter, the multi-task adapter, the
per-domain polarity adapters, and adapters merged by every method of `lorakit.compose.merge_adapters`.

Usage: `.venv/bin/python bench/merging.py [--n 600] [--rows base,polarity,...] [--train-only] [--no-train]
[--no-write]`.

Resumable: (a) each adapter is one `lorakit train` run in `runs/merging/adapters/<name>/`, skipped when finished
(`merging_common.ensure_adapter`); (b) each row's metrics are cached in `runs/merging/eval/<row>.json` (per task and
test size), so a re-run computes only the missing rows; (c) writes `docs/merging.md`. A merge method that
`lorakit.compose.METHODS` does not list (or a merge API that is not there) is skipped with a printed note.
The rows are the list `ROWS` below.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merging_common as C  # noqa: E402

TASKS = C.TASKS
N_DEFAULT = 300  # test examples per task (class-balanced; ≤ 600): 24 rows × ~2 min on 2 shared cores
POOL = TASKS  # the four task adapters merged in the merge rows
DOMAIN_POOL = C.DOMAIN_ADAPTERS  # the near-duplicate pool (per-domain polarity adapters)
RANK = 64  # target rank of merges whose result is full-rank (element-wise methods): Σ rᵢ of the four adapters


@dataclasses.dataclass
class Row:
    name: str
    adapters: tuple = ()  # active adapters (none: the base)
    merge: dict | None = None  # merge_adapters arguments: names, weights, method, and options
    note: str = ""


def merged(name, method, names=POOL, weight=1.0, note="", **options) -> Row:
    return Row(name, merge=dict(names=tuple(names), weights=[weight] * len(names), method=method, **options),
               note=note)


ROWS = [
    Row("base", note="zero-shot, no adapter"),
    *[Row(t, (t,), note="single-task adapter") for t in TASKS],
    Row("multi", ("multi",), note="one adapter trained on the mix of the four tasks"),
    # merges of the four task adapters
    merged("cat", "cat", note="exact Σ ΔWᵢ (task arithmetic, λ = 1), rank 64"),
    merged("linear-mean", "linear", weight=0.25, note="exact mean of the ΔWᵢ (weights 1/4)"),
    merged("ties", "ties", density=0.2, target_rank=RANK, note="TIES on ΔW, density 0.2, weights 1, rank 64"),
    merged("dare_linear", "dare_linear", density=0.5, target_rank=RANK, note="DARE (p = 0.5) then Σ, rank 64"),
    merged("dare_ties", "dare_ties", density=0.5, target_rank=RANK, note="DARE (p = 0.5) then TIES, rank 64"),
    merged("della", "della", density=0.5, target_rank=RANK, note="DELLA, density 0.5, rank 64"),
    merged("magnitude_prune", "magnitude_prune", density=0.5, target_rank=RANK,
           note="top-50 % entries of each ΔWᵢ by magnitude, then Σ, rank 64"),
    merged("breadcrumbs", "breadcrumbs", density=0.5, target_rank=RANK, note="Breadcrumbs, density 0.5, rank 64"),
    merged("lego", "lego", note="LoRA-LEGO (rank-1 units clustered)"),
    merged("knots", "knots", density=0.5, target_rank=RANK, note="KnOTS (shared SVD basis, TIES on coefficients)"),
    merged("peft_linear", "peft_linear", note="PEFT's factor-level linear (A and B combined separately)"),
    merged("peft_svd", "peft_svd", target_rank=RANK, note="PEFT's svd mode, rank 64"),
    # the near-duplicate pool: per-domain polarity adapters, alone and merged
    *[Row(d, (d,), note="per-domain polarity adapter") for d in DOMAIN_POOL],
    merged("domains-linear-mean", "linear", names=DOMAIN_POOL, weight=0.25,
           note="exact mean of the four per-domain polarity adapters"),
    merged("domains-ties", "ties", names=DOMAIN_POOL, density=0.2, target_rank=RANK,
           note="TIES of the four per-domain polarity adapters"),
]


def methods_available():
    """(merge_adapters or None, set of method names); a note when the API is not there."""
    try:
        from lorakit import compose
        return compose.merge_adapters, set(compose.METHODS)
    except (ImportError, AttributeError) as e:
        print(f"note: lorakit.compose.merge_adapters / METHODS not available ({e}); merged rows skipped",
              file=sys.stderr)
        return None, set()


def needed_adapters(rows) -> list[str]:
    out = []
    for row in rows:
        for name in (*row.adapters, *(row.merge["names"] if row.merge else ())):
            if name not in out:
                out.append(name)
    return out


class Evaluator:
    """One base model with the adapters loaded on demand; `row_results(row)` evaluates a row on all tasks."""

    def __init__(self, n: int | None):
        self.n = n
        self.model = None
        self.merge_fn, self.methods = methods_available()

    def _model(self):
        if self.model is None:
            self.model, _ = C.load_base()
        return self.model

    def _load(self, names):
        import lorakit

        model = self._model()
        for name in names:
            if name not in lorakit.adapter_names(model):
                lorakit.load_adapter(model, C.adapter_run(name) / "adapter", name=name)
        return model

    def skip_reason(self, row: Row) -> str | None:
        missing = [a for a in needed_adapters([row]) if not C.is_trained(a)]
        if missing:
            return f"adapters not trained yet: {', '.join(missing)}"
        if row.merge:
            if self.merge_fn is None:
                return "lorakit.compose.merge_adapters is not available yet"
            if row.merge["method"] not in self.methods:
                return f"merge method {row.merge['method']!r} is not in lorakit.compose.METHODS yet"
        return None

    def row_results(self, row: Row) -> dict:
        import lorakit

        path = C.EVAL_DIR / f"{row.name}.json"
        saved = json.loads(path.read_text()) if path.is_file() else {}
        if all(saved.get(t, {}).get("n_requested") == self.n for t in TASKS):
            return saved
        model = self._load(needed_adapters([row]))
        extra = {}
        if row.merge:
            spec = dict(row.merge)
            names, weights, method = spec.pop("names"), spec.pop("weights"), spec.pop("method")
            new = f"merged_{row.name}"
            if new in lorakit.adapter_names(model):
                lorakit.delete_adapter(model, new)
            began = time.perf_counter()
            report = self.merge_fn(model, list(names), list(weights), new, method=method, **spec)
            extra = {"merge_seconds": round(time.perf_counter() - began, 1), "merge_report": _summary(report),
                     "merge_args": {"names": list(names), "weights": list(weights), "method": method, **spec}}
            active = [new]
        else:
            active = list(row.adapters)
        try:
            def compute(task):
                print(f"[eval {row.name} / {task}]", file=sys.stderr, flush=True)
                if active:
                    lorakit.set_active(model, active)
                    r = C.evaluate(model, task, self.n)
                else:
                    with lorakit.disabled(model):
                        r = C.evaluate(model, task, self.n)
                print(f"  accuracy {r['accuracy']:.4f} ({r['n']} ex., {r['seconds']:.0f} s)", file=sys.stderr)
                return r
            results = C.cached_row(row.name, compute, TASKS, self.n)
        finally:
            if row.merge:
                lorakit.delete_adapter(model, new)
        if extra:
            saved = json.loads(path.read_text())
            saved.update(extra)
            path.write_text(json.dumps(saved, indent=1))
            results.update(extra)
        return results


def _summary(report):
    """Something JSON-able from a merge report: for lorakit's per-layer dict {layer: {rank, error, from_sum, ...}},
    the layer count and the mean / max of each numeric field; else its dict, a summary method, or its text."""
    if isinstance(report, dict) and report and all(isinstance(v, dict) for v in report.values()):
        fields = {}
        for layer in report.values():
            for key, value in layer.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    fields.setdefault(key, []).append(float(value))
        return {"layers": len(report), **{f"{k}_mean": sum(v) / len(v) for k, v in fields.items()},
                **{f"{k}_max": max(v) for k, v in fields.items()}}
    for attr in ("summary", "to_dict", "as_dict"):
        f = getattr(report, attr, None)
        if callable(f):
            try:
                value = f()
                json.dumps(value)
                return value
            except (TypeError, ValueError):
                pass
    if dataclasses.is_dataclass(report):
        try:
            value = dataclasses.asdict(report)
            json.dumps(value)
            return value
        except (TypeError, ValueError):
            pass
    if isinstance(report, dict):
        try:
            json.dumps(report)
            return report
        except (TypeError, ValueError):
            pass
    return str(report)[:4000]


def one_class(metrics: dict, share: float = 0.95) -> bool:
    """Whether a row predicts (nearly) one label for every test example of a task (≥ `share` of them)."""
    return max(v for k, v in metrics.items() if k.startswith("predicted_share_")) >= share


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def table(rows, results: dict, skipped: dict) -> str:
    header = ["row", *TASKS, "mean", "what"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    majority = None
    for r in results.values():  # the majority-class rate of each task's test set (the same for every row)
        majority = {t: r[t]["majority_class_rate"] for t in TASKS}
        break
    if majority:
        mean = sum(majority.values()) / len(TASKS)
        lines.append("| majority class | " + " | ".join(pct(majority[t]) for t in TASKS) + f" | {pct(mean)} | "
                     "always the test set's most frequent label |")
    for row in rows:
        if row.name in results:
            r = results[row.name]
            accs = [r[t]["accuracy"] for t in TASKS]
            cells = [pct(r[t]["accuracy"]) + (" †" if one_class(r[t]) else "") for t in TASKS]
            lines.append(f"| {row.name} | " + " | ".join(cells) + f" | {pct(sum(accs) / len(accs))} | "
                         f"{row.note} |")
        elif row.name in skipped:
            lines.append(f"| {row.name} | " + " | ".join("–" for _ in TASKS) + f" | – | not run: {skipped[row.name]} |")
    return "\n".join(lines)


def machine() -> str:
    import torch

    return (f"{platform.node() or 'unknown host'}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPU cores visible (shared with other work), torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}, CPU, bf16 base")


FINDINGS = "<!-- findings: written by hand, kept when the tables above are regenerated -->"
UNLEARN_COMMAND = "`.venv/bin/python bench/merging_unlearn.py --n-eval 300`"


def extra_tables() -> str:
    """The learned-weights tables (one per target task) and the unlearning table, made by their own commands, where
    they exist."""
    parts = []
    for path in sorted((C.OUT / "learned").glob("*/table.md")):
        command = f"`.venv/bin/python bench/merging_learned.py --target {path.parent.name} --n 300 --no-train`"
        parts.append(("Learned combination weights: target " + path.parent.name, path, command))
    if (C.OUT / "unlearn" / "table.md").is_file():
        parts.append(("Unlearning", C.OUT / "unlearn" / "table.md", UNLEARN_COMMAND))
    return "".join(f"\n## {title}\n\nMade by {command} (cached per row under `{path.parent.relative_to(C.ROOT)}`)."
                   f"\n\n{path.read_text().strip()}\n" for title, path, command in parts)


def write_doc(rows, results, skipped, args, seconds):
    first = next((r for r in results.values()), None)
    n_used = {t: first[t]["n"] for t in TASKS} if first else {}
    eval_times = {name: sum(r[t]["seconds"] for t in TASKS) for name, r in results.items()}
    train = {a: C.train_results(a) for a in C.ADAPTERS if C.is_trained(a)}
    train_lines = "\n".join(
        f"| {a} | `{C.ADAPTERS[a]}` | {r['steps']} | {r['train_seconds'] / 60:.1f} | {r['wall_seconds'] / 60:.1f} |"
        for a, r in train.items())
    partial = (f"\n**Partial table:** {len(skipped)} of {len(rows)} rows are not run yet (reasons in the table); the "
               f"same command fills them in.\n" if skipped else "")
    command = "`.venv/bin/python bench/merging.py" + (f" --n {args.n}" if args.n != N_DEFAULT else "") + \
        (f" --rows {args.rows}" if args.rows else "") + "`"
    doc = f"""# Merging LoRA adapters of four distinct instruct tasks (SmolLM2-135M-Instruct, VADER text)

Made by {command} on {datetime.date.today().isoformat()} ({machine()}); this run of the command took
{seconds / 60:.1f} min (rows already in `runs/merging/eval/` are reused, not recomputed). Resumable: finished adapter
runs and evaluated rows are skipped.

## Tasks and data (`lorakit.data_tasks`, data spec `vader-task:<task>[@<domain>]`)

Four instruct tasks on the sentences of the four VADER domains (movies, tweets, amazon, nyt), one chat turn each
(SmolLM2's chat template, its default system prompt kept):

| task | sentences | reply (class order) | instruction |
|---|---|---|---|
| polarity | \\|rating\\| ≥ 0.5 | negative / positive | `Is the sentiment of this text positive or negative? Answer with one word.` |
| source | all | movie / tweet / product / news (movies / tweets / amazon / nyt) | `Where does this text come from: a movie review, a tweet, a product review, or a news editorial? Answer with one word: movie, tweet, product or news.` |
| intensity | all | mild / strong (strong: \\|rating\\| ≥ 2) | `Is the sentiment of this text strong or mild? Answer with one word.` |
| format | \\|rating\\| ≥ 0.5 | négatif / positif | `Is the sentiment of this text positive or negative? Answer with one word in French: positif or négatif.` |

One seeded split (seed 0) of the 23,619 distinct sentences into train (17,716) / validation (2,361) / test (3,542)
pools; every task draws only from the matching pool, so no test sentence of any task is a training sentence of any
task. Per task: 2,000 training, 300 validation and 600 test examples, exactly class-balanced (source: 150 test
sentences per domain; the others 300 / 300). Per-domain polarity pools (`vader-task:polarity@<domain>`) use the
same pools, balanced where the domain allows (test sizes: movies 600, tweets 506, amazon 489, nyt 452).

## Adapters

`lorakit train --model smollm2 --task instruct --data <spec> --bf16 --group-by-length false --max-eval-samples 64
--seed 0` (the instruct defaults otherwise: LoRA r 16, α 32 on all linear layers, lr 1e-3, 80 steps × 16 examples,
warmup 0.1; bf16 base, fp32 adapter), one run folder each in `runs/merging/adapters/<name>/`. Batches are drawn
without length grouping. Until commit 6761dea the instruct default `group_by_length` measured a chat example by its
reply alone (the Trainer summed the lengths of an example's string fields; the messages are a list), so it sorted each
run of 50 batches by the reply word — by class for source (product > movie = tweet > news) and intensity (strong >
mild). With it the source adapter's training loss fell to ~0 and jumped to 5–9 at each change of batch class, and the
adapter ended answering `movie` for every sentence (25.0 % on source, like the base; first attempt kept in
`runs/merging/grouped-by-length/`). The Trainer now measures the whole conversation; these adapters keep
`--group-by-length false` so the table does not change. The polarity adapter (negative / positive: equal lengths, no
reordering) came out bit-identical either way. The multi-task adapter has the same budget
(80 × 16 examples from the 8,000-example mix, ≈ 320 per task), so it sees a quarter of each task's examples a
single-task adapter sees.

| adapter | data | steps | training min | run wall min (incl. small in-run evals) |
|---|---|---|---|---|
{train_lines}

## Results

Accuracy (%) by label scoring on each task's test set ({', '.join(f'{t} {n_used[t]}' for t in TASKS) if n_used
else '–'} examples; class-balanced): the choice whose tokens get the highest total log-probability after the
prompt. *mean* is the plain mean of the four. Merged rows: `lorakit.compose.merge_adapters(model, names, weights,
new_name, method=..., ...)` on the four task adapters loaded on one model (arguments in the *what* column and in
`runs/merging/eval/<row>.json`), the merged adapter alone active. Chance is the majority-class row (balanced test
sets: 50 / 25 / 50 / 50). † marks a task on which the row answers one label for ≥ 95 % of the examples (a
near-constant predictor: its accuracy is about that label's share).

{table(rows, results, skipped)}
{partial}
Evaluation time per row (s, all four tasks): {', '.join(f'{k} {v:.0f}' for k, v in eval_times.items())}.
{extra_tables()}"""
    path = C.ROOT / "docs" / "merging.md"
    kept = path.read_text().split(FINDINGS, 1)[1] if path.is_file() and FINDINGS in path.read_text() else "\n"
    path.write_text(doc + "\n" + FINDINGS + kept)
    print(f"wrote {path}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=N_DEFAULT, help="test examples per task (≤ 600, class-balanced)")
    ap.add_argument("--rows", default="", help="comma-separated row names (default: all of ROWS)")
    ap.add_argument("--train-only", action="store_true", help="train the missing adapters, evaluate nothing")
    ap.add_argument("--no-train", action="store_true", help="skip rows whose adapters are not trained yet "
                    "(e.g. while another process trains them)")
    ap.add_argument("--no-write", action="store_true", help="do not write docs/merging.md")
    args = ap.parse_args()
    began = time.perf_counter()
    rows = [r for r in ROWS if not args.rows or r.name in args.rows.split(",")]
    if not args.no_train:
        C.OUT.mkdir(parents=True, exist_ok=True)
        with open(C.OUT / "train.log", "a") as log:
            for name in needed_adapters(rows):
                C.ensure_adapter(name, log=log)
    if args.train_only:
        return
    ev = Evaluator(args.n)
    results, skipped = {}, {}
    for row in rows:
        reason = ev.skip_reason(row)
        if reason:
            print(f"note: row {row.name} skipped: {reason}", file=sys.stderr)
            skipped[row.name] = reason
            continue
        try:
            results[row.name] = ev.row_results(row)
        except Exception as e:  # a merge method that fails is reported, the table goes on
            traceback.print_exc()
            skipped[row.name] = f"{type(e).__name__}: {str(e)[:200]}"
    print(table(rows, results, skipped))
    if not args.no_write:
        write_doc(rows, results, skipped, args, time.perf_counter() - began)


if __name__ == "__main__":
    main()
