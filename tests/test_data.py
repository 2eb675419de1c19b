"""lorakit.data: the VADER fetch/cache, its splits and label rules, and the CSV/JSONL readers with their errors.

The real VADER fetch runs once per machine into the shared cache (`$LORAKIT_CACHE` or ~/.cache/lorakit);
two tests also run pip for real into a temporary cache. No VADER text is stored in this file.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from lorakit import cache, data as D
from lorakit.cache import pip_download
from lorakit.errors import DataError

# The files hold one row more than DESIGN.md lists (10,604 / 4,199 / 3,707 / 5,189: `wc -l` counts, the
# last line has no newline); these match the VADER paper (Hutto & Gilbert 2014, table 2).
ROWS = {"movies": 10605, "tweets": 4200, "amazon": 3708, "nyt": 5190}
CLASSIFICATION_SPLITS = {"movies": (7072, 1000, 2000), "tweets": (2403, 343, 686),
                         "amazon": (2090, 298, 597), "nyt": (2079, 297, 594)}
REGRESSION_SPLITS = {"movies": (7605, 1000, 2000), "tweets": (2940, 420, 840),
                     "amazon": (2597, 370, 741), "nyt": (3633, 519, 1038)}


@pytest.fixture(scope="module")
def shared_cache():
    """The VADER files in the shared cache (fetched here on a fresh machine)."""
    return D.vader_files()


@pytest.fixture(scope="module")
def real_sdist(tmp_path_factory):
    """The real vaderSentiment sdist, downloaded with the exact pip command the loader uses."""
    return pip_download(D.VADER_REQUIREMENT, tmp_path_factory.mktemp("sdist"), "VADER data", DataError, source=True)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORAKIT_CACHE", str(cache))
    monkeypatch.delenv("LORAKIT_VADER_SDIST", raising=False)
    return cache


def cache_entries(cache: Path):
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def fake_sdist(path: Path, inner_members: dict, outer_extra: dict | None = None) -> Path:
    """A .tar.gz shaped like the sdist: {name: bytes or ('symlink', target)} inside the nested archive."""
    def tar(members):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as t:
            for name, content in members.items():
                info = tarfile.TarInfo(name)
                if isinstance(content, tuple):
                    info.type, info.linkname = tarfile.SYMTYPE, content[1]
                    t.addfile(info)
                else:
                    info.size = len(content)
                    t.addfile(info, io.BytesIO(content))
        return buf.getvalue()
    outer = {"vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": tar(inner_members),
             **(outer_extra or {})}
    path.write_bytes(tar(outer))
    return path


# ---- fetching and caching -----------------------------------------------------------------

def test_fetch_into_fresh_cache_then_reuse(fresh_cache, shared_cache, monkeypatch):
    folder = D.vader_files()  # real pip download
    assert folder == fresh_cache / "vader-3.3.2" and cache_entries(fresh_cache) == ["vader-3.3.2"]
    for name in D._VADER_FILES.values():
        assert (folder / name).read_bytes() == (shared_cache / name).read_bytes()

    def no_pip(*a, **k):
        raise AssertionError("pip must not run once the cache exists")
    monkeypatch.setattr(cache.subprocess, "run", no_pip)
    assert D.vader_files() == folder


def test_unreachable_index_says_how_to_predownload(fresh_cache, monkeypatch):
    for key in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # ignore site pip config (extra indexes, find-links)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on port 9
    monkeypatch.setenv("PIP_RETRIES", "0")
    with pytest.raises(DataError) as e:
        D.vader_files()
    msg = str(e.value)
    assert "pip download --no-deps --no-binary :all: 'vaderSentiment==3.3.2' -d DIR" in msg
    assert "LORAKIT_VADER_SDIST=" in msg
    assert cache_entries(fresh_cache) == []  # no cache, no leftover temp folder


def test_predownloaded_sdist(fresh_cache, real_sdist, shared_cache, monkeypatch):
    monkeypatch.setenv("LORAKIT_VADER_SDIST", str(real_sdist))
    monkeypatch.setattr(cache.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    folder = D.vader_files()
    assert sorted(p.name for p in folder.iterdir()) == sorted([*D._VADER_FILES.values(), "LICENSE.txt"])
    assert (folder / D._VADER_FILES["nyt"]).read_bytes() == (shared_cache / D._VADER_FILES["nyt"]).read_bytes()
    monkeypatch.setenv("LORAKIT_VADER_SDIST", str(real_sdist.parent / "missing.tar.gz"))
    monkeypatch.setenv("LORAKIT_CACHE", str(fresh_cache.parent / "other"))
    with pytest.raises(DataError, match="LORAKIT_VADER_SDIST=.*missing.tar.gz is not a file"):
        D.vader_files()


def test_failure_mid_extraction_leaves_no_cache(fresh_cache, real_sdist, monkeypatch):
    monkeypatch.setenv("LORAKIT_VADER_SDIST", str(real_sdist))
    writes = []
    real_write = Path.write_bytes

    def failing_write(self, data):
        writes.append(self.name)
        if len(writes) == 3:
            raise OSError("disk full (simulated)")
        return real_write(self, data)
    monkeypatch.setattr(Path, "write_bytes", failing_write)
    with pytest.raises(OSError, match="simulated"):
        D.vader_files()
    assert len(writes) == 3 and cache_entries(fresh_cache) == []
    monkeypatch.undo()
    monkeypatch.setenv("LORAKIT_CACHE", str(fresh_cache))
    monkeypatch.setenv("LORAKIT_VADER_SDIST", str(real_sdist))
    assert len(D.vader_ratings("tweets")) == ROWS["tweets"]  # the next call fetches cleanly


def test_incomplete_cache_is_reported(fresh_cache):
    (fresh_cache / "vader-3.3.2").mkdir(parents=True)
    with pytest.raises(DataError, match="lacks .*GroundTruth.txt; delete the folder"):
        D.vader_files()


def test_wrong_sdist_is_refused(fresh_cache, tmp_path, monkeypatch):
    sdist = fake_sdist(tmp_path / "vaderSentiment-3.3.2.tar.gz", {"x/tweets_GroundTruth.txt": b"1\t1.0\thi\n"})
    monkeypatch.setenv("LORAKIT_VADER_SDIST", str(sdist))
    with pytest.raises(DataError, match="is not the vaderSentiment==3.3.2 sdist"):
        D.vader_files()
    assert cache_entries(fresh_cache) == []


def test_extraction_writes_only_known_names(fresh_cache, tmp_path, monkeypatch):
    """Member paths are never used as output paths: traversal names and links cannot escape or land."""
    row = b"1\t1.5\tfine\r\n"
    inner = {f"../../../{tmp_path.name}/{name}": row for name in D._VADER_FILES.values()}
    inner["../../escape.txt"] = b"x"
    sdist = fake_sdist(tmp_path / "evil.tar.gz", inner, {"../outer_escape.txt": b"x"})
    monkeypatch.setattr(D, "VADER_SHA256", hashlib.sha256(sdist.read_bytes()).hexdigest())
    monkeypatch.setenv("LORAKIT_VADER_SDIST", str(sdist))
    folder = D.vader_files()
    assert sorted(p.name for p in folder.iterdir()) == sorted(D._VADER_FILES.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "evil.tar.gz"]
    assert D.vader_ratings("movies") == [("fine", 1.5)]

    linked = dict(inner, **{"h/tweets_GroundTruth.txt": ("symlink", "/etc/passwd")})
    del linked[f"../../../{tmp_path.name}/tweets_GroundTruth.txt"]
    sdist = fake_sdist(tmp_path / "evil.tar.gz", linked)
    monkeypatch.setattr(D, "VADER_SHA256", hashlib.sha256(sdist.read_bytes()).hexdigest())
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(DataError, match="has no tweets_GroundTruth.txt"):
        D.vader_files()


# ---- VADER content and splits --------------------------------------------------------------

@pytest.mark.parametrize("domain", D.DOMAINS)
def test_rows_per_domain(shared_cache, domain):
    rows = D.vader_ratings(domain)
    assert len(rows) == ROWS[domain]
    assert all(isinstance(t, str) and t and t == t.strip() for t, _ in rows)
    assert all(-4 <= r <= 4 for _, r in rows)
    if domain == "movies":  # UTF-8, not Latin-1: accented names decode to single characters
        assert any("é" in t for t, _ in rows) and not any("Ã" in t for t, _ in rows)


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("domain", D.DOMAINS)
def test_splits_partition_the_labelled_rows(shared_cache, domain, task):
    """Train + validation + test is exactly the labelled domain (as a multiset: a few texts repeat)."""
    splits = D.vader(domain, task)
    sizes = CLASSIFICATION_SPLITS if task == "classification" else REGRESSION_SPLITS
    assert (len(splits.train), len(splits.validation), len(splits.test)) == sizes[domain]
    rows = D.vader_ratings(domain)
    if task == "classification":
        expected = Counter((t, 1 if r > 0 else 0) for t, r in rows if abs(r) >= 0.5)
        assert {s.num_labels for s in vars(splits).values()} == {2}
    else:
        expected = Counter(rows)
        assert {s.num_labels for s in vars(splits).values()} == {1}
    got = Counter(pair for s in vars(splits).values() for pair in zip(s.texts, s.labels))
    assert got == expected
    assert all(s.task == task for s in vars(splits).values())


def test_split_determinism_and_items(shared_cache):
    a, b, c = D.vader("movies", seed=0), D.vader("movies", seed=0), D.vader("movies", seed=1)
    assert a == b
    assert a.test.texts != c.test.texts and len(c.test) == 2000
    assert Counter(a.test.texts) != Counter(c.test.texts)
    item = a.train[0]
    assert item == {"text": a.train.texts[0], "label": a.train.labels[0]} and type(item["label"]) is int
    assert type(D.vader("nyt", "regression").train[0]["label"]) is float
    assert D.load_data("vader:movies", seed=1) == c


def test_select(shared_cache):
    train = D.vader("tweets").train
    sub = train.select(100, seed=3)
    assert len(sub) == 100 and sub == train.select(100, seed=3) and sub != train.select(100, seed=4)
    positions = [train.texts.index(t) for t in sub.texts]
    assert positions == sorted(positions)  # file order kept
    assert train.select(10**6) == train and len(train.select(0)) == 0
    with pytest.raises(DataError, match="n >= 0"):
        train.select(-1)


def test_unknown_domain_and_task(shared_cache):
    with pytest.raises(DataError, match="unknown VADER domain 'imdb'; valid: movies, tweets, amazon, nyt"):
        D.load_data("vader:imdb")
    with pytest.raises(DataError, match="classification, regression and instruct"):
        D.vader("movies", "causal-lm")
    with pytest.raises(DataError, match="unknown task 'ner'; valid: classification, regression, causal-lm, instruct"):
        D.load_data("vader:movies", task="ner")


# ---- user files ----------------------------------------------------------------------------

def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, rows) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def test_read_csv(tmp_path):
    p = write(tmp_path / "d.csv", '\ufeffid,text,label\n1,"good, very ""good""",1\n2,"two\nlines",0.0\n3,meh,2\n')
    ds = D.read_table(p)
    assert ds.texts == ['good, very "good"', "two\nlines", "meh"] and ds.labels == [1, 0, 2]
    assert (ds.task, ds.num_labels) == ("classification", 3) and all(type(y) is int for y in ds.labels)
    reg = D.read_table(p, text_column="text", label_column="id", task="regression")
    assert reg.labels == [1.0, 2.0, 3.0] and reg.num_labels == 1


def test_read_jsonl(tmp_path):
    p = jsonl(tmp_path / "d.jsonl", [{"sentence": "a", "y": "-0.5"}, {"sentence": "b", "y": 2.25}])
    write(p, p.read_text() + "\n   \n")  # blank lines are skipped
    ds = D.read_table(p, text_column="sentence", label_column="y", task="regression")
    assert ds.texts == ["a", "b"] and ds.labels == [-0.5, 2.25]
    assert D.read_table(jsonl(tmp_path / "c.jsonl", [{"text": "x", "label": 0}, {"text": "y", "label": 1}])).num_labels == 2
    comp = D.read_completions(jsonl(tmp_path / "lm.jsonl", [{"prompt": "Q: 1+1?", "completion": " 2"}]))
    assert comp[0] == {"prompt": "Q: 1+1?", "completion": " 2"} and (comp.task, comp.num_labels) == ("causal-lm", 0)


@pytest.mark.parametrize("name, content, kwargs, message", [
    ("d.csv", "text,sentiment\na,1\n", {}, r"d.csv row 1 \(line 2\): no column 'label'; columns: text, sentiment"),
    ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', {}, r"d.jsonl line 2: no column 'label'; columns: text"),
    ("d.csv", "", {}, "d.csv is empty"),
    ("d.csv", "text,label\n", {}, "d.csv is empty"),
    ("d.jsonl", "\n\n", {}, "d.jsonl is empty"),
    ("d.csv", "text,label\na,1\nb,positive\n", {}, r"row 2 \(line 3\): label 'positive' is not a number"),
    ("d.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", "label": "x1"}\n', {"task": "regression"},
     "line 3: label 'x1' is not a number"),
    ("d.jsonl", '{"text": "a", "label": true}\n', {}, "line 1: label True is not a number"),
    ("d.csv", "text,label\na,nan\n", {"task": "regression"}, "row 1 .*label 'nan' is not finite"),
    ("d.csv", "text,label\na,1\nb,2\n", {}, r"class labels must be 0..K-1; found \[1, 2\], missing \[0\]"),
    ("d.csv", "text,label\na,0\nb,0.5\n", {}, "row 2 .*class label 0.5 is not an integer id"),
    ("d.csv", "text,label\na,0\nb,-1\n", {}, "row 2 .*class label -1 is not an integer id"),
    ("d.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1\n', {}, r"d.jsonl line 2: not valid JSON"),
    ("d.jsonl", '["a", 1]\n', {}, "line 1: expected a JSON object, got list"),
    ("d.jsonl", '{"text": 5, "label": 1}\n', {}, "line 1: 'text' should be text, got 5"),
    ("d.txt", "a\t1\n", {}, r"unsupported file type '.txt'; use .csv or .jsonl"),
])
def test_read_table_errors(tmp_path, name, content, kwargs, message):
    with pytest.raises(DataError, match=message):
        D.read_table(write(tmp_path / name, content), **kwargs)


def test_missing_file_and_unknown_spec(tmp_path):
    with pytest.raises(DataError, match="no such data file: .*nope.csv"):
        D.read_table(tmp_path / "nope.csv")
    with pytest.raises(DataError, match=r"unknown data spec .*nope.csv.*vader:<domain> \(domains: movies"):
        D.load_data(str(tmp_path / "nope.csv"))
    with pytest.raises(DataError, match="no column 'completion'"):
        D.read_completions(jsonl(tmp_path / "lm.jsonl", [{"prompt": "a", "response": "b"}]))


def labelled(n, k=2):
    return [{"text": f"t{i}", "label": i % k} for i in range(n)]


def test_split_and_load_file(tmp_path):
    ds = D.read_table(jsonl(tmp_path / "d.jsonl", labelled(50)))
    s = D.split(ds, seed=0)
    assert (len(s.train), len(s.validation), len(s.test)) == (40, 5, 5)
    assert sorted(s.train.texts + s.validation.texts + s.test.texts) == sorted(ds.texts)
    assert D.split(ds, seed=0) == s != D.split(ds, seed=1)
    assert D.load_data(str(tmp_path / "d.jsonl")) == s
    counts = D.split(ds, validation=3, test=0)
    assert (len(counts.train), len(counts.validation), len(counts.test)) == (47, 3, 0)
    with pytest.raises(DataError, match="2 rows are too few"):
        D.split(ds.select(2))


def test_load_folder(tmp_path):
    jsonl(tmp_path / "train.jsonl", labelled(30, k=3))
    only_train = D.load_data(str(tmp_path))
    assert (len(only_train.train), len(only_train.validation), len(only_train.test)) == (24, 3, 3)
    write(tmp_path / "test.csv", "text,label\nx,2\ny,0\n")
    with_test = D.load_data(str(tmp_path))
    assert (len(with_test.train), len(with_test.validation)) == (27, 3) and with_test.test.labels == [2, 0]
    assert with_test.test.num_labels == 3  # the training file defines the classes
    jsonl(tmp_path / "validation.jsonl", [{"text": "v", "label": 1}])  # class 0, 2 absent: fine here
    full = D.load_data(str(tmp_path))
    assert len(full.train) == 30 and full.validation.labels == [1] and full.validation.num_labels == 3
    write(tmp_path / "test.csv", "text,label\nx,3\n")
    with pytest.raises(DataError, match=r"test.csv row 1 .*class label 3 is not an integer id 0..2"):
        D.load_data(str(tmp_path))
    write(tmp_path / "test.jsonl", "")
    with pytest.raises(DataError, match="both test.csv and test.jsonl"):
        D.load_data(str(tmp_path))


def test_load_folder_errors_and_causal_lm(tmp_path):
    with pytest.raises(DataError, match="has no train.csv or train.jsonl"):
        D.load_data(str(tmp_path))
    jsonl(tmp_path / "train.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)])
    lm = D.load_data(str(tmp_path), task="causal-lm")
    assert (len(lm.train), len(lm.validation), len(lm.test)) == (16, 2, 2)
    assert isinstance(lm.train, D.CompletionDataset) and lm.test[0]["prompt"].startswith("p")
    with pytest.raises(DataError, match="no column 'text'; columns: prompt, completion"):
        D.load_data(str(tmp_path))
