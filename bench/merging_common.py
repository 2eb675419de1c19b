"""Shared pieces of the adapter-combination experiments on SmolLM2 (`bench/merging.py`, `bench/merging_learned.py`,
`bench/merging_unlearn.py`): the four instruct tasks on VADER sentences, the trained adapters, and label-scoring
evaluation of a model on a task.

Typical use::

    from merging_common import TASKS, load_base, load_adapters, evaluate
    import lorakit
    model, tokenizer = load_base()
    load_adapters(model, TASKS)          # = lorakit.load_adapter(model, ensure_adapter(name), name=name) each
    lorakit.set_active(model, "source")
    print(evaluate(model, "source", n=200)["accuracy"])

Data: `lorakit.data_tasks` (spec `vader-task:<task>[@<domain>]`, one global split of the sentences into
train / validation / test pools, ≤ 2,000 / 300 / 600 class-balanced examples per task).
Adapters: `runs/merging/adapters/<name>/` (a `lorakit train` run folder; the PEFT adapter in its `adapter/`),
trained on first use by `lorakit train --model smollm2 --task instruct --data <spec> --bf16 --group-by-length false`
(the instruct defaults otherwise: LoRA r 16 on all linear layers, α 32, lr 1e-3, 80 steps × 16 examples, seed 0)
in a subprocess.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lorakit import data_tasks  # noqa: E402

OUT = ROOT / "runs" / "merging"
ADAPTERS_DIR = OUT / "adapters"
EVAL_DIR = OUT / "eval"

TASKS = data_tasks.TASK_NAMES  # ("polarity", "source", "intensity", "format")
DOMAIN_ADAPTERS = tuple(f"polarity-{d}" for d in data_tasks.DOMAINS)  # the near-duplicate per-domain pool
# adapter name → data spec it is trained on
ADAPTERS = {**{t: f"vader-task:{t}" for t in TASKS}, "multi": "vader-task:all",
            **{f"polarity-{d}": f"vader-task:polarity@{d}" for d in data_tasks.DOMAINS}}
# the instruct defaults, except group_by_length: before commit 6761dea the Trainer measured a chat example by its reply
# alone, so "grouping by length" sorted batches by class and the source adapter collapsed to one answer
# (runs/merging/grouped-by-length/); the Trainer is fixed, and these adapters keep random order so the tables stay as made
TRAIN_FLAGS = ["--bf16", "--group-by-length", "false", "--max-eval-samples", "64", "--disable-tqdm", "--seed", "0"]
EVAL_BATCH = 32
NICE = 10  # training subprocesses run at this niceness (not more when the caller is already niced)
MAX_LENGTH = 256

_tokenizer = None


def load_base(dtype: torch.dtype = torch.bfloat16):
    """(model, tokenizer): SmolLM2-135M-Instruct as a causal LM on the CPU in `dtype` (bf16 by default, as the
    adapters were trained; adapters loaded onto it stay fp32), in eval mode, no KV cache in plain forwards."""
    global _tokenizer
    from lorakit.models import load_model

    model, tokenizer = load_model("smollm2", "instruct")
    model = model.to(dtype).eval()
    model.config.use_cache = False
    _tokenizer = tokenizer
    return model, tokenizer


def task_data(name: str, domain: str | None = None, seed: int = 0):
    """`lorakit.data.Splits` (train / validation / test `ChatDataset`s, each with the task's `choices` and `labels`)
    of one task: "polarity", "source", "intensity", "format", or a per-domain polarity pool given as
    "polarity-movies" / "polarity@movies" (or `domain=`), or "multi" / "all" (the mix of the four, no `choices`)."""
    if name in ("multi", data_tasks.MIX):
        return data_tasks.vader_task(f"{data_tasks.PREFIX}{data_tasks.MIX}", seed=seed)
    if name.startswith("polarity-"):
        name, domain = "polarity", name.split("-", 1)[1]
    if "@" in name:
        name, domain = name.split("@", 1)
    return data_tasks.task_splits(name, domain, seed)


def test_set(task: str, n: int | None = None):
    """The first `n` (default 600: all) test examples of a task, still class-balanced (a prefix of each class of the
    full test set, so smaller sets are subsets of larger ones)."""
    if task.startswith("polarity-"):
        return data_tasks.task_split("polarity", "test", task.split("-", 1)[1], limit=n)
    return data_tasks.task_split(task, "test", limit=n)


def adapter_run(name: str) -> Path:
    """The run folder of adapter `name` (may not exist yet)."""
    return ADAPTERS_DIR / name


def is_trained(name: str) -> bool:
    return (adapter_run(name) / "results.json").is_file()


def ensure_adapter(name: str, log=None, extra_flags=()) -> Path:
    """The PEFT adapter folder of adapter `name` (a key of `ADAPTERS`), training it first when its run has not
    finished (`lorakit train` in a subprocess at niceness `NICE` (10); an interrupted run resumes from its checkpoint).
    `log`: a file object for the subprocess's output (default: inherited)."""
    if name not in ADAPTERS:
        raise KeyError(f"unknown adapter {name!r}; known: {', '.join(ADAPTERS)}")
    run = adapter_run(name)
    if not is_trained(name):
        started = time.perf_counter()
        has_checkpoint = any((run / "checkpoints").glob("*")) if (run / "checkpoints").is_dir() else False
        restart = ["--resume"] if has_checkpoint else (["--overwrite-output-dir"] if run.exists() else [])
        cmd = ["nice", "-n", str(max(0, NICE - os.nice(0))), sys.executable, "-m", "lorakit", "train", "--model", "smollm2", "--task",
               "instruct", "--data", ADAPTERS[name], *TRAIN_FLAGS, *extra_flags, "--output-dir", str(run), *restart]
        print(f"[train {name}] {' '.join(cmd[3:])}", file=log or sys.stderr, flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT if log else None)
        print(f"[train {name}] done in {time.perf_counter() - started:.0f} s", file=log or sys.stderr, flush=True)
    return run / "adapter"


def load_adapters(model, names=TASKS, train: bool = True):
    """Load the adapters `names` (keys of `ADAPTERS`) onto `model`, each under its own name (already loaded ones are
    left alone), training missing ones first when `train` (else a missing one raises FileNotFoundError)."""
    import lorakit

    for name in names:
        if name in lorakit.adapter_names(model):
            continue
        if not train and not is_trained(name):
            raise FileNotFoundError(f"adapter {name!r} is not trained yet ({adapter_run(name)})")
        lorakit.load_adapter(model, ensure_adapter(name), name=name)
    return model


def train_results(name: str) -> dict:
    """The `results.json` of a finished adapter run."""
    return json.loads((adapter_run(name) / "results.json").read_text())


def make_task(task: str):
    """The lorakit `Instruct` task object (label scoring with the task's choices) for one of `TASKS`."""
    from lorakit.train.tasks import make_task as make

    if _tokenizer is None:
        raise RuntimeError("call load_base() first (the task needs its tokenizer)")
    choices = data_tasks.TASKS[task.split("-")[0].split("@")[0]].choices
    return make("instruct", _tokenizer, MAX_LENGTH, len(choices), choices)


@torch.no_grad()
def evaluate(model, task: str, n: int | None = None, batch_size: int = EVAL_BATCH, reference: bool = False) -> dict:
    """Label-scoring metrics of `model` (as it is: whatever adapters are active) on the test pool of `task`
    ("polarity", "source", "intensity", "format", or "polarity-<domain>"): the first `n` class-balanced test
    examples (default all, ≤ 600). Label scoring = the choice whose tokens get the highest total log-probability
    after the prompt (chat template, SmolLM2's default system prompt), as `lorakit.train.tasks.Instruct` scores.
    Returns {"accuracy", "f1", "macro_f1", "majority_class_rate", "predicted_share_<k>" per choice index, "n",
    "seconds"}.

    The prompt runs once and each choice's later tokens continue from its KV cache (`score_choices`), so
    multi-token choices (mild, positif, négatif) cost little; `reference=True` uses lorakit's own evaluation
    (`lorakit.train.trainer.evaluate`: also the reply loss, and one whole forward per multi-token choice)."""
    data = test_set(task, n)
    started = time.perf_counter()
    if reference:
        from lorakit.train.trainer import evaluate as run_eval

        metrics = run_eval(model, make_task(task), data, batch_size=batch_size, prefix="m")
        out = {k.removeprefix("m_"): v for k, v in metrics.items()}
    else:
        out = score_choices(model, make_task(task), data, batch_size)
    out.update(n=len(data), seconds=round(time.perf_counter() - started, 1))
    return out


@torch.no_grad()
def score_choices(model, task, data, batch_size: int = EVAL_BATCH) -> dict:
    """Label-scoring metrics (`confusion_metrics`) of `model` on a `ChatDataset` with choices: per batch one forward
    over the prompts (left-padded; their shared prefix once, `Instruct._forward`) keeping the KV cache, then per
    multi-token choice one short forward of its tokens after each prompt (the cache cropped back after each)."""
    from lorakit.train.devices import device_of
    from lorakit.train.tasks import _cache_keyword, _left_pad, confusion_metrics

    was_training = model.training
    model.eval()
    k, device, keyword = len(task.choices), device_of(model), _cache_keyword(model)
    confusion = torch.zeros(k * k, dtype=torch.float64)
    order = task.eval_order(data, list(range(len(data))))
    for start in range(0, len(order), batch_size):
        rows = [data[j] for j in order[start:start + batch_size]]
        padded = _left_pad([task.prompt_ids(r["messages"])[-MAX_LENGTH:] for r in rows], task.tokenizer.pad_token_id)
        ids, mask = padded["input_ids"].to(device), padded["attention_mask"].to(device)
        logits, cache, cached_mask = task._forward(model, ids, mask, keep=1, use_cache=True)
        first = logits[:, -1].float().log_softmax(-1)
        prompt_len, lengths, b = cache.get_seq_length(), mask.sum(-1), len(rows)
        columns = []
        for choice in task.choice_ids:
            score = first[:, choice[0]]
            if len(choice) > 1:
                steps = len(choice) - 1
                feed = torch.tensor(choice[:-1], device=device).expand(b, steps)
                out = model(input_ids=feed, attention_mask=torch.cat([cached_mask, cached_mask.new_ones(b, steps)], 1),
                            position_ids=lengths[:, None] + torch.arange(steps, device=device), use_cache=True,
                            **{keyword: cache})
                logp = out.logits.float().log_softmax(-1)
                target = torch.tensor(choice[1:], device=device).expand(b, steps)
                score = score + logp.gather(-1, target[..., None]).squeeze(-1).sum(1)
                cache.crop(-steps)  # (transformers 5: a negative count of tokens to drop)
                assert cache.get_seq_length() == prompt_len
            columns.append(score)
        pred = torch.stack(columns, 1).argmax(1).cpu()
        gold = torch.tensor([r["label"] for r in rows])
        confusion += torch.bincount(gold * k + pred, minlength=k * k).double()
    model.train(was_training)
    return confusion_metrics(confusion.view(k, k))


def cached_row(row: str, compute, tasks=TASKS, n: int | None = None, folder: Path = EVAL_DIR) -> dict:
    """{task: metrics} of one table row, read from `<folder>/<row>.json` when it holds every task at this `n`, else
    computed with `compute(task) -> metrics` for the missing tasks and saved (one file per row)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{row}.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    results = {t: saved[t] for t in tasks if t in saved and saved[t].get("n_requested") == n}
    for t in tasks:
        if t not in results:
            results[t] = {**compute(t), "n_requested": n}
            saved[t] = results[t]
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(saved, indent=1))
            os.replace(tmp, path)
    return results
