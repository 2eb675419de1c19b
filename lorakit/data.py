"""Datasets: the VADER sentiment snippets (fetched once, cached) and a user's CSV/JSONL files.

VADER (Hutto & Gilbert 2014, MIT licence): human-rated sentences in four domains, each with
a mean rating in [-4, 4], shipped inside the `vaderSentiment==3.3.2` source distribution.
The text is downloaded on first use into `cache_dir()`; lorakit never ships it.

- classification: sentences with |rating| < 0.5 are dropped; label = 1 if rating > 0 else 0.
- regression: every sentence is kept; label = the raw mean rating (not rescaled).
- instruct: the classification rows as chat instructions. The user message is exactly
  `INSTRUCTION.format(text=...)`; the reply is "negative" or "positive" (the dataset's `choices`).

Texts are kept as in the files (stripped): tweets keep HTML entities such as `&amp;`, and a few
sentences repeat within a domain, some with different ratings (NYT: 71 repeats).

Splits are a `random.Random(seed)` permutation (the same on every machine): for VADER,
test = min(2000, 20% of n) and validation = min(1000, 10% of n), so movies gets 2,000 test
sentences; user files without given splits get 10% / 10%.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import shutil
import tarfile
import tempfile
from pathlib import Path

import torch

from .cache import cache_dir, check_sha256, pip_download
from .errors import DataError

DOMAINS = ("movies", "tweets", "amazon", "nyt")
TASKS = ("classification", "regression", "causal-lm", "instruct")
GENERATIVE = ("causal-lm", "instruct")
INSTRUCTION = "Is the sentiment of this text positive or negative? Answer with one word.\n\n{text}"
SENTIMENT_CHOICES = ("negative", "positive")  # class 0, class 1

VADER_REQUIREMENT = "vaderSentiment==3.3.2"
VADER_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
_VADER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
_VADER_FILES = {"movies": "movieReviewSnippets_GroundTruth.txt", "tweets": "tweets_GroundTruth.txt",
                "amazon": "amazonReviewSnippets_GroundTruth.txt", "nyt": "nytEditorialSnippets_GroundTruth.txt"}


class _Rows(torch.utils.data.Dataset):
    """Column lists of equal length; `_keys` pairs each list attribute with its key in an item."""
    _keys: tuple

    def __len__(self):
        return len(getattr(self, self._keys[0][0]))

    def __getitem__(self, i):
        return {key: getattr(self, name)[i] for name, key in self._keys}

    def subset(self, indices):
        """The rows at `indices`, in that order."""
        return dataclasses.replace(self, **{name: [getattr(self, name)[i] for i in indices] for name, _ in self._keys})

    def select(self, n: int, seed: int = 0):
        """A deterministic random subset of n rows (all if n >= len), kept in file order."""
        if n < 0:
            raise DataError(f"select(n) needs n >= 0, got {n}")
        return self.subset(sorted(random.Random(seed).sample(range(len(self)), min(n, len(self)))))


@dataclasses.dataclass
class TextDataset(_Rows):
    """Texts with int class ids 0..K-1 (classification) or float targets (regression); `label_names` (name of class
    k at k) when the source names its classes."""
    texts: list
    labels: list
    task: str = "classification"
    num_labels: int = 2
    label_names: tuple = ()
    _keys = (("texts", "text"), ("labels", "label"))


@dataclasses.dataclass
class CompletionDataset(_Rows):
    """Prompt/completion pairs for the causal-LM task (the loss covers only the completion)."""
    prompts: list
    completions: list
    task: str = "causal-lm"
    num_labels: int = 0
    _keys = (("prompts", "prompt"), ("completions", "completion"))


@dataclasses.dataclass
class ChatDataset(_Rows):
    """Conversations for the instruct task: `messages` (the chat up to the reply, as dicts with role and content)
    and the assistant's `response`. With `choices` (a closed label set, e.g. negative/positive), `labels` holds
    each response's index in it, and models are also scored by which choice they rank highest."""
    messages: list
    responses: list
    labels: list = dataclasses.field(default_factory=list)
    choices: tuple = ()
    task: str = "instruct"
    _keys = (("messages", "messages"), ("responses", "response"))

    def __post_init__(self):
        if self.choices and not self.labels:
            self.labels = [self.choices.index(r) if r in self.choices else -1 for r in self.responses]
        if self.choices:
            self._keys = self._keys + (("labels", "label"),)

    @property
    def num_labels(self) -> int:
        return len(self.choices)

    @classmethod
    def from_texts(cls, texts: list, labels: list, choices=SENTIMENT_CHOICES,
                   instruction: str = INSTRUCTION) -> "ChatDataset":
        """Labelled texts as one-turn instructions: user `instruction.format(text=...)`, reply `choices[label]`."""
        return cls([[{"role": "user", "content": instruction.format(text=t)}] for t in texts],
                   [choices[y] for y in labels], list(labels), tuple(choices))

    def with_shots(self, shots: "ChatDataset") -> "ChatDataset":
        """Each conversation preceded by the `shots` as earlier user/assistant turns (k-shot prompting)."""
        prefix = [turn for m, r in zip(shots.messages, shots.responses)
                  for turn in (*m, {"role": "assistant", "content": r})]
        return dataclasses.replace(self, messages=[prefix + m for m in self.messages])

    def texts(self) -> list[str]:
        """Every message and response (e.g. to train a tokenizer on)."""
        return [t["content"] for m in self.messages for t in m] + list(self.responses)


@dataclasses.dataclass
class Splits:
    train: TextDataset | CompletionDataset | ChatDataset
    validation: TextDataset | CompletionDataset | ChatDataset
    test: TextDataset | CompletionDataset | ChatDataset


# ---- VADER -------------------------------------------------------------------------------

def _extract(sdist: Path, out: Path) -> None:
    """Copy the four ground-truth files (and the licence) out of the sdist; nothing else is extracted."""
    check_sha256(sdist, VADER_SHA256, f"{VADER_REQUIREMENT} sdist", DataError)
    with tarfile.open(sdist, "r:gz") as outer:
        members = {m.name.split("/", 1)[-1]: m for m in outer.getmembers() if m.isfile()}
        if _VADER_ARCHIVE not in members:
            raise DataError(f"{sdist} has no {_VADER_ARCHIVE}")
        if "LICENSE.txt" in members:
            (out / "LICENSE.txt").write_bytes(outer.extractfile(members["LICENSE.txt"]).read())
        with tarfile.open(fileobj=outer.extractfile(members[_VADER_ARCHIVE]), mode="r:gz") as inner:
            wanted = {m.name.rsplit("/", 1)[-1]: m for m in inner.getmembers() if m.isfile()}
            for name in _VADER_FILES.values():
                if name not in wanted:
                    raise DataError(f"{sdist}: {_VADER_ARCHIVE} has no {name}")
                (out / name).write_bytes(inner.extractfile(wanted[name]).read())


def vader_files() -> Path:
    """The folder holding the four `*_GroundTruth.txt` files; fetched and extracted on first use."""
    final = cache_dir() / "vader-3.3.2"
    if final.is_dir():
        missing = [n for n in _VADER_FILES.values() if not (final / n).is_file()]
        if missing:
            raise DataError(f"the VADER cache {final} lacks {', '.join(missing)}; delete the folder to fetch it again")
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".vader-", dir=final.parent))
    try:
        sdist = pip_download(VADER_REQUIREMENT, tmp / "download", "VADER data", DataError, source=True,
                             env_var="LORAKIT_VADER_SDIST")
        (tmp / "data").mkdir()
        _extract(sdist, tmp / "data")
        try:
            os.rename(tmp / "data", final)
        except OSError:
            if not final.is_dir():  # else another process finished first: use its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def vader_ratings(domain: str) -> list[tuple[str, float]]:
    """(text, mean rating in [-4, 4]) for every sentence of a domain, in file order."""
    if domain not in DOMAINS:
        raise DataError(f"unknown VADER domain {domain!r}; valid: {', '.join(DOMAINS)}")
    path = vader_files() / _VADER_FILES[domain]
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise DataError(f"{path} line {line_no}: expected id<TAB>rating<TAB>text")
        rows.append((parts[2].strip(), float(parts[1])))
    return rows


def vader(domain: str, task: str = "classification", seed: int = 0) -> Splits:
    """Train/validation/test splits of one VADER domain (see the module docstring for the rules)."""
    rows = vader_ratings(domain)
    if task in ("classification", "instruct"):
        rows = [(t, int(r > 0)) for t, r in rows if abs(r) >= 0.5]
        texts, labels = [t for t, _ in rows], [y for _, y in rows]
        data = TextDataset(texts, labels, "classification", 2, ("negative", "positive")) if task == "classification" \
            else ChatDataset.from_texts(texts, labels)
    elif task == "regression":
        data = TextDataset([t for t, _ in rows], [r for _, r in rows], "regression", 1)
    else:
        raise DataError(f"VADER supports tasks classification, regression and instruct, not {task!r}")
    n = len(data)
    return split(data, seed, validation=min(1000, n // 10), test=min(2000, n // 5))


# ---- user files --------------------------------------------------------------------------

def _rows(path):
    """Yield (where, row dict) from a .csv or .jsonl file; `where` names the row for errors."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such data file: {path}")
    if path.suffix not in (".csv", ".jsonl"):
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .csv or .jsonl")
    with open(path, encoding="utf-8-sig", newline="") as f:
        if path.suffix == ".csv":
            reader = csv.DictReader(f)
            for i, row in enumerate(reader, 1):
                yield f"{path} row {i} (line {reader.line_num})", row
            return
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {line_no}: expected a JSON object, got {type(row).__name__}")
            yield f"{path} line {line_no}", row


def _records(path, texts, label=None):
    """[(where, row)] for every row of `path`; the `texts` columns must hold strings."""
    out = []
    for where, row in _rows(path):
        for name in [*texts, label] if label else texts:
            if row.get(name) is None:
                raise DataError(f"{where}: no column {name!r}; columns: {', '.join(k for k in row if k is not None)}")
        for name in texts:
            if not isinstance(row[name], str):
                raise DataError(f"{where}: {name!r} should be text, got {row[name]!r}")
        out.append((where, row))
    if not out:
        raise DataError(f"{path} is empty (no data rows)")
    return out


def _number(value, where):
    try:
        if isinstance(value, bool):
            raise ValueError
        x = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: label {value!r} is not a number") from None
    if not math.isfinite(x):
        raise DataError(f"{where}: label {value!r} is not finite")
    return x


def _read_table(path, text_column, label_column, task, classes=None):
    if task not in ("classification", "regression"):
        raise DataError(f"read_table serves classification and regression, not {task!r}")
    records = _records(path, [text_column], label_column)
    texts = [row[text_column] for _, row in records]
    labels = [_number(row[label_column], where) for where, row in records]
    if task == "regression":
        return TextDataset(texts, labels, "regression", 1)
    for x, (where, _) in zip(labels, records):
        if x < 0 or x != int(x) or (classes and x >= classes):
            ids = f"0..{classes - 1} (the classes of the training file)" if classes else "0..K-1"
            raise DataError(f"{where}: class label {x:g} is not an integer id {ids}")
    labels = [int(x) for x in labels]
    absent = sorted(set(range(max(labels) + 1)) - set(labels))
    if absent and not classes:
        raise DataError(f"{path}: class labels must be 0..K-1; found {sorted(set(labels))}, "
                        f"missing {absent} (map your labels to consecutive ids from 0)")
    return TextDataset(texts, labels, "classification", classes or max(max(labels) + 1, 2))


def read_table(path, text_column="text", label_column="label", task="classification") -> TextDataset:
    """A .csv or .jsonl file with a text and a label column (class ids 0..K-1, or floats for regression)."""
    return _read_table(path, text_column, label_column, task)


def read_completions(path, prompt_column="prompt", completion_column="completion") -> CompletionDataset:
    """A .jsonl (or .csv) file of prompt/completion pairs for the causal-LM task."""
    records = _records(path, [prompt_column, completion_column])
    return CompletionDataset([r[prompt_column] for _, r in records], [r[completion_column] for _, r in records])


def read_chats(path) -> ChatDataset:
    """A .jsonl file of chats: `{"messages": [{"role": ..., "content": ...}, ...]}` whose last message is the
    assistant's reply (the one trained on), or prompt/completion pairs (a one-turn chat each)."""
    messages, responses = [], []
    for where, row in _rows(path):
        if "messages" not in row:
            if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
                messages.append([{"role": "user", "content": row["prompt"]}])
                responses.append(row["completion"])
                continue
            raise DataError(f"{where}: expected a 'messages' list (or 'prompt' and 'completion'); "
                            f"columns: {', '.join(map(str, row))}")
        chat = row["messages"]
        if not isinstance(chat, list) or not chat or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in chat):
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects with text")
        if chat[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's reply (the text trained on), "
                            f"got role {chat[-1]['role']!r}")
        messages.append([{"role": m["role"], "content": m["content"]} for m in chat[:-1]])
        responses.append(chat[-1]["content"])
    if not responses:
        raise DataError(f"{path} is empty (no data rows)")
    return ChatDataset(messages, responses)


def split(dataset, seed: int = 0, validation=0.1, test=0.1) -> Splits:
    """Seeded train/validation/test split; `validation`/`test` are fractions (float) or row counts (int)."""
    n = len(dataset)
    n_val, n_test = (x if isinstance(x, int) else (max(1, int(x * n)) if x > 0 else 0) for x in (validation, test))
    if n_val + n_test >= n:
        raise DataError(f"{n} rows are too few to split off {n_val} validation and {n_test} test rows")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return Splits(dataset.subset(order[n_test + n_val:]), dataset.subset(order[n_test:n_test + n_val]),
                  dataset.subset(order[:n_test]))


def _data_file(folder: Path, stem: str):
    found = [folder / f"{stem}{ext}" for ext in (".csv", ".jsonl") if (folder / f"{stem}{ext}").is_file()]
    if len(found) > 1:
        raise DataError(f"{folder} has both {stem}.csv and {stem}.jsonl; keep one")
    return found[0] if found else None


def load_data(spec: str, task: str = "classification", seed: int = 0,
              text_column="text", label_column="label") -> Splits:
    """`vader:<domain>`, `vader-task:<task>[@<domain>]` (instruct tasks on VADER sentences, see
    `lorakit.data_tasks`), a .csv/.jsonl file, or a folder with train.* and optional validation.*/test.*."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    if spec.startswith("vader:"):
        return vader(spec.split(":", 1)[1], task, seed)
    if spec.startswith("vader-task:"):  # four instruct tasks on VADER sentences (lorakit/data_tasks.py)
        from .data_tasks import vader_task

        return vader_task(spec, task, seed)

    def read(p, classes=None):
        if task == "causal-lm":
            return read_completions(p)
        if task == "instruct":
            return read_chats(p)
        return _read_table(p, text_column, label_column, task, classes)

    path = Path(spec)
    if path.is_file():
        return split(read(path), seed)
    if not path.is_dir():
        raise DataError(f"unknown data spec {spec!r}: expected vader:<domain> (domains: {', '.join(DOMAINS)}), "
                        "a .csv/.jsonl file, or a folder with train.csv or train.jsonl")
    train_file = _data_file(path, "train")
    if train_file is None:
        raise DataError(f"{path} has no train.csv or train.jsonl")
    given = {s: _data_file(path, s) for s in ("validation", "test")}
    parts = split(read(train_file), seed, validation=0 if given["validation"] else 0.1,
                  test=0 if given["test"] else 0.1)
    for name, file in given.items():
        if file is not None:  # the training file defines the classes
            setattr(parts, name, read(file, parts.train.num_labels if task == "classification" else None))
    return parts
