"""The OpenAI-compatible server and AsyncEngine, in-process (httpx ASGI transport or raw ASGI calls; no sockets).

A FakeEngine (deterministic tokens, failure injection) covers the protocol and robustness paths; the real Engine on
a tiny random Llama checks end-to-end results against the engine run alone.
"""
import asyncio
import json
import time

import pytest
import torch

from fake_engine import expected_tokens, fake, save_adapter, served, tiny_model_dir, tiny_tokenizer
from lorakit.errors import ConfigError, EngineStoppedError, QueueFullError
from lorakit.serve.request import Request, SamplingParams
from lorakit.serve.server import Detokenizer, StopMatcher, parse_lora_modules

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    save_adapter(tiny_model_dir(), root / "a1", r=4, seed=1)
    save_adapter(tiny_model_dir(), root / "a2", r=8, seed=2, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    return root


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def sse(text: str) -> list:
    events = [e for e in text.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events), events
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def error_of(r, status, param=None):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


async def until(predicate, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


# ---------------------------------------------------------------- completions (fake engine)
def test_completion_text_and_token_prompts(tok, pool):
    async def main():
        async with served(fake(tok, pool), tok) as c:
            prompt_ids = tok("hello world")["input_ids"]
            want = expected_tokens(prompt_ids, None, 7, len(tok), pool=pool)
            r = await c.post("/v1/completions", json={"model": "fake-llama", "prompt": "hello world",
                                                      "max_tokens": 7, "temperature": 0})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["object"] == "text_completion" and body["model"] == "fake-llama"
            assert body["choices"][0]["text"] == tok.decode(want) and body["choices"][0]["finish_reason"] == "length"
            assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 7,
                                     "total_tokens": len(prompt_ids) + 7}
            for prompt in (prompt_ids, [prompt_ids], ["hello world"]):  # ids, a batch of one ids list / string
                r2 = await c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 7, "temperature": 0})
                assert r2.json()["choices"][0]["text"] == body["choices"][0]["text"]
            assert c.ae.engine.threads == {c.ae._thread.ident}  # only the engine thread touched the engine
    run(main())


def test_streaming_equals_non_streaming_with_usage(tok, pool):
    async def main():
        async with served(fake(tok, pool), tok) as c:
            req = {"prompt": "the cat", "max_tokens": 12, "temperature": 0}
            full = (await c.post("/v1/completions", json=req)).json()["choices"][0]["text"]
            r = await c.post("/v1/completions", json={**req, "stream": True,
                                                      "stream_options": {"include_usage": True}})
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            chunks = sse(r.text)
            texts = [ch["choices"][0]["text"] for ch in chunks if ch["choices"]]
            assert len(texts) > 1 and "".join(texts) == full
            assert [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]][-1] == "length"
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    run(main())


def test_stop_strings_cut_text_and_abort(tok, pool):
    async def main():
        engine = fake(tok, pool, step_delay=0.005)
        async with served(engine, tok) as c:
            req = {"prompt": "the cat", "max_tokens": 30, "temperature": 0}
            full = (await c.post("/v1/completions", json=req)).json()["choices"][0]["text"]
            words = full.split(" ")
            stop = " " + words[4]  # a word in the middle
            cut = full[:full.index(stop)]
            for stream in (False, True):
                r = await c.post("/v1/completions", json={**req, "stop": [stop, "zzzzqq"], "stream": stream})
                if stream:
                    chunks = sse(r.text)
                    text = "".join(ch["choices"][0]["text"] for ch in chunks)
                    finish = chunks[-1]["choices"][0]["finish_reason"]
                else:
                    text, finish = r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]
                assert (text, finish) == (cut, "stop")
                assert stop not in text
            await until(lambda: not engine.running and not engine.waiting)
            assert len(engine.aborted) == 2  # the rest of the 30 tokens was not generated
            # a stop string the text does not contain changes nothing
            r = await c.post("/v1/completions", json={**req, "stop": "qqqqzz"})
            assert r.json()["choices"][0]["text"] == full
    run(main())


def test_stop_token_ids(tok, pool):
    async def main():
        async with served(fake(tok, pool), tok) as c:
            prompt_ids = tok("a b")["input_ids"]
            want = expected_tokens(prompt_ids, None, 20, len(tok), pool=pool)
            stop_id = want[3]
            n = want.index(stop_id) + 1
            r = await c.post("/v1/completions", json={"prompt": prompt_ids, "max_tokens": 20,
                                                      "stop_token_ids": [stop_id]})
            body = r.json()
            assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == n
            assert body["choices"][0]["text"] == tok.decode(want[:n - 1])  # the stop token is not in the text
    run(main())


def test_chat_completions(tok, pool):
    async def main():
        async with served(fake(tok, pool), tok) as c:
            messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
            prompt_ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                             add_special_tokens=False)["input_ids"]
            want = expected_tokens(prompt_ids, None, 6, len(tok), pool=pool)
            r = await c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "temperature": 0})
            body = r.json()
            assert r.status_code == 200 and body["object"] == "chat.completion"
            assert body["choices"][0]["message"] == {"role": "assistant", "content": tok.decode(want)}
            assert body["usage"]["prompt_tokens"] == len(prompt_ids)
            r = await c.post("/v1/chat/completions", json={"messages": messages, "max_completion_tokens": 6,
                                                           "stream": True})
            chunks = sse(r.text)
            assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
            assert "".join(ch["choices"][0]["delta"]["content"] for ch in chunks) == tok.decode(want)
            error_of(await c.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}),
                     400, "messages[0].role")
            error_of(await c.post("/v1/chat/completions", json={"messages": []}), 400, "messages")
            error_of(await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": 5}]}),
                     400, "messages[0].content")
    run(main())


def test_chat_without_template_is_400(tok, pool):
    notemplate = tiny_tokenizer().__class__.from_pretrained(str(tiny_model_dir()))
    notemplate.chat_template = None

    async def main():
        async with served(fake(tok, pool), notemplate) as c:
            err = error_of(await c.post("/v1/chat/completions",
                                        json={"messages": [{"role": "user", "content": "hi"}]}), 400)
            assert "chat template" in err["message"]
    run(main())


# ---------------------------------------------------------------- errors
def test_bad_requests_are_400_naming_the_field(tok, pool):
    async def main():
        async with served(fake(tok, pool, max_model_len=64), tok) as c:
            error_of(await c.post("/v1/completions", content=b"{not json"), 400)
            error_of(await c.post("/v1/completions", json=[1, 2]), 400)
            cases = [({"prompt": "x", "max_tokens": "5"}, "max_tokens"), ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
                     ({"prompt": "x", "temperature": -1}, "temperature"), ({"prompt": "x", "top_p": 0}, "top_p"),
                     ({"prompt": "x", "seed": -3}, "seed"), ({"prompt": "x", "n": 0}, "n"),
                     ({"prompt": "x", "echo": "yes"}, "echo"), ({"prompt": "x", "logprobs": 21}, "logprobs"),
                     ({"prompt": "x", "stop": [1]}, "stop"), ({"prompt": "x", "stop": ""}, "stop"),
                     ({"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
                     ({"prompt": "x", "stream": "yes"}, "stream"), ({"prompt": "x", "ignore_eos": 1}, "ignore_eos"),
                     ({}, "prompt"), ({"prompt": []}, "prompt"),
                     ({"prompt": [1, "a"]}, "prompt"), ({"prompt": ["a", 3]}, "prompt"), ({"prompt": "x", "n": 2, "stream": True}, "stream"),
                     ({"prompt": [10 ** 6]}, "prompt"), ({"prompt": "word " * 80}, "prompt"),
                     ({"prompt": "x", "max_tokens": 63}, "max_tokens"), ({"prompt": "x", "model": 3}, "model"),
                     ({"prompt": "x", "stream_options": 3}, "stream_options")]
            for body, field in cases:
                error_of(await c.post("/v1/completions", json=body), 400, field)
            err = error_of(await c.post("/v1/completions", json={"prompt": "x", "model": "nope"}), 404, "model")
            assert err["code"] == "model_not_found"
            r = await c.post("/v1/completions", json={"prompt": "x", "model": "nope", "stream": True})
            assert error_of(r, 404, "model") and r.headers["content-type"] == "application/json"
            r = await c.post("/v1/completions", content=b"x" * (5 << 20))
            assert r.status_code == 413
            r = await c.get("/v1/nothing")
            assert r.status_code == 404 and "error" in r.json()
            assert (await c.get("/v1/completions")).status_code == 405
    run(main())


def test_queue_full_is_429_with_retry_after(tok, pool):
    async def main():
        async with served(fake(tok, pool, max_waiting=1, max_num_seqs=1, step_delay=0.01), tok) as c:
            rs = await asyncio.gather(*[c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5})
                                        for _ in range(8)])
            codes = sorted(r.status_code for r in rs)
            assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
            for r in rs:
                if r.status_code == 429:
                    assert int(r.headers["Retry-After"]) >= 1
                    assert error_of(r, 429)["type"] == "rate_limit_error"
            m = (await c.get("/metrics")).text
            assert f'lorakit_http_requests_total{{status="429"}} {codes.count(429)}' in m
            assert f'lorakit_request_rejected_total{{reason="queue_full"}} {codes.count(429)}' in m
    run(main())


def test_shutdown_finishes_aborts_then_refuses(tok, pool):
    async def main():
        engine = fake(tok, pool, step_delay=0.01, max_model_len=256)
        async with served(engine, tok) as c:
            assert (await c.get("/health")).status_code == 200
            short = asyncio.ensure_future(c.post("/v1/completions", json={"prompt": "a", "max_tokens": 3}))
            long = asyncio.ensure_future(c.post("/v1/completions", json={"prompt": "a", "max_tokens": 200}))
            long_stream = asyncio.ensure_future(c.post("/v1/completions",
                                                       json={"prompt": "a", "max_tokens": 200, "stream": True}))
            await until(lambda: len(engine.running) == 3)
            await c.ae.shutdown(timeout=0.3)
            assert (await short).status_code == 200  # finished within the grace period
            error_of(await long, 503)
            chunks = sse((await long_stream).text)
            assert chunks[-2]["choices"][0]["finish_reason"] == "abort"
            assert chunks[-1]["error"]["code"] == "shutting_down"
            assert not engine.running and not c.ae._thread.is_alive()
            error_of(await c.post("/v1/completions", json={"prompt": "a"}), 503)
            assert (await c.get("/health")).status_code == 503
            with pytest.raises(EngineStoppedError):
                await c.ae.generate(Request(prompt_ids=[1, 5]))
    run(main())


def test_step_exception_fails_requests_and_keeps_serving(tok, pool):
    async def main():
        engine = fake(tok, pool)
        async with served(engine, tok) as c:
            engine.fail_next_steps = 1
            err = error_of(await c.post("/v1/completions", json={"prompt": "a", "max_tokens": 4}), 500)
            assert "injected step failure" in err["message"]
            engine.fail_next_steps = 1
            r = await c.post("/v1/completions", json={"prompt": "a", "max_tokens": 4, "stream": True})
            assert "injected step failure" in r.text and r.text.endswith("data: [DONE]\n\n")
            r = await c.post("/v1/completions", json={"prompt": "a", "max_tokens": 4})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
            assert c.ae.metrics()["step_errors_total"] == 2
    run(main())


# ---------------------------------------------------------------- client disconnect
async def call_and_disconnect(app, path, body, *, after_chunks=None, after_s=None):
    """Call the ASGI app directly; the client disconnects after `after_chunks` body chunks or `after_s` s."""
    disconnect = asyncio.Event()
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]
    sent = []

    async def receive():
        if messages:
            return messages.pop(0)
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if after_chunks and sum(1 for m in sent if m["type"] == "http.response.body" and m.get("body")) >= after_chunks:
            disconnect.set()

    if after_s is not None:
        asyncio.get_running_loop().call_later(after_s, disconnect.set)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"test"), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 5000), "server": ("test", 80)}
    await asyncio.wait_for(app(scope, receive, send), 10)
    return sent


def test_client_disconnect_aborts_the_request(tok, pool):
    async def main():
        engine = fake(tok, pool, step_delay=0.005, max_model_len=512)
        async with served(engine, tok) as c:
            for path, body, how in [
                ("/v1/completions", {"prompt": "a", "max_tokens": 400, "stream": True}, dict(after_chunks=2)),
                ("/v1/completions", {"prompt": "a", "max_tokens": 400}, dict(after_s=0.1)),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 400},
                 dict(after_s=0.1)),
            ]:
                before = len(engine.aborted)
                await call_and_disconnect(c.app, path, body, **how)
                await until(lambda: len(engine.aborted) == before + 1 and not engine.running)
                assert engine.metrics()["kv_blocks_used"] == 0
                assert engine.metrics()["generation_tokens_total"] < 400 * (before + 1)
            assert c.ae.metrics()["in_flight"] == 0
    run(main())


# ---------------------------------------------------------------- models, adapters
def test_models_and_load_unload(tok, pool, adapter_root, tmp_path, monkeypatch):
    outside = save_adapter(tiny_model_dir(), tmp_path / "outside", r=2)
    (adapter_root / "escape").symlink_to(outside, target_is_directory=True)

    async def main():
        engine = fake(tok, pool)
        engine.register_adapter("a1", str(adapter_root / "a1"))
        async with served(engine, tok, adapter_roots=[str(adapter_root)]) as c:
            data = (await c.get("/v1/models")).json()
            assert data["object"] == "list"
            assert [(m["id"], m["parent"]) for m in data["data"]] == [("fake-llama", None), ("a1", "fake-llama")]
            assert data["data"][1]["root"] == str(adapter_root / "a1")
            r = await c.post("/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": str(adapter_root / "a2")})
            assert r.status_code == 200 and r.text == "Success: LoRA adapter 'a2' added successfully."
            assert "a2" in [m["id"] for m in (await c.get("/v1/models")).json()["data"]]
            prompt = tok("hi")["input_ids"]
            r = await c.post("/v1/completions", json={"model": "a2", "prompt": prompt, "max_tokens": 5})
            assert r.json()["model"] == "a2"
            assert r.json()["choices"][0]["text"] == tok.decode(expected_tokens(prompt, "a2", 5, len(tok), pool=pool))
            r = await c.post("/v1/unload_lora_adapter", json={"lora_name": "a2"})
            assert r.status_code == 200 and r.text == "Success: LoRA adapter 'a2' removed successfully."
            error_of(await c.post("/v1/completions", json={"model": "a2", "prompt": "hi"}), 404, "model")
            error_of(await c.post("/v1/unload_lora_adapter", json={"lora_name": "a2"}), 404, "lora_name")
            # refused loads
            for body, status, field in [
                ({"lora_name": "x", "lora_path": str(adapter_root / ".." / "outside")}, 403, "lora_path"),
                ({"lora_name": "x", "lora_path": "../../etc"}, 403, "lora_path"),
                ({"lora_name": "x", "lora_path": "/etc"}, 403, "lora_path"),
                ({"lora_name": "x", "lora_path": str(adapter_root / "escape")}, 403, "lora_path"),  # symlink out
                ({"lora_name": "x", "lora_path": str(adapter_root / "missing")}, 400, "lora_path"),
                ({"lora_name": "x", "lora_path": str(adapter_root)}, 400, "lora_path"),  # no adapter_config.json
                ({"lora_name": "x"}, 400, "lora_path"),
                ({"lora_name": "../a", "lora_path": str(adapter_root / "a2")}, 400, "lora_name"),
                ({"lora_name": "", "lora_path": str(adapter_root / "a2")}, 400, "lora_name"),
                ({"lora_name": "a" * 129, "lora_path": str(adapter_root / "a2")}, 400, "lora_name"),
                ({"lora_name": "a1", "lora_path": str(adapter_root / "a2")}, 400, "lora_name"),  # taken
                ({"lora_name": "fake-llama", "lora_path": str(adapter_root / "a2")}, 400, "lora_name"),
                ({"lora_path": str(adapter_root / "a2")}, 400, "lora_name"),
            ]:
                error_of(await c.post("/v1/load_lora_adapter", json=body), status, field)
            assert sorted(c.ae.adapters()) == ["a1"]
            monkeypatch.chdir(adapter_root)  # a relative path is resolved from the working directory
            r = await c.post("/v1/load_lora_adapter", json={"lora_name": "rel", "lora_path": "a2"})
            assert r.status_code == 200
        async with served(fake(tok, pool), tok) as c:  # no adapter roots: runtime loading is off
            error_of(await c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(adapter_root / "a2")}),
                     403, "lora_path")
    run(main())


def test_health_and_metrics(tok, pool):
    async def main():
        async with served(fake(tok, pool), tok) as c:
            assert (await c.get("/health")).status_code == 200
            await c.post("/v1/completions", json={"prompt": "a", "max_tokens": 6})
            await c.post("/v1/completions", json={"prompt": "a", "model": "missing"})
            r = await c.get("/metrics")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            values = {}
            for line in r.text.splitlines():
                if line and not line.startswith("#"):
                    name, value = line.rsplit(" ", 1)
                    values[name] = float(value)
            for name in ("lorakit_queue_depth", "lorakit_running", "lorakit_generation_tokens_per_second",
                         "lorakit_adapter_cache_hits_total", "lorakit_adapter_cache_misses_total",
                         "lorakit_adapter_evictions_total", "lorakit_kv_blocks_used", "lorakit_kv_blocks_total"):
                assert name in values
            assert values["lorakit_generation_tokens_total"] == 6
            assert values['lorakit_request_finish_total{reason="length"}'] == 1
            assert values['lorakit_http_requests_total{status="200"}'] == 1
            assert values['lorakit_http_requests_total{status="404"}'] == 1
            assert values["lorakit_generation_tokens_per_second"] > 0
    run(main())


def test_classify_mounted_only_with_a_classifier(tok, pool):
    class Stub:
        model_name = "enc"

        async def classify(self, texts, adapters):
            if adapters[0] not in (None, "pos"):
                from lorakit.errors import UnknownAdapterError
                raise UnknownAdapterError(f"unknown adapter {adapters[0]!r}")
            return torch.tensor([[0.25, 0.75]] * len(texts))

    async def main():
        async with served(fake(tok, pool), tok) as c:
            assert (await c.post("/v1/classify", json={"input": "x"})).status_code == 404
        async with served(fake(tok, pool), tok, classifier=Stub()) as c:
            r = await c.post("/v1/classify", json={"model": "pos", "input": ["good", "bad"]})
            assert r.status_code == 200
            assert [d["probs"] for d in r.json()["data"]] == [[0.25, 0.75]] * 2 and r.json()["data"][0]["label"] == 1
            assert (await c.post("/v1/classify", json={"input": "x"})).status_code == 200
            error_of(await c.post("/v1/classify", json={"model": "neg", "input": "x"}), 404)
            error_of(await c.post("/v1/classify", json={"input": []}), 400, "input")
            error_of(await c.post("/v1/classify", json={"input": [3]}), 400, "input")
    run(main())


# ---------------------------------------------------------------- helpers
def test_stop_matcher_holds_back_prefixes():
    m = StopMatcher(["END", "xy"])
    assert m.feed("abc E") == ("abc ", False)
    assert m.feed("N") == ("", False)
    assert m.feed("Z x") == ("ENZ ", False)
    assert m.feed("y tail") == ("", True)
    m = StopMatcher(["END"])
    assert m.feed("ab EN") == ("ab ", False) and m.feed("", final=True) == ("EN", False)


def test_detokenizer_deltas_concatenate_to_the_full_decode(tok):
    ids = tok("naïve café ünïcödé text — with “quotes” and 漢字")["input_ids"][1:]
    d = Detokenizer(tok, [1])
    parts = [d.add([t]) for t in ids[:-1]] + [d.add([ids[-1]], final=True)]
    assert "".join(parts) == tok.decode(ids)
    assert all("\ufffd" not in p for p in parts)


def test_parse_lora_modules():
    assert parse_lora_modules(["a=/x/a", '{"name": "b", "path": "/x/b", "base_model_name": "m"}']) == \
        {"a": "/x/a", "b": "/x/b"}
    for bad in (["a"], ["=p"], ["{bad json"], ['{"name": "a"}'], ["a=/p", "a=/q"], ["../a=/p"]):
        with pytest.raises((ConfigError, ValueError)):
            parse_lora_modules(bad)


# ---------------------------------------------------------------- real engine (tiny random Llama)
@pytest.fixture(scope="module")
def real_engine_factory(adapter_root):
    from lorakit.serve.config import EngineConfig
    from lorakit.serve.engine import Engine

    def make(**config):
        config.setdefault("memory_bytes", 1 << 24)
        engine = Engine.from_dir(tiny_model_dir(), EngineConfig(**config))
        return engine
    return make


def test_real_engine_matches_engine_alone(tok, real_engine_factory, adapter_root):
    prompts = ["hello world", "the quick brown fox", "def f(x):", "import os"]
    models = [None, "a1", "a2", "a1"]
    alone = []
    for prompt, adapter in zip(prompts, models):  # each request alone against a fresh engine
        engine = real_engine_factory()
        for name in ("a1", "a2"):
            engine.register_adapter(name, str(adapter_root / name))
        req = Request(prompt_ids=tok(prompt)["input_ids"], adapter=adapter,
                      params=SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        engine.generate([req])
        engine.close()
        alone.append(req.output_ids)
    assert alone[1] != alone[3] or prompts[1] != prompts[3]

    async def main():
        engine = real_engine_factory()
        engine.register_adapter("a1", str(adapter_root / "a1"))
        async with served(engine, tok, adapter_roots=[str(adapter_root)]) as c:
            assert c.ae.model_name == "tiny-llama"
            r = await c.post("/v1/load_lora_adapter", json={"lora_name": "a2", "lora_path": str(adapter_root / "a2")})
            assert r.status_code == 200
            bodies = [{"model": m or "tiny-llama", "prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                       "stream": i % 2 == 1} for i, (p, m) in enumerate(zip(prompts, models))]
            rs = await asyncio.gather(*[c.post("/v1/completions", json=b) for b in bodies])  # batched together
            for r, b, want in zip(rs, bodies, alone):
                assert r.status_code == 200, r.text
                text = "".join(ch["choices"][0]["text"] for ch in sse(r.text)) if b["stream"] else \
                    r.json()["choices"][0]["text"]
                assert text == tok.decode(want, skip_special_tokens=True)
            m = c.ae.metrics()  # refreshed before a finished request's output is delivered
            assert m["generation_tokens_total"] == 48 and m["kv_blocks_used"] == 0
            r = await c.post("/v1/chat/completions", json={"model": "a1", "messages": [{"role": "user", "content": "hi"}],
                                                           "max_tokens": 5, "temperature": 0.8, "seed": 3})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 5
    run(main())


def test_real_engine_disconnect_frees_kv_blocks_and_queue_limit(tok, real_engine_factory):
    async def main():
        engine = real_engine_factory()
        async with served(engine, tok) as c:
            body = {"prompt": "hello", "max_tokens": 240, "ignore_eos": True, "stream": True}
            await call_and_disconnect(c.app, "/v1/completions", body, after_chunks=2)
            await until(lambda: c.ae.metrics().get("requests_abort_total") == 1)
            await until(lambda: c.ae.metrics()["kv_blocks_used"] == 0 and c.ae.metrics()["running"] == 0)
        engine = real_engine_factory(max_waiting=1, max_num_seqs=1)
        async with served(engine, tok) as c:
            rs = await asyncio.gather(*[c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 30,
                                                                         "ignore_eos": True}) for _ in range(6)])
            codes = [r.status_code for r in rs]
            assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
            streams = []  # kept alive: a dropped stream aborts its request
            with pytest.raises(QueueFullError):
                for _ in range(4):
                    streams.append(await c.ae.generate(Request(prompt_ids=[1, 5], params=SamplingParams(max_tokens=200))))
            assert len(streams) >= 1
    run(main())


def test_real_engine_unload_while_running_and_corrupt_adapter(tok, real_engine_factory, adapter_root, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(adapter_root / "a1", bad)

    async def main():
        engine = real_engine_factory(max_num_seqs=1)
        step = engine.step
        engine.step = lambda: (time.sleep(0.004), step())[1]  # >= 0.8 s for 200 tokens: time to unload mid-run
        engine.register_adapter("a1", str(adapter_root / "a1"))
        engine.register_adapter("bad", str(bad))
        weights = bad / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-64])  # truncated after registration: fails when loaded
        async with served(engine, tok, adapter_roots=[str(adapter_root)]) as c:
            body = {"prompt": "hello", "max_tokens": 200, "ignore_eos": True, "temperature": 0}
            running = asyncio.ensure_future(c.post("/v1/completions", json={**body, "model": "a1"}))
            await until(lambda: c.ae.metrics()["running"] == 1)
            waiting = asyncio.ensure_future(c.post("/v1/completions", json={**body, "model": "a1"}))
            await until(lambda: c.ae.metrics()["waiting"] == 1)
            r = await c.post("/v1/unload_lora_adapter", json={"lora_name": "a1"})
            assert r.status_code == 200
            error_of(await waiting, 404, "model")  # queued, not admitted: fails cleanly, as an unknown model
            error_of(await c.post("/v1/completions", json={**body, "model": "a1"}), 404, "model")
            r = await running  # admitted before the unload: finishes normally
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 200
            rs = await asyncio.gather(c.post("/v1/completions", json={**body, "model": "bad", "max_tokens": 5}),
                                      c.post("/v1/completions", json={**body, "max_tokens": 5}))
            err = error_of(rs[0], 500)  # only the request of the corrupt adapter fails
            assert err["code"] == "generation_error"
            assert rs[1].status_code == 200 and rs[1].json()["usage"]["completion_tokens"] == 5
    run(main())


def test_cli_serve_refuses_bad_arguments_before_serving(tmp_path, capsys):
    from lorakit.cli import main

    model = str(tiny_model_dir())
    for argv, words in [(["serve", model, "--lora-modules", "noequals"], "expected name=path"),
                        (["serve", model, "--lora-modules", "a=/x", "a=/y"], "given twice"),
                        (["serve", model, "--max-cpu-loras", "2", "--max-loras", "4"], "max_cpu_loras"),
                        (["serve", model, "--memory-gb", "0"], "--memory-gb"),
                        (["serve", str(tmp_path / "missing")], "missing"),
                        (["serve", model, "--lora-modules", f"a={tmp_path / 'nothing'}"], "nothing"),
                        (["serve", model, "--port", "x"], "--port")]:
        assert main(argv[:2] + ["--port", "0"] + argv[2:]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error:") and words in err, (argv, err)


def test_cli_serve_mounts_classify_for_an_encoder(tmp_path, monkeypatch, capsys):
    from lorakit.cli import main
    from lorakit.serve import server

    apps = []
    monkeypatch.setattr(server, "run_server", lambda app, sock, **kwargs: apps.append(app))
    model = str(tiny_model_dir())
    assert main(["serve", model, "--classify-model", "minilm", "--port", "0"]) == 0
    assert "/v1/classify" in {route.path for route in apps[0].routes}
    assert main(["serve", model, "--port", "0"]) == 0
    assert "/v1/classify" not in {route.path for route in apps[1].routes}
    assert main(["serve", model, "--port", "0", "--classify-model", "minilm", "--classify-lora-modules",
                 f"m={tmp_path / 'nothing'}"]) == 2
    assert "nothing" in capsys.readouterr().err
