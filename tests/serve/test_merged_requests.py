"""Requests that name several adapters with weights (`merged_adapters`) or ask for retrieval (`retrieve`), served by the
real Engine on the tiny random Llama of the other server tests (in-process ASGI, no sockets)."""
import asyncio
import json
import math
import os
import time

import pytest

from fake_engine import save_adapter, served, tiny_model_dir
from lorakit.compose.merge import merge_folders

pytestmark = pytest.mark.usefixtures("one_thread_module")

DESCRIPTIONS = {"fr": "Translates English sentences into French.",
                "code": "Writes Python code: functions, classes and fixes for programming bugs."}
CODE_PROMPT = "def fibonacci(n): write a Python function that returns the n-th Fibonacci number"
FRENCH_PROMPT = "Translate into French: the cat is sleeping on the kitchen table."


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Adapters a (r 4 on q, v), b (r 8 on q, k, v, o), fr = a, code = b, and ab: a, b merged offline (0.7, 0.3)."""
    root = tmp_path_factory.mktemp("adapters")
    save_adapter(tiny_model_dir(), root / "a", r=4, seed=1)
    save_adapter(tiny_model_dir(), root / "b", r=8, seed=2, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    save_adapter(tiny_model_dir(), root / "c", r=2, seed=3)
    merge_folders([root / "a", root / "b"], [0.7, 0.3], root / "ab", method="cat")
    return root


def engine(root, names=("a", "b"), **config):
    from lorakit.serve.config import EngineConfig
    from lorakit.serve.engine import Engine

    config.setdefault("memory_bytes", 1 << 24)
    e = Engine.from_dir(tiny_model_dir(), EngineConfig(**config))
    for name in names:
        e.register_adapter(name, str(root / {"fr": "a", "code": "b"}.get(name, name)))
    return e


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


BODY = {"prompt": "hello world", "max_tokens": 10, "temperature": 0, "ignore_eos": True, "logprobs": 0}


async def complete(c, **fields):
    r = await c.post("/v1/completions", json={**BODY, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def output(body):
    """(text, token log-probs) of a one-choice completion."""
    choice = body["choices"][0]
    return choice["text"], choice["logprobs"]["token_logprobs"]


def same(x, y, tol=1e-5):
    return x[0] == y[0] and all(abs(p - q) <= tol for p, q in zip(x[1], y[1])) and len(x[1]) == len(y[1])


def error_of(r, status, param):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["param"] == param and err["message"], err
    assert err["type"] == "invalid_request_error", err
    return err


def merged(ids, weights, **extra):
    return {"merged_adapters": {"ids": ids, "weights": weights, **extra}}


# ---------------------------------------------------------------- merged_adapters
def test_merged_request_equals_the_offline_merge(tok, root):
    async def main():
        async with served(engine(root, ("a", "b", "ab")), tok) as c:
            got = await complete(c, **merged(["a", "b"], [0.7, 0.3], merge_strategy="linear"))
            assert got["model"] == "merge:a=0.7,b=0.3"
            offline = output(await complete(c, model="ab"))
            alone_a, alone_b = output(await complete(c, model="a")), output(await complete(c, model="b"))
            base = output(await complete(c))
            assert same(output(got), offline)  # the same greedy tokens, log-probs within 1e-5
            for other in (alone_a, alone_b):  # the merge is neither source (both change the base's output)
                assert other[0] != base[0] and other[0] != offline[0]
            # the same merge named in another order (and int weights) is the same adapter: no second build
            again = await complete(c, **merged(["b", "a"], [0.3, 0.7]))
            assert again["model"] == got["model"] and same(output(again), offline)
            # `model` may repeat the derived name, and names it alone later
            by_name = await complete(c, model=got["model"])
            assert same(output(by_name), offline)
            assert c.app.state.merges.builds == 1
            # weights [1, 0] are adapter a alone
            one = await complete(c, **merged(["a", "b"], [1, 0]))
            assert one["model"] == "merge:a=1.0,b=0.0" and same(output(one), alone_a)
            # chat takes the field too
            r = await c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0,
                **merged(["a", "b"], [0.7, 0.3])})
            assert r.status_code == 200 and r.json()["model"] == "merge:a=0.7,b=0.3"
            models = {m["id"]: m for m in (await c.get("/v1/models")).json()["data"]}
            entry = models["merge:a=0.7,b=0.3"]
            assert entry["parent"] == "tiny-llama" and (root / "ab").is_dir() and entry["root"] != str(root / "ab")
            assert "merge:a=1.0,b=0.0" in models
            folder = c.app.state.merges.entries()["merge:a=0.7,b=0.3"]["path"]
            async with c.app.router.lifespan_context(c.app):  # the server's end: its merge folders go
                pass
            assert not os.path.exists(folder)
    run(main())


def test_merge_built_once_and_bounded_lru(tok, root):
    async def main():
        async with served(engine(root), tok, max_merged_adapters=2) as c:
            merges = c.app.state.merges
            calls = []

            def slow_merge(*args, **kwargs):  # the build takes a while: the 4 requests all arrive during it
                calls.append(args)
                time.sleep(0.3)
                return merge_folders(*args, **kwargs)
            merges._merge = slow_merge
            rs = await asyncio.gather(*[c.post("/v1/completions", json={**BODY, **merged(["a", "b"], [0.5, 0.5])})
                                        for _ in range(4)])
            assert [r.status_code for r in rs] == [200] * 4 and merges.builds == 1 and len(calls) == 1
            merges._merge = None  # merge_folders again
            first = output(rs[0].json())
            assert all(same(output(r.json()), first) for r in rs)  # batched together: log-probs to float rounding
            x, y, z = "merge:a=0.5,b=0.5", "merge:a=0.25,b=0.75", "merge:a=0.75,b=0.25"
            x_folder = merges.entries()[x]["path"]
            await complete(c, **merged(["a", "b"], [0.25, 0.75]))
            await complete(c, **merged(["a", "b"], [0.75, 0.25]))
            assert merges.builds == 3 and merges.evictions == 1 and list(merges.entries()) == [y, z]
            assert x not in c.ae.adapters() and not os.path.exists(x_folder)
            assert x not in [m["id"] for m in (await c.get("/v1/models")).json()["data"]]
            # named again by its derived name: rebuilt, same output; y (least recently used) goes
            assert same(output(await complete(c, model=x)), first)
            assert merges.builds == 4 and list(merges.entries()) == [z, x] and y not in c.ae.adapters()
            # a merge a request holds is not evicted, even as the least recently used one
            lease = await merges.acquire([("a", 0.75), ("b", 0.25)])  # z
            await complete(c, **merged(["a", "b"], [0.1, 0.9]))
            await complete(c, **merged(["a", "b"], [0.2, 0.8]))
            m2 = "merge:a=0.2,b=0.8"
            assert list(merges.entries()) == [z, m2] and z in c.ae.adapters()
            held = await merges.acquire([("a", 0.2), ("b", 0.8)])
            await complete(c, **merged(["a", "b"], [0.3, 0.7]))  # all held: over the bound until its response ends
            for _ in range(200):
                if len(merges.entries()) == 2:
                    break
                await asyncio.sleep(0.01)
            assert list(merges.entries()) == [z, m2] and "merge:a=0.3,b=0.7" not in c.ae.adapters()
            lease.release()
            held.release()
            held.release()  # idempotent
            await complete(c, **merged(["a", "b"], [0.4, 0.6]))
            assert list(merges.entries()) == [m2, "merge:a=0.4,b=0.6"] and z not in c.ae.adapters()
            assert merges.held() == {}  # every response released its merge
            # unloading a source drops the merges built from it
            r = await c.post("/v1/unload_lora_adapter", json={"lora_name": "b"})
            assert r.status_code == 200 and merges.entries() == {}
            assert sorted(c.ae.adapters()) == ["a"]
    run(main())


def test_merge_over_the_max_lora_rank_is_400(tok, root):
    async def main():
        async with served(engine(root, max_lora_rank=8), tok) as c:  # a: 4 + b: 8 = 12 on q and v
            r = await c.post("/v1/completions", json={**BODY, **merged(["a", "b"], [0.5, 0.5])})
            err = error_of(r, 400, "merged_adapters")
            assert "12" in err["message"] and "max LoRA rank 8" in err["message"]
            assert c.app.state.merges.builds == 0 and c.app.state.merges.entries() == {}
            await complete(c, model="b")
    run(main())


# ---------------------------------------------------------------- retrieve
def test_retrieval_picks_by_description(tok, root):
    async def main():
        async with served(engine(root, ("fr", "code")), tok, adapter_descriptions=DESCRIPTIONS,
                          adapter_roots=[str(root)]) as c:
            retriever = c.app.state.retriever
            assert retriever.encoder is None  # loaded at the first retrieval, not at start-up
            got = await complete(c, prompt=CODE_PROMPT, retrieve={"k": 1})
            assert got["model"] == "code" and retriever.loads == 1
            [hit] = got["lorakit"]["retrieved"]
            assert hit["id"] == "code" and hit["weight"] == 1.0 and -1 <= hit["score"] <= 1
            assert same(output(got), output(await complete(c, prompt=CODE_PROMPT, model="code")), 0)
            fr = await complete(c, prompt=FRENCH_PROMPT, retrieve={"k": 1, "temperature": 0.1})
            assert fr["model"] == "fr" and fr["lorakit"]["retrieved"][0]["id"] == "fr"
            # chat: the last user message decides
            r = await c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": FRENCH_PROMPT}, {"role": "assistant", "content": "ok"},
                             {"role": "user", "content": CODE_PROMPT}], "max_tokens": 3, "retrieve": {}})
            assert r.status_code == 200 and r.json()["model"] == "code"
            assert r.json()["lorakit"]["retrieved"][0]["id"] == "code"
            # k = 2: both, softmax weights summing to 1, served as their merge
            two = await complete(c, prompt=CODE_PROMPT, retrieve={"k": 2, "temperature": 0.05})
            picked = two["lorakit"]["retrieved"]
            assert [p["id"] for p in picked] == ["code", "fr"] and picked[0]["score"] > picked[1]["score"]
            assert math.isclose(sum(p["weight"] for p in picked), 1.0, abs_tol=2e-4)
            assert picked[0]["weight"] > picked[1]["weight"] > 0
            want = {p["id"]: p["weight"] for p in picked}
            assert two["model"] == f"merge:code={want['code']!r},fr={want['fr']!r}"
            same_merge = await complete(c, prompt=CODE_PROMPT, **merged(list(want), list(want.values())))
            assert same(output(two), output(same_merge), 0) and c.app.state.merges.builds == 1
            # streamed: every chunk carries the retrieval, the text is the same
            r = await c.post("/v1/completions", json={**BODY, "logprobs": None, "prompt": CODE_PROMPT, "stream": True,
                                                      "retrieve": {"k": 2, "temperature": 0.05}})
            chunks = [json.loads(e[len("data: "):]) for e in r.text.split("\n\n") if e.startswith("data: {")]
            assert "".join(ch["choices"][0]["text"] for ch in chunks) == two["choices"][0]["text"]
            assert all(ch["model"] == two["model"] and ch["lorakit"] == two["lorakit"] for ch in chunks)
            assert c.app.state.merges.held() == {} and c.app.state.merges.builds == 1
            # a description given when loading an adapter makes it a candidate; unloading forgets it
            r = await c.post("/v1/load_lora_adapter", json={
                "lora_name": "baking", "lora_path": str(root / "c"),
                "description": "Gives recipes for cooking: baking bread, cakes and pastries in the oven."})
            assert r.status_code == 200
            bread = await complete(c, prompt="How long should I bake a loaf of sourdough bread?", retrieve={"k": 1})
            assert bread["model"] == "baking"
            assert (await c.post("/v1/unload_lora_adapter", json={"lora_name": "baking"})).status_code == 200
            error_of(await c.post("/v1/completions", json={**BODY, "retrieve": {"k": 3}}), 400, "retrieve.k")
            assert retriever.loads == 1  # once
    run(main())


# ---------------------------------------------------------------- bad input
def test_bad_merged_and_retrieve_requests(tok, root):
    async def main():
        async with served(engine(root), tok, adapter_descriptions={"a": "French", "b": "Python"}) as c:
            ab = {"ids": ["a", "b"], "weights": [0.5, 0.5]}
            cases = [
                ({"merged_adapters": "a"}, 400, "merged_adapters"),
                ({"merged_adapters": {**ab, "ids": ["a", "nope"]}}, 404, "merged_adapters.ids"),
                ({"merged_adapters": {**ab, "weights": [1.0]}}, 400, "merged_adapters.weights"),
                ({"merged_adapters": {"ids": [], "weights": []}}, 400, "merged_adapters.ids"),
                ({"merged_adapters": {"ids": ["a", "a"], "weights": [1, 1]}}, 400, "merged_adapters.ids"),
                ({"merged_adapters": {"ids": ["a", 3], "weights": [1, 1]}}, 400, "merged_adapters.ids"),
                ({"merged_adapters": {**ab, "weights": ["1", 1]}}, 400, "merged_adapters.weights"),
                ({"merged_adapters": {**ab, "weights": [True, 1]}}, 400, "merged_adapters.weights"),
                ({"merged_adapters": {"ids": ["a", "b"]}}, 400, "merged_adapters.weights"),
                ({"merged_adapters": {**ab, "merge_strategy": "ties"}}, 400, "merged_adapters.merge_strategy"),
                ({"merged_adapters": {**ab, "density": 0.5}}, 400, "merged_adapters.density"),
                ({"merged_adapters": {**ab, "extra": 1}}, 400, "merged_adapters.extra"),
                ({"merged_adapters": {"ids": ["a", "merge:a=1.0,b=0.0"], "weights": [1, 1]}}, 400,
                 "merged_adapters.ids"),
                ({"merged_adapters": ab, "model": "b"}, 400, "model"),
                ({"model": "merge:a=0.5,nope=0.5"}, 404, "model"),
                ({"retrieve": 1}, 400, "retrieve"),
                ({"retrieve": {"k": 0}}, 400, "retrieve.k"),
                ({"retrieve": {"k": 1.5}}, 400, "retrieve.k"),
                ({"retrieve": {"k": 3}}, 400, "retrieve.k"),
                ({"retrieve": {"temperature": 0}}, 400, "retrieve.temperature"),
                ({"retrieve": {"temperature": -1}}, 400, "retrieve.temperature"),
                ({"retrieve": {"top": 2}}, 400, "retrieve.top"),
                ({"retrieve": {}, "merged_adapters": ab}, 400, "retrieve"),
                ({"retrieve": {}, "model": "a"}, 400, "model"),
                ({"retrieve": {}, "prompt": ["one", "two"]}, 400, "prompt"),
            ]
            for fields, status, param in cases:
                err = error_of(await c.post("/v1/completions", json={**BODY, **fields}), status, param)
                if status == 404:
                    assert err["code"] == "model_not_found"
            err = error_of(await c.post("/v1/completions", json={**BODY, **merged(["a"], [1], merge_strategy="x")}),
                           400, "merged_adapters.merge_strategy")
            assert "linear" in err["message"]
            for raw in ("NaN", "Infinity", "-Infinity"):  # Python's json reads them: refused as non-finite
                content = f'{{"prompt": "hi", "merged_adapters": {{"ids": ["a", "b"], "weights": [{raw}, 1]}}}}'
                error_of(await c.post("/v1/completions", content=content), 400, "merged_adapters.weights")
            r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                           "merged_adapters": {**ab, "weights": [1]}})
            error_of(r, 400, "merged_adapters.weights")
            r = await c.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "hi"}],
                                                           "retrieve": {}})
            error_of(r, 400, "messages")
            error_of(await c.post("/v1/unload_lora_adapter", json={"lora_name": "merge:a=1.0"}), 400, "lora_name")
            error_of(await c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(root / "c"),
                                                                 "description": 5}), 400, "description")
            assert c.app.state.merges.builds == 0 and c.app.state.retriever.loads == 0  # refused before any work
            assert sorted(c.ae.adapters()) == ["a", "b"]
            await complete(c)  # still serving
            await complete(c, model="a")
            assert (await complete(c, **merged(["a", "b"], [0.5, 0.5])))["model"] == "merge:a=0.5,b=0.5"
        async with served(engine(root), tok) as c:  # no descriptions: retrieval is refused
            error_of(await c.post("/v1/completions", json={**BODY, "retrieve": {"k": 1}}), 400, "retrieve")
            await complete(c, model="b")
    run(main())


def test_derived_names_and_cli_descriptions(root, monkeypatch, capsys):
    from lorakit.cli import main
    from lorakit.errors import ConfigError
    from lorakit.serve import server
    from lorakit.serve.merged import derived_name, parse_derived
    from lorakit.serve.server import parse_lora_descriptions

    assert derived_name([("b", 0.3), ("a", 0.7)]) == "merge:a=0.7,b=0.3"
    assert derived_name([("a", 1), ("b", -0.0), ("c", 1e-20)]) == "merge:a=1.0,b=0.0,c=1e-20"
    assert parse_derived("merge:a=0.7,b=0.3") == (("a", 0.7), ("b", 0.3))
    for bad in ("merge:b=0.3,a=0.7", "merge:a=0.70", "merge:a=nan", "merge:a=1.0,a=2.0", "a", None, "merge:"):
        assert parse_derived(bad) is None, bad
    assert parse_lora_descriptions(["a=Writes SQL", "b = Says hi = hello"]) == {"a": "Writes SQL",
                                                                               "b": "Says hi = hello"}
    for bad in (["a"], ["=x"], ["a="], ["a=x", "a=y"], ["../a=x"]):
        with pytest.raises((ConfigError, ValueError)):
            parse_lora_descriptions(bad)
    apps = []
    monkeypatch.setattr(server, "run_server", lambda app, sock, **kwargs: apps.append(app))
    model = str(tiny_model_dir())
    assert main(["serve", model, "--port", "0", "--lora-modules", f"a={root / 'a'}", "--lora-description",
                 "a=Writes SQL queries", "--max-merged-adapters", "3"]) == 0
    assert apps[0].state.retriever.descriptions == {"a": "Writes SQL queries"}
    assert apps[0].state.merges.max_entries == 3 and apps[0].state.retriever.encoder is None
    assert main(["serve", model, "--port", "0", "--lora-description", "a=Writes SQL"]) == 2
    assert "no such adapter" in capsys.readouterr().err
