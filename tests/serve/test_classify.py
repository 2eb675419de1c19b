"""Per-request-adapter classification (MiniLM): one mixed batch equals each row alone; the async micro-batcher."""
import asyncio
import copy

import pytest
import torch

import lorakit
from lorakit.errors import (AdapterNameError, EngineStoppedError, QueueFullError, RequestError, StateDictError,
                            UnknownAdapterError)
from lorakit.models import minilm_dir
from lorakit.serve.classify import AsyncClassifier, Classifier

pytestmark = pytest.mark.usefixtures("one_thread_module")
TEXTS = ["a wonderful, moving film", "terrible acting and a dull plot", "it was fine I guess",
         "absolutely loved every minute of it, would watch again", "meh", "the worst service I have ever had"]
ADAPTERS = {"a": dict(r=4, target_modules=["query", "value"]),
            "b": dict(r=8, target_modules=["query", "key", "value", "dense"], use_rslora=True)}


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    """Two adapters (non-zero B, own perturbed classifier heads) saved from a copy of the seeded base."""
    base = Classifier(minilm_dir(), seed=0).model
    dirs = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        model = copy.deepcopy(base)
        torch.manual_seed(10 + i)
        lorakit.inject(model, lorakit.AdapterConfig(lora_alpha=2 * kw["r"], init_lora_weights=False,
                                                    task_type="SEQ_CLS", **kw), name)
        with torch.no_grad():
            for key, p in lorakit.adapter_parameters(model, name).items():
                p.add_(torch.randn_like(p) * (0.5 if "classifier" in key else 0.05))
        dirs[name] = lorakit.save_adapter(model, tmp_path_factory.mktemp(name), name)
    return dirs


@pytest.fixture
def clf(adapter_dirs):
    c = Classifier(minilm_dir(), seed=0)
    for name, path in adapter_dirs.items():
        c.register_adapter(name, path)
    return c


def alone(c, text, name):
    """Probabilities for one text with only `name` active (None: adapters disabled)."""
    batch = c.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        if name is None:
            with lorakit.disabled(c.model):
                logits = c.model(**batch).logits
        else:
            lorakit.set_active(c.model, [name])
            logits = c.model(**batch).logits
    return torch.softmax(logits, -1)[0]


def test_mixed_batch_equals_each_row_alone(clf):
    names = ["a", None, "b", "b", "__base__", "a"]
    probs = clf.classify(TEXTS, names)
    assert len(probs) == len(TEXTS) and all(len(p) == 2 and abs(sum(p) - 1) < 1e-5 for p in probs)
    for text, name, row in zip(TEXTS, names, probs):
        ref = alone(clf, text, None if name == "__base__" else name)
        assert (torch.tensor(row) - ref).abs().max() <= 1e-5, name
    # the adapters really differ from the base and from each other on the same text
    same = clf.classify([TEXTS[0]] * 3, [None, "a", "b"])
    assert abs(same[0][0] - same[1][0]) > 1e-3 and abs(same[0][0] - same[2][0]) > 1e-3
    assert abs(same[1][0] - same[2][0]) > 1e-3
    assert clf.classify([TEXTS[0]])[0] == pytest.approx(same[0], abs=1e-6)  # adapters=None: all base


def test_validation_and_adapter_lifecycle(clf, adapter_dirs):
    with pytest.raises(UnknownAdapterError, match="'zzz'"):
        clf.classify(["x"], ["zzz"])
    for texts, adapters, field in [("just a string", None, "input"), ([], None, "input"), ([3], None, "input"),
                                   (["x" * 200_001], None, "input"), (["x", "y"], ["a"], "adapters"),
                                   (["x"], [5], "adapters"), (["x"], "a", "adapters")]:
        with pytest.raises(RequestError) as e:
            clf.classify(texts, adapters)
        assert e.value.field == field
    with pytest.raises(AdapterNameError):
        clf.register_adapter("a", adapter_dirs["a"])  # taken
    clf.unregister_adapter("a")
    assert clf.adapters() == {"b": str(adapter_dirs["b"])}
    with pytest.raises(UnknownAdapterError):
        clf.classify(["x"], ["a"])
    with pytest.raises(UnknownAdapterError):
        clf.unregister_adapter("a")
    clf.register_adapter("a2", adapter_dirs["a"])  # the same folder under another name
    assert (torch.tensor(clf.classify([TEXTS[1]], ["a2"])[0]) - alone(clf, TEXTS[1], "a2")).abs().max() <= 1e-5
    three = Classifier(minilm_dir(), num_labels=3)
    with pytest.raises(StateDictError):  # its saved head has 2 labels
        three.register_adapter("a", adapter_dirs["a"])
    assert three.adapters() == {}


def test_long_text_is_truncated(clf):
    long = "good " * 2000
    assert len(clf.tokenizer(long)["input_ids"]) > clf.max_length
    assert len(clf.classify([long, "short"], ["a", "b"])) == 2


def test_async_micro_batches_mixed_requests(clf):
    requests = [([TEXTS[0], TEXTS[1]], ["a", None]), ([TEXTS[2]], ["b"]), ([TEXTS[3], TEXTS[4]], [None, "b"])]

    async def run():
        ac = AsyncClassifier(clf, max_batch_size=8, max_wait_ms=200)
        out = await asyncio.gather(*(ac.classify(t, a) for t, a in requests))
        await ac.close()
        return out, ac.batches

    out, batches = asyncio.run(asyncio.wait_for(run(), 60))
    assert batches == 1  # three requests, one forward
    for (texts, names), probs in zip(requests, out):
        assert len(probs) == len(texts)
        for text, name, row in zip(texts, names, probs):
            assert (torch.tensor(row) - alone(clf, text, name)).abs().max() <= 1e-5


def test_async_queue_full_too_many_texts_and_close(clf):
    async def run():
        ac = AsyncClassifier(clf, max_batch_size=4, max_wait_ms=300, max_queue=2, max_texts_per_request=6)
        first = [asyncio.ensure_future(ac.classify([t], ["a"])) for t in TEXTS[:2]]
        await asyncio.sleep(0)  # both enqueue; the worker waits for more until the window ends
        assert ac.queue_depth() == 2
        with pytest.raises(QueueFullError):
            await ac.classify(["one more"], ["b"])
        with pytest.raises(QueueFullError):  # a limit of 2 waiting batches also counts the chunks of a request
            await ac.classify(["x"] * 5)
        with pytest.raises(RequestError) as e:
            await ac.classify(["x"] * 7)
        assert e.value.field == "input"
        with pytest.raises(UnknownAdapterError):
            await ac.classify(["x"], ["nope"])
        done = await asyncio.gather(*first)
        await ac.close()
        with pytest.raises(EngineStoppedError):
            await ac.classify(["x"])
        return done

    done = asyncio.run(asyncio.wait_for(run(), 60))
    assert [len(d) for d in done] == [1, 1]


def test_async_unregister_fails_only_the_requests_for_that_adapter(clf):
    async def run():
        ac = AsyncClassifier(clf, max_batch_size=8, max_wait_ms=300)
        jobs = [asyncio.ensure_future(ac.classify([TEXTS[0]], names)) for names in (["a"], ["b"], [None])]
        await asyncio.sleep(0)
        await ac.unregister_adapter("a")  # runs on the worker before the batch does
        results = await asyncio.gather(*jobs, return_exceptions=True)
        await ac.close()
        return results

    gone, b, base = asyncio.run(asyncio.wait_for(run(), 60))
    assert isinstance(gone, UnknownAdapterError)
    assert (torch.tensor(b[0]) - alone(clf, TEXTS[0], "b")).abs().max() <= 1e-5
    assert (torch.tensor(base[0]) - alone(clf, TEXTS[0], None)).abs().max() <= 1e-5


def test_async_splits_a_large_request_into_batches(clf):
    names = ["a", None, "b", "b", None, "a"]

    async def run():
        ac = AsyncClassifier(clf, max_batch_size=2, max_wait_ms=1)
        out = await ac.classify(TEXTS, names)
        await ac.close()
        return out, ac.batches, ac.model_name, ac.labels

    out, batches, model_name, labels = asyncio.run(asyncio.wait_for(run(), 60))
    assert batches == 3 and model_name == clf.model_name and labels == clf.labels == ["LABEL_0", "LABEL_1"]
    assert (torch.tensor(out) - torch.tensor(clf.classify(TEXTS, names))).abs().max() <= 1e-5


def test_adapter_label_names_are_served_by_classify(adapter_dirs, tmp_path):
    from fake_engine import FakeEngine, served

    c = Classifier(minilm_dir(), seed=0)
    model = copy.deepcopy(c.model)
    model.config.id2label = {0: "negative", 1: "positive"}
    lorakit.inject(model, lorakit.AdapterConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"), "named")
    folder = lorakit.save_adapter(model, tmp_path / "named", "named")
    c.register_adapter("named", folder)
    c.register_adapter("a", adapter_dirs["a"])
    assert c.labels_for("named") == ["negative", "positive"]
    assert c.labels_for("a") == c.labels_for(None) == ["LABEL_0", "LABEL_1"]  # nothing saved: the fallback

    async def main():
        async with served(FakeEngine(), None, classifier=AsyncClassifier(c)) as client:
            r = await client.post("/v1/classify", json={"model": "named", "input": ["good", "bad"]})
            assert r.status_code == 200, r.text
            assert {d["label"] for d in r.json()["data"]} <= {"negative", "positive"}
            r = await client.post("/v1/classify", json={"input": "good"})
            assert r.json()["data"][0]["label"] in ("LABEL_0", "LABEL_1")
    asyncio.run(main())
