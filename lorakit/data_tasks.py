"""Four distinct instruct tasks on VADER sentences (for merging, learned combinations and unlearning experiments).

Data spec (`lorakit train --task instruct --data SPEC`, `lorakit.data.load_data(SPEC, "instruct")`):

- `vader-task:<task>`: one task, over the sentences of all four VADER domains;
- `vader-task:<task>@<domain>`: the same task on one domain's sentences only (`polarity@movies`: the per-domain
  polarity pool, a near-duplicate of `polarity`); not for `source`, which one domain makes trivial;
- `vader-task:all` or `vader-task:<task>+<task>[+...]`: a multi-task mix (the listed tasks' examples, shuffled).

Tasks (user message = the task's instruction with the sentence; reply = one of the task's `choices`):

- **polarity**: sentences with |rating| >= 0.5 (as `vader(..., task="instruct")`), reply negative / positive,
  with the library's `INSTRUCTION`;
- **source**: every sentence; which domain it comes from, answered movie (movies), tweet (tweets),
  product (amazon), news (nyt);
- **intensity**: every sentence; strong if |rating| >= 2, else mild;
- **format**: as polarity, answered in French: négatif / positif (the instruction says so).

One split for all tasks: every distinct sentence of the four domains (a text repeated within a domain counts once,
with the mean of its ratings; no text occurs in two domains) goes to exactly one pool, by a `random.Random(seed)`
permutation of the sentences in domain and file order: 15 % test, 10 % validation, the rest train. Each task then
draws its examples from the pools (never across pools), so no test sentence of any task is a training sentence of
any task. Per task at most `MAX_TRAIN` (2,000) training, `MAX_VALIDATION` (300) validation and `MAX_TEST` (600)
test examples, balanced over the classes (an equal share per class; when a class has too few sentences in a
pool, every one of them is taken and the other classes fill the rest), in a seeded order. A mix has no `choices`
(its tasks' label sets differ); score it per task.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Callable

from .data import DOMAINS, INSTRUCTION, SENTIMENT_CHOICES, ChatDataset, Splits, vader_ratings
from .errors import DataError

PREFIX = "vader-task:"
SPLITS = ("train", "validation", "test")
TEST_SHARE, VALIDATION_SHARE = 0.15, 0.10
MAX_TRAIN, MAX_VALIDATION, MAX_TEST = 2000, 300, 600
MIX = "all"


@dataclasses.dataclass(frozen=True)
class Sentence:
    text: str
    rating: float  # mean human rating in [-4, 4]
    domain: str


@dataclasses.dataclass(frozen=True)
class VaderTask:
    """One instruct task: which sentences it uses, the instruction, the label set and each sentence's label."""
    name: str
    instruction: str  # with `{text}`
    choices: tuple  # reply words, class k at index k
    label: Callable[[Sentence], int]
    keep: Callable[[Sentence], bool] = lambda s: True
    per_domain: bool = True  # may be restricted to one domain (`task@domain`)


SOURCE_CHOICES = ("movie", "tweet", "product", "news")  # one per domain, in DOMAINS order
SOURCE_INSTRUCTION = ("Where does this text come from: a movie review, a tweet, a product review, or a news "
                      "editorial? Answer with one word: movie, tweet, product or news.\n\n{text}")
INTENSITY_CHOICES = ("mild", "strong")
INTENSITY_INSTRUCTION = "Is the sentiment of this text strong or mild? Answer with one word.\n\n{text}"
FRENCH_CHOICES = ("négatif", "positif")
FORMAT_INSTRUCTION = ("Is the sentiment of this text positive or negative? Answer with one word in French: "
                      "positif or négatif.\n\n{text}")
STRONG = 2.0  # |rating| >= STRONG: strong
POLAR = 0.5  # |rating| >= POLAR: has a polarity (as the VADER classification data)


def _polar(s: Sentence) -> bool:
    return abs(s.rating) >= POLAR


def _sign(s: Sentence) -> int:
    return int(s.rating > 0)


TASKS = {
    "polarity": VaderTask("polarity", INSTRUCTION, SENTIMENT_CHOICES, _sign, _polar),
    "source": VaderTask("source", SOURCE_INSTRUCTION, SOURCE_CHOICES, lambda s: DOMAINS.index(s.domain),
                        per_domain=False),
    "intensity": VaderTask("intensity", INTENSITY_INSTRUCTION, INTENSITY_CHOICES,
                           lambda s: int(abs(s.rating) >= STRONG)),
    "format": VaderTask("format", FORMAT_INSTRUCTION, FRENCH_CHOICES, _sign, _polar),
}
TASK_NAMES = tuple(TASKS)
LIMITS = {"train": MAX_TRAIN, "validation": MAX_VALIDATION, "test": MAX_TEST}

_pools_cache: dict = {}


def sentences() -> list[Sentence]:
    """Every distinct sentence of the four domains, in domain and file order (repeats within a domain merged, with
    the mean of their ratings, at the first occurrence)."""
    out = []
    for domain in DOMAINS:
        ratings: dict[str, list[float]] = {}
        for text, rating in vader_ratings(domain):
            ratings.setdefault(text, []).append(rating)
        out.extend(Sentence(t, sum(r) / len(r), domain) for t, r in ratings.items())
    texts = [s.text for s in out]
    if len(set(texts)) != len(texts):  # (not the case in vaderSentiment 3.3.2)
        raise DataError("a VADER text occurs in two domains; its source label would be ambiguous")
    return out


def sentence_pools(seed: int = 0) -> dict[str, list[Sentence]]:
    """The global split: {"train", "validation", "test"} → disjoint lists of sentences (all domains)."""
    if seed not in _pools_cache:
        rows = sentences()
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        n_test, n_val = int(TEST_SHARE * len(rows)), int(VALIDATION_SHARE * len(rows))
        cut = {"test": order[:n_test], "validation": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
        _pools_cache[seed] = {k: [rows[i] for i in sorted(v)] for k, v in cut.items()}
    return _pools_cache[seed]


def _balanced(rows: list[Sentence], labels: list[int], k: int, limit: int, rng: random.Random) -> list[int]:
    """Indices of up to `limit` rows, an equal share per class where the classes allow (a short class gives all its
    rows, the others fill the rest), in a random order."""
    by_class = [[i for i, y in enumerate(labels) if y == c] for c in range(k)]
    for group in by_class:
        rng.shuffle(group)
    taken, left = [[] for _ in range(k)], min(limit, len(rows))
    open_classes = [c for c in range(k) if by_class[c]]
    while left and open_classes:  # water-filling: equal shares, the remainder to the classes that still have rows
        share = max(1, left // len(open_classes))
        for c in list(open_classes):
            take = by_class[c][len(taken[c]):len(taken[c]) + min(share, left)]
            taken[c].extend(take)
            left -= len(take)
            if len(taken[c]) == len(by_class[c]):
                open_classes.remove(c)
            if not left:
                break
    picked = [i for group in taken for i in group]
    rng.shuffle(picked)
    return picked


def task_split(name: str, split: str, domain: str | None = None, seed: int = 0,
               limit: int | None = None) -> ChatDataset:
    """One task's examples from one pool of the global split (`split`: train, validation or test), optionally one
    domain's sentences only; at most `limit` examples (default: `LIMITS[split]`), balanced over the classes."""
    task = _task(name)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if domain is not None:
        if domain not in DOMAINS:
            raise DataError(f"unknown VADER domain {domain!r}; valid: {', '.join(DOMAINS)}")
        if not task.per_domain:
            raise DataError(f"task {name!r} cannot be restricted to one domain (every answer would be the same)")
    rows = [s for s in sentence_pools(seed)[split] if task.keep(s) and (domain is None or s.domain == domain)]
    labels = [task.label(s) for s in rows]
    where = f"{name}@{domain}" if domain else name
    rng = random.Random(f"{seed}:{where}:{split}")  # str seeds are stable across runs (sha512 of the text)
    picked = _balanced(rows, labels, len(task.choices), LIMITS[split] if limit is None else limit, rng)
    return ChatDataset.from_texts([rows[i].text for i in picked], [labels[i] for i in picked], task.choices,
                                  task.instruction)


def task_splits(name: str, domain: str | None = None, seed: int = 0) -> Splits:
    """Train / validation / test of one task (see `task_split`)."""
    return Splits(*(task_split(name, s, domain, seed) for s in SPLITS))


def mix(names, seed: int = 0, domain: str | None = None) -> Splits:
    """The multi-task mix of `names`: each task's examples of each pool, concatenated and shuffled (seeded); no
    `choices` (the tasks' label sets differ)."""
    names = list(names)
    parts = {s: [task_split(n, s, domain, seed) for n in names] for s in SPLITS}
    out = []
    for s in SPLITS:
        messages = [m for d in parts[s] for m in d.messages]
        responses = [r for d in parts[s] for r in d.responses]
        order = list(range(len(messages)))
        random.Random(f"{seed}:mix:{'+'.join(names)}:{s}").shuffle(order)
        out.append(ChatDataset([messages[i] for i in order], [responses[i] for i in order]))
    return Splits(*out)


def parse_spec(spec: str) -> tuple[list[str], str | None]:
    """`vader-task:<task>[+<task>...][@<domain>]` (or `all`) → (task names, domain or None)."""
    body = spec.removeprefix(PREFIX)
    names_part, _, domain = body.partition("@")
    if "@" in body and not domain:
        raise DataError(f"data spec {spec!r}: no domain after '@' (domains: {', '.join(DOMAINS)})")
    names = list(TASK_NAMES) if names_part == MIX else names_part.split("+")
    for n in names:
        _task(n, spec)
    if len(set(names)) != len(names):
        raise DataError(f"data spec {spec!r} names a task twice")
    if domain and domain not in DOMAINS:
        raise DataError(f"data spec {spec!r}: unknown VADER domain {domain!r}; valid: {', '.join(DOMAINS)}")
    return names, domain or None


def vader_task(spec: str, task: str = "instruct", seed: int = 0) -> Splits:
    """The splits a `vader-task:` data spec names (see the module docstring); `seed` draws the global split."""
    if task != "instruct":
        raise DataError(f"{PREFIX} data is instruct data; use --task instruct, not {task!r}")
    names, domain = parse_spec(spec)
    if len(names) == 1:
        return task_splits(names[0], domain, seed)
    return mix(names, seed, domain)


def _task(name: str, spec: str | None = None) -> VaderTask:
    if name not in TASKS:
        where = f"data spec {spec!r}: " if spec else ""
        raise DataError(f"{where}unknown VADER task {name!r}; valid: {', '.join(TASK_NAMES)}, or {MIX!r} for the "
                        f"mix of all four (e.g. {PREFIX}source, {PREFIX}polarity@movies, {PREFIX}{MIX})")
    return TASKS[name]
