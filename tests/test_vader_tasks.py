"""lorakit.data_tasks: the four instruct tasks on VADER sentences (polarity, source, intensity, format), the one
global sentence split, class balance, `choices`, the `vader-task:` data spec (API and CLI) and the multi-task mix.

Uses the real VADER files from the shared cache (fetched on a fresh machine); no VADER text is stored here, the
hand-checked rows are found by their rating and domain.
"""
from __future__ import annotations

from collections import Counter

import pytest

from lorakit import data as D
from lorakit import data_tasks as T
from lorakit.errors import DataError


@pytest.fixture(scope="module")
def pools():
    return T.sentence_pools(0)


@pytest.fixture(scope="module")
def splits():
    return {name: T.task_splits(name) for name in T.TASK_NAMES}


def text_of(message: list[dict], instruction: str) -> str:
    """The sentence inside a one-turn instruction."""
    head, tail = instruction.split("{text}")
    content = message[-1]["content"]
    assert content.startswith(head) and content.endswith(tail)
    return content[len(head):len(content) - len(tail) or None]


def test_pools_are_disjoint_and_cover_every_sentence(pools):
    texts = {k: {s.text for s in v} for k, v in pools.items()}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]
    assert not texts["validation"] & texts["test"]
    every = T.sentences()
    assert sum(len(v) for v in pools.values()) == len(every) == len({s.text for s in every})
    assert len(pools["test"]) == int(0.15 * len(every)) and len(pools["validation"]) == int(0.10 * len(every))
    assert {s.domain for s in pools["test"]} == set(D.DOMAINS)
    assert T.sentence_pools(0) is pools and T.sentence_pools(1)["test"] != pools["test"]


def test_no_test_sentence_of_any_task_is_a_training_sentence_of_any_task(splits):
    train = {text_of(m, T.TASKS[n].instruction) for n, s in splits.items() for m in s.train.messages}
    for n, s in splits.items():
        test = {text_of(m, T.TASKS[n].instruction) for m in s.test.messages}
        validation = {text_of(m, T.TASKS[n].instruction) for m in s.validation.messages}
        assert not test & train, n
        assert not validation & train, n
    for domain in D.DOMAINS:  # the per-domain polarity pool draws from the same global split
        s = T.task_splits("polarity", domain)
        test = {text_of(m, D.INSTRUCTION) for m in s.test.messages}
        assert not test & train
        assert not test & {text_of(m, D.INSTRUCTION) for m in s.train.messages}


def test_sizes_choices_and_balance(splits):
    for name, s in splits.items():
        task = T.TASKS[name]
        assert (len(s.train), len(s.validation), len(s.test)) == (2000, 300, 600), name
        for part in (s.train, s.validation, s.test):
            assert part.choices == task.choices and part.num_labels == len(task.choices)
            assert all(0 <= y < len(task.choices) for y in part.labels)
            assert [task.choices[y] for y in part.labels] == part.responses
            counts = Counter(part.labels)
            assert len(counts) == len(task.choices) and max(counts.values()) == min(counts.values()), (name, counts)
    assert splits["polarity"].train.choices == ("negative", "positive")
    assert splits["source"].train.choices == ("movie", "tweet", "product", "news")
    assert splits["intensity"].train.choices == ("mild", "strong")
    assert splits["format"].train.choices == ("négatif", "positif")
    assert "French" in T.TASKS["format"].instruction and "positif or négatif" in T.TASKS["format"].instruction


def test_short_classes_are_taken_whole():
    nyt = T.task_splits("polarity", "nyt")
    pool = [s for s in T.sentence_pools(0)["test"] if s.domain == "nyt" and abs(s.rating) >= 0.5]
    assert len(nyt.test) == min(600, len(pool))  # every nyt polar test sentence (fewer than 600)
    positives = sum(s.rating > 0 for s in pool)
    assert Counter(nyt.test.labels)[1] == positives


def test_labels_of_hand_checked_rows(pools):
    """Rows picked by rating and domain, with the labels worked out by hand from the rules."""
    every = T.sentences()
    by = lambda pred: next(s for s in every if pred(s))  # noqa: E731
    strong_neg_tweet = by(lambda s: s.domain == "tweets" and s.rating <= -2.5)
    mild_pos_nyt = by(lambda s: s.domain == "nyt" and 0.5 <= s.rating < 2)
    neutral_amazon = by(lambda s: s.domain == "amazon" and abs(s.rating) < 0.5)
    exactly_two = by(lambda s: s.domain == "movies" and s.rating == 2.0)  # |rating| >= 2 is strong
    tasks = T.TASKS
    assert [tasks["polarity"].label(strong_neg_tweet), tasks["source"].label(strong_neg_tweet),
            tasks["intensity"].label(strong_neg_tweet), tasks["format"].label(strong_neg_tweet)] == [0, 1, 1, 0]
    assert [tasks["polarity"].label(mild_pos_nyt), tasks["source"].label(mild_pos_nyt),
            tasks["intensity"].label(mild_pos_nyt), tasks["format"].label(mild_pos_nyt)] == [1, 3, 0, 1]
    assert tasks["source"].choices[tasks["source"].label(neutral_amazon)] == "product"
    assert not tasks["polarity"].keep(neutral_amazon) and tasks["intensity"].keep(neutral_amazon)
    assert tasks["intensity"].choices[tasks["intensity"].label(exactly_two)] == "strong"
    # the polarity task is the library's VADER instruct data: same instruction, choices and label rule
    assert T.TASKS["polarity"].instruction == D.INSTRUCTION
    pol = T.task_split("polarity", "test", "movies", limit=100000)
    ratings = {t: r for t, r in D.vader_ratings("movies")}
    for m, y in zip(pol.messages, pol.labels):
        assert y == int(ratings[text_of(m, D.INSTRUCTION)] > 0)
    assert sorted(m[0]["content"] for m in pol.messages) == sorted(
        m[0]["content"] for m, t in ((m, text_of(m, D.INSTRUCTION)) for m in pol.messages) if abs(ratings[t]) >= 0.5)


def test_every_polar_or_labelled_row_matches_its_rating(splits):
    ratings = {s.text: s for s in T.sentences()}
    for name, s in splits.items():
        task = T.TASKS[name]
        for m, y in zip(s.test.messages, s.test.labels):
            row = ratings[text_of(m, task.instruction)]
            assert task.keep(row) and task.label(row) == y


def test_spec_parses_through_load_data():
    assert T.parse_spec("vader-task:source") == (["source"], None)
    assert T.parse_spec("vader-task:polarity@movies") == (["polarity"], "movies")
    assert T.parse_spec("vader-task:all") == (list(T.TASK_NAMES), None)
    assert T.parse_spec("vader-task:polarity+format") == (["polarity", "format"], None)
    s = D.load_data("vader-task:intensity", "instruct")
    assert s.test.choices == ("mild", "strong") and len(s.test) == 600
    for bad, words in [("vader-task:sarcasm", "unknown VADER task"), ("vader-task:polarity@imdb", "unknown VADER domain"),
                       ("vader-task:source@movies", "cannot be restricted"), ("vader-task:polarity@", "no domain"),
                       ("vader-task:polarity+polarity", "twice")]:
        with pytest.raises(DataError, match=words):
            D.load_data(bad, "instruct")
    with pytest.raises(DataError, match="instruct"):
        D.load_data("vader-task:polarity", "classification")
    assert len(D.load_data("vader:movies", "instruct").test) == 2000  # the existing spec is unchanged


def test_multi_task_mix_contains_all_four(splits):
    m = D.load_data("vader-task:all", "instruct")
    assert (len(m.train), len(m.validation), len(m.test)) == (8000, 1200, 2400)
    assert m.train.choices == ()
    for split in ("train", "test"):
        mixed = Counter((msg[-1]["content"], r) for msg, r in zip(getattr(m, split).messages, getattr(m, split).responses))
        for name, s in splits.items():
            part = getattr(s, split)
            assert all(mixed[(msg[-1]["content"], r)] > 0 for msg, r in zip(part.messages, part.responses)), name
    firsts = [next(n for n in T.TASK_NAMES if msg[-1]["content"].startswith(T.TASKS[n].instruction[:40]))
              for msg in m.train.messages[:40]]
    assert len(set(firsts)) > 1  # shuffled, not task after task
    assert set(r for r in m.test.responses) == {c for t in T.TASKS.values() for c in t.choices}


def test_cli_parses_the_spec(tmp_path):
    """`lorakit train --data vader-task:...` reaches the run's data splits (no model is loaded here)."""
    from lorakit.cli import build_parser, settings
    from lorakit.train.args import RunConfig
    from lorakit.train.run import load_splits

    argv = ["train", "--model", "smollm2", "--task", "instruct", "--data", "vader-task:polarity@tweets", "--bf16",
            "--output-dir", str(tmp_path / "run")]
    args, _ = build_parser().parse_known_args(argv)
    config = RunConfig.from_flat(settings(args))
    assert config.data == "vader-task:polarity@tweets"
    s = load_splits(config)
    assert s.test.choices == ("negative", "positive") and len(s.train) == 2000
    assert len(s.test) == len(T.task_split("polarity", "test", "tweets"))
