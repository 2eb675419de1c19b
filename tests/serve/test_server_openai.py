"""Issue 17: the server as the official `openai` client and vLLM users meet it (fake engine, in-process ASGI unless a
test needs a real socket)."""
import asyncio
import json
import logging
import shutil
import socket
import time

import httpx
import openai
import pytest
from safetensors.torch import load_file, save_file

from fake_engine import FakeEngine, fake, save_adapter, served, tiny_model_dir
from lorakit.errors import ConfigError
from lorakit.serve.server import bind_socket

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    save_adapter(tiny_model_dir(), root / "a1", r=4, seed=1)
    return root


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def client_of(c) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", max_retries=0,
                              http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=c.app),
                                                            base_url="http://test"))


def error_of(r, status, param=None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    if param is not None:
        assert err["param"] == param, err
    return err


def events(text: str) -> list:
    chunks = [e[len("data: "):] for e in text.split("\n\n") if e.strip()]
    assert chunks[-1] == "[DONE]", chunks[-3:]
    return [json.loads(e) for e in chunks[:-1]]


# ---------------------------------------------------------------- 1. unknown and unsupported fields
def test_unknown_field_names_the_nearest_valid_one(tok, pool):
    async def main():
        async with served(fake(tok, pool), tok) as c:
            oa = client_of(c)
            with pytest.raises(openai.BadRequestError) as e:
                await oa.completions.create(model="fake-llama", prompt="hi", extra_body={"max_token": 5})
            assert e.value.body["param"] == "max_token" and "'max_tokens'" in e.value.body["message"]
            with pytest.raises(openai.BadRequestError) as e:
                await oa.chat.completions.create(model="fake-llama", messages=[{"role": "user", "content": "hi"}],
                                                 extra_body={"temprature": 0.5})
            assert "'temperature'" in e.value.body["message"]
            err = error_of(await c.post("/v1/load_lora_adapter", json={"lora_nam": "x", "lora_path": "/x"}),
                           400, "lora_nam")
            assert "'lora_name'" in err["message"]
            r = await oa.completions.create(model="fake-llama", prompt="hi", max_tokens=3, user="u1", n=1)
            assert r.usage.completion_tokens == 3  # OpenAI's own fields pass
    run(main())


def test_known_extras_are_unsupported_unless_lenient(tok, pool, caplog):
    async def main():
        async with served(fake(tok, pool), tok) as c:
            for extra in ({"top_k": 5}, {"min_p": 0.1}, {"repetition_penalty": 1.2}, {"use_beam_search": True}):
                err = error_of(await c.post("/v1/completions", json={"prompt": "hi", **extra}), 400, *extra)
                assert "unsupported" in err["message"]
            r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "top_k": -1, "min_p": 0.0})
            assert r.status_code == 200  # values that mean "off" are fine
        async with served(fake(tok, pool), tok, lenient=True) as c:
            with caplog.at_level(logging.WARNING, logger="lorakit.serve.server"):
                r = await client_of(c).completions.create(model="fake-llama", prompt="hi", max_tokens=2,
                                                          extra_body={"top_k": 5, "repetition_penalty": 1.3})
            assert r.usage.completion_tokens == 2
            assert "top_k" in caplog.text and "repetition_penalty" in caplog.text
            error_of(await c.post("/v1/completions", json={"prompt": "hi", "max_token": 2}), 400, "max_token")
    run(main())


# ---------------------------------------------------------------- 3. runtime adapter paths
def test_relative_lora_path_is_resolved_from_the_working_directory(tok, pool, adapter_root, monkeypatch):
    async def main():
        async with served(fake(tok, pool), tok, adapter_roots=[str(adapter_root)]) as c:
            monkeypatch.chdir(adapter_root.parent)
            rel = f"{adapter_root.name}/a1"
            r = await c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": rel})
            assert r.status_code == 200 and c.ae.adapters()["x"] == str(adapter_root / "a1")
            monkeypatch.chdir(adapter_root)
            r = await c.post("/v1/load_lora_adapter", json={"lora_name": "y", "lora_path": "missing"})
            assert str(adapter_root / "missing") in error_of(r, 400, "lora_path")["message"]
            monkeypatch.chdir("/")
            r = await c.post("/v1/load_lora_adapter", json={"lora_name": "z", "lora_path": "a1"})  # /a1: outside
            assert "'/a1'" in error_of(r, 403, "lora_path")["message"]
    run(main())


def test_adapter_with_nan_values_is_refused_on_load(tok, pool, adapter_root):
    bad = adapter_root / "nan"
    shutil.copytree(adapter_root / "a1", bad, dirs_exist_ok=True)
    weights = bad / "adapter_model.safetensors"
    tensors = load_file(weights)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].clone().fill_(float("nan"))
    save_file(tensors, weights)

    async def main():
        async with served(fake(tok, pool), tok, adapter_roots=[str(adapter_root)]) as c:
            r = await c.post("/v1/load_lora_adapter", json={"lora_name": "nan", "lora_path": str(bad)})
            message = error_of(r, 400, "lora_path")["message"]
            assert "'nan'" in message and "non-finite" in message
            assert "nan" not in c.ae.adapters()
    run(main())


# ---------------------------------------------------------------- 4. start-up
def test_busy_port_fails_before_the_model_loads(monkeypatch):
    from lorakit.serve import engine as engine_module
    from lorakit.serve.server import serve

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    monkeypatch.setattr(engine_module.Engine, "from_dir", classmethod(lambda *a, **k: pytest.fail("loaded")))
    try:
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}.*--port"):
            serve(str(tiny_model_dir()), port=port)
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}"):
            bind_socket("127.0.0.1", port)
    finally:
        taken.close()


def test_help_shows_default_numbers_and_startup_logs_model_and_adapters(adapter_root, monkeypatch, capsys):
    from lorakit.cli import main
    from lorakit.serve import server

    assert main(["serve", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "EngineConfig" not in text
    assert "distinct adapters per step (default: 32)" in text and "(default: 4)" in text  # memory-gb
    monkeypatch.setattr(server, "run_server", lambda app, sock, **kw: None)
    assert main(["serve", str(tiny_model_dir()), "--port", "0", "--lora-modules", f"a1={adapter_root / 'a1'}"]) == 0
    err = capsys.readouterr().err
    assert "model tiny-llama" in err and "KV cache" in err and "blocks" in err
    assert f"adapter a1: {adapter_root / 'a1'}" in err


# ---------------------------------------------------------------- 5. found with the real client
def test_lone_surrogate_is_a_400_naming_the_field_and_the_connection_stays_usable(tok, pool):
    async def main():
        async with served(fake(tok, pool), tok) as c:
            bad_prompt = b'{"prompt": "abc \\ud800 def", "max_tokens": 2}'
            error_of(await c.post("/v1/completions", content=bad_prompt), 400, "prompt")
            bad_chat = b'{"messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": "\\udc00"}]}'
            error_of(await c.post("/v1/chat/completions", content=bad_chat), 400, "messages[1].content")
            r = await client_of(c).completions.create(model="fake-llama", prompt="abc \U0001F600 def", max_tokens=2)
            assert r.usage.completion_tokens == 2  # a proper pair is fine
    run(main())


def test_metrics_count_every_response_with_latency_histograms_and_models(tok, pool, adapter_root):
    class Crashing(FakeEngine):
        def add_request(self, req):
            if req.params.max_tokens == 13:
                raise RuntimeError("boom")  # not a lorakit error: escapes to the framework's handler
            super().add_request(req)

    async def main():
        engine = Crashing(vocab_size=len(tok), pool=pool)
        engine.register_adapter("a1", str(adapter_root / "a1"))
        async with served(engine, tok) as c:
            for _ in range(3):
                r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 13})
                assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
            for model in ("fake-llama", "a1", "a1"):
                r = await c.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 4})
                assert r.status_code == 200
            text = (await c.get("/metrics")).text
            assert 'lorakit_http_requests_total{status="500"} 3' in text
            assert 'lorakit_http_requests_total{status="200"} 3' in text
            assert 'lorakit_model_requests_total{model="a1"} 2' in text
            assert 'lorakit_model_requests_total{model="fake-llama"} 1' in text
            assert "# TYPE lorakit_time_to_first_token_seconds histogram" in text
            assert 'lorakit_time_to_first_token_seconds_bucket{le="+Inf"} 3' in text
            assert "lorakit_e2e_request_latency_seconds_count 3" in text
    run(main())


def test_access_log_has_one_line_per_request_with_model_tokens_and_latency(tok, pool, caplog):
    async def main():
        async with served(fake(tok, pool), tok) as c:
            with caplog.at_level(logging.INFO, logger="lorakit.serve.access"):
                await c.post("/v1/completions", json={"prompt": "hi there", "max_tokens": 5})
                await c.get("/health")
        lines = [r.getMessage() for r in caplog.records if r.name == "lorakit.serve.access"]
        assert len(lines) == 2
        prompt_tokens = len(tok("hi there")["input_ids"])
        assert '"POST /v1/completions" 200 model=fake-llama' in lines[0]
        assert f"prompt_tokens={prompt_tokens} completion_tokens=5 ttft=" in lines[0] and "latency=" in lines[0]
        assert '"GET /health" 200 latency=' in lines[1]
    run(main())


def test_shutdown_past_the_grace_period_gives_503_and_error_events(tok, pool):
    from lorakit.serve.async_engine import AsyncEngine
    from lorakit.serve.server import build_app, http_server

    async def main():
        engine = fake(tok, pool, step_delay=0.01, max_model_len=512)
        app = build_app(AsyncEngine(engine), tok, shutdown_timeout=0.4)
        sock = bind_socket("127.0.0.1", 0)
        port = sock.getsockname()[1]
        server = http_server(app, host="127.0.0.1", port=port, log_level="warning", shutdown_timeout=0.4)
        serving = asyncio.ensure_future(server.serve(sockets=[sock]))
        body = {"prompt": "a", "max_tokens": 400}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            while not server.started:
                await asyncio.sleep(0.01)
            calls = [asyncio.ensure_future(client.post("/v1/completions", json={**body, "stream": stream}))
                     for stream in (False, False, True, True)]
            while len(engine.running) < 4:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            server.should_exit = True  # what SIGTERM sets (handle_exit would re-raise it at the end of serve())
            responses = await asyncio.gather(*calls)
            assert time.monotonic() - started < 5
        for r in responses[:2]:
            assert error_of(r, 503)["code"] == "aborted"
        for r in responses[2:]:
            chunks = events(r.text)
            assert chunks[-1]["error"]["code"] == "shutting_down"
        await asyncio.wait_for(serving, 10)
    run(main())


def test_chat_without_max_tokens_runs_to_the_end_of_the_context(tok, pool):
    async def main():
        async with served(fake(tok, pool, max_model_len=64, eos_token_id=None), tok) as c:
            oa = client_of(c)
            r = await oa.chat.completions.create(model="fake-llama", messages=[{"role": "user", "content": "hi"}])
            assert r.usage.completion_tokens == 64 - r.usage.prompt_tokens and r.choices[0].finish_reason == "length"
            r = await oa.completions.create(model="fake-llama", prompt="hi")
            assert r.usage.completion_tokens == 16  # completions keep OpenAI's default
    run(main())


def test_tokenization_does_not_stall_the_event_loop(tok, pool):
    class SlowTokenizer:
        """The tiny tokenizer, 0.6 s slower for long texts (as a multi-MB prompt is)."""

        def __init__(self, inner):
            self.inner = inner

        def __call__(self, text, **kw):
            if len(text) > 1000:
                time.sleep(0.6)
            return self.inner(text, **kw)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    async def main():
        async with served(fake(tok, pool, max_model_len=100_000), SlowTokenizer(tok)) as c:
            long = asyncio.ensure_future(c.post("/v1/completions", json={"prompt": "a " * 2000, "max_tokens": 1}))
            await asyncio.sleep(0.1)
            started = time.monotonic()
            r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 200 and time.monotonic() - started < 0.3
            assert not long.done()
            assert (await long).status_code == 200
    run(main())
