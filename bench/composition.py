"""Composing SmolLM2 task adapters at run time (`lorakit.route(model, weights=...)`) vs merging them vs each single
adapter, on the four instruct tasks of the combining issue, and whether a request picks the right adapter.

Usage: `.venv/bin/python bench/composition.py [--n 300] [--rows a,b] [--no-write]`. Writes `docs/composition.md`.

Resumable: each row's accuracies are cached in `runs/composition/eval/<row>.json`; the trained LoRA-Flow gate in
`runs/composition/gates/`; rows of the merging table (base, single adapters, multi-task, merges) are read from
`runs/merging/eval/` (`bench/merging.py` makes them, with the same test examples). Needs the four trained task
adapters (`bench/merging_common.ensure_adapter` trains missing ones).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merging_common as C  # noqa: E402

import lorakit  # noqa: E402
from lorakit import data_tasks  # noqa: E402
from lorakit.compose import ArrowGate, FusionGate, LayerGate, MoleGate, gated  # noqa: E402
from lorakit.compose.retrieve import DescriptionIndex  # noqa: E402

TASKS = C.TASKS
OUT = C.ROOT / "runs" / "composition"
EVAL = OUT / "eval"
MERGED_ROWS = {"base": "zero-shot base, no adapter", "multi": "one adapter trained on the mix of the four tasks",
               "linear-mean": "merge: exact mean of the four ΔW", "cat": "merge: exact sum (task arithmetic)",
               "knots": "merge: KnOTS (best merge of docs/merging.md)"}
GATE_TRAIN = dict(per_task=64, steps=32, batch=8, lr=5e-3)  # every trained gate: 256 labelled examples, one epoch
GATES = {"lora-flow": LayerGate, "autolora-fusion": FusionGate, "mole": MoleGate}  # slug: gate class
DESCRIPTIONS = {  # what a user would write next to each adapter in a registry
    "polarity": "Classify the sentiment of a text as positive or negative.",
    "source": "Tell where a text comes from: a movie review, a tweet, a product review or a news editorial.",
    "intensity": "Rate how strong the sentiment of a text is: strong or mild.",
    "format": "Answer whether the sentiment of a text is positive or negative, in French (positif / négatif).",
}


def run_weights(model, weights, task: str, n: int) -> dict:
    with lorakit.route(model, weights=weights, adapters=list(TASKS)):
        return C.evaluate(model, task, n)


def gate_row(model, make_gate, task: str, n: int) -> dict:
    gate = make_gate()
    with torch.no_grad(), gated(model, gate):
        return C.evaluate(model, task, n)


def train_gate(model, slug: str):
    """The gate GATES[slug] over the four frozen adapters, trained with lorakit's Trainer on GATE_TRAIN examples of
    the four tasks mixed (saved; reloaded on a rerun). MoLE's balancing loss is left out (the Trainer's loss has no
    hook for it)."""
    from safetensors.torch import load_file, save_file

    from lorakit.data import ChatDataset
    from lorakit.train.args import TrainingArguments
    from lorakit.train.trainer import Trainer

    gate = GATES[slug](model, TASKS)
    path = OUT / "gates" / f"{slug}.safetensors"
    if path.is_file():
        gate.load_state_dict(load_file(path))
        return gate
    rows = [r for t in TASKS for r in data_tasks.task_split(t, "train", limit=GATE_TRAIN["per_task"])]
    data = ChatDataset([r["messages"] for r in rows], [r["response"] for r in rows])  # the four tasks mixed
    args = TrainingArguments(output_dir=str(OUT / "gates" / f"run-{slug}"), disable_tqdm=True, save_steps=0, bf16=True,
                             max_steps=GATE_TRAIN["steps"], per_device_train_batch_size=GATE_TRAIN["batch"],
                             learning_rate=GATE_TRAIN["lr"], seed=0)
    started = time.perf_counter()
    with gated(model, gate):
        Trainer(model, C.make_task(TASKS[0]), args, data).train()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in gate.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({**GATE_TRAIN, "seconds": round(time.perf_counter() - started)}))
    return gate


def request_text(row) -> str:
    return next(m["content"] for m in row["messages"] if m["role"] == "user")


def retrieval_row(model, task: str, n: int) -> dict:
    """Each request goes to the adapter whose description is nearest (MiniLM cosine) to the request's text; accuracy
    over the whole test set, and how often the request's own task adapter was picked."""
    data = C.test_set(task, n)
    index = DescriptionIndex(list(DESCRIPTIONS), list(DESCRIPTIONS.values()))
    picks = index.retrieve([request_text(data[i]) for i in range(len(data))], 1)[0][:, 0].tolist()
    correct, started = 0.0, time.perf_counter()
    for j, name in enumerate(TASKS):
        group = [i for i, p in enumerate(picks) if p == j]
        if group:
            lorakit.set_active(model, [name])
            correct += C.score_choices(model, C.make_task(task), data.subset(group))["accuracy"] * len(group)
    own = picks.count(TASKS.index(task)) / len(data)
    return {"accuracy": correct / len(data), "n": len(data), "retrieved_own": own,
            "seconds": round(time.perf_counter() - started, 1)}


ROWS = {  # slug: (label, what, compute(model, task, n))
    "uniform": ("uniform (run time)", "weights 1/4 for every adapter on every token (= the exact mean merge)",
                lambda m, t, n: run_weights(m, torch.full((1, 4), 0.25), t, n)),
    "arrow-top1": ("Arrow top-1", "data-free: the top-1 adapter per token and layer (PEFT's defaults otherwise)",
                   lambda m, t, n: gate_row(m, lambda: ArrowGate(m, TASKS, top_k=1), t, n)),
    "arrow-top2": ("Arrow top-2", "data-free: top-2 per token and layer, softmax T = 1",
                   lambda m, t, n: gate_row(m, lambda: ArrowGate(m, TASKS, top_k=2), t, n)),
    "lora-flow": ("LoRA-Flow gate", f"a gate per block, trained on {4 * GATE_TRAIN['per_task']} labelled examples "
                  f"({GATE_TRAIN['steps']} steps × {GATE_TRAIN['batch']}, lr {GATE_TRAIN['lr']})",
                  lambda m, t, n: gate_row(m, lambda: train_gate(m, "lora-flow"), t, n)),
    "autolora-fusion": ("AutoLoRA fusion gate", "sigmoid gates per layer and channel on each adapter's output, "
                        "trained as the LoRA-Flow gate",
                        lambda m, t, n: gate_row(m, lambda: train_gate(m, "autolora-fusion"), t, n)),
    "mole": ("MoLE gate", "softmax over the adapters' outputs per layer and token, trained as the LoRA-Flow gate "
             "(no balancing loss)", lambda m, t, n: gate_row(m, lambda: train_gate(m, "mole"), t, n)),
    "retrieval-minilm": ("retrieval (MiniLM)", "each request to the adapter whose description is nearest (MiniLM "
                         "cosine), then that adapter alone", retrieval_row),
}


def reference_rows(n: int) -> dict:
    out = {}
    for row in (*MERGED_ROWS, *TASKS):
        path = C.EVAL_DIR / f"{row}.json"
        saved = json.loads(path.read_text()) if path.is_file() else {}
        if all(saved.get(t, {}).get("n_requested") == n for t in TASKS):
            out[row] = saved
    if all(t in out for t in TASKS):
        out["oracle routing"] = {t: out[t][t] for t in TASKS}
    return out


def fmt(results: dict) -> list[str]:
    accs = [results[t]["accuracy"] * 100 for t in TASKS]
    return [f"{a:.1f}" for a in accs] + [f"**{sum(accs) / 4:.1f}**"]


def write_doc(results: dict, refs: dict, n: int, seconds: float) -> None:
    lines = ["| row | what | " + " | ".join(TASKS) + " | mean |", "|" + "---|" * (len(TASKS) + 3)]
    notes = {**MERGED_ROWS, **{t: "single-task adapter" for t in TASKS},
             "oracle routing": "each task's requests to its own adapter (needs the task label: an upper bound)"}
    for row in (*MERGED_ROWS, *TASKS, "oracle routing"):
        if row in refs:
            lines.append(f"| {row} | {notes[row]} | " + " | ".join(fmt(refs[row])) + " |")
    for row, res in results.items():
        lines.append(f"| **{ROWS[row][0]}** | {ROWS[row][1]} | " + " | ".join(fmt(res)) + " |")
    retrieval = results.get("retrieval-minilm")
    picked = "" if retrieval is None else "Retrieval picked the request's own task adapter for " + ", ".join(
        f"{t} {retrieval[t]['retrieved_own']:.1%}" for t in TASKS) + " of the requests.\n"
    doc = f"""# Composing adapters at run time (SmolLM2-135M-Instruct, four VADER instruct tasks)

Regenerate: `.venv/bin/python bench/composition.py` ({datetime.date.today()}; this run took {seconds / 60:.0f} min on 2
CPU cores: rows cached in `runs/composition/eval/` are reused, not recomputed — from scratch the first five rows took
11 min with the LoRA-Flow gate's training, the AutoLoRA and MoLE gates 4 + 3 min of training and 3 min of evaluation
each: ~24 min in all). The retrieval-by-weights table comes from `bench/weight_retrieval.py` (26 small adapters
trained in ~24 min, then ~1.5 min with the 4 leave-one-task-out encoders).

The four single-task LoRA adapters of `docs/merging.md` (polarity, source, intensity, format; r 16 on all linear
layers, SmolLM2 in bf16) kept apart and mixed while the model runs. Accuracy (%) by label scoring on {n} class-balanced
test examples per task (the same examples as `docs/merging.md`; chance 50 / 25 / 50 / 50; one seed, so differences
under ~5 points are noise). Rows in bold are computed here; the others come from the merging table.

{chr(10).join(lines)}

{picked}"""
    extra = OUT / "weight_retrieval.md"  # bench/weight_retrieval.py's table, when it has run
    if extra.is_file():
        doc += "\n" + extra.read_text()
    path = C.ROOT / "docs" / "composition.md"
    marker = "<!-- findings: written by hand, kept when the tables above are regenerated -->"
    kept = path.read_text().split(marker, 1)[1] if path.is_file() and marker in path.read_text() else "\n"
    path.write_text(doc + "\n" + marker + kept)
    print(f"wrote {path}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--rows", default="", help="comma-separated rows (default: all)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    began = time.perf_counter()
    model, _ = C.load_base()
    C.load_adapters(model, TASKS)
    results = {}
    for row, (_, _, compute) in ROWS.items():
        if args.rows and row not in args.rows.split(","):
            continue
        results[row] = C.cached_row(row, lambda t: compute(model, t, args.n), n=args.n, folder=EVAL)
        print(row, {t: round(results[row][t]["accuracy"], 3) for t in TASKS}, flush=True)
    if not args.no_write:
        write_doc(results, reference_rows(args.n), args.n, time.perf_counter() - began)


if __name__ == "__main__":
    main()
