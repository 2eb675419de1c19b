"""Fuzzing the HTTP API with hypothesis-generated bodies against the real engine on a tiny random Llama:
no input may produce a 5xx (or an unhandled exception), and errors are OpenAI-style JSON."""
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fake_engine import save_adapter, tiny_model_dir, tiny_tokenizer
from lorakit.serve.async_engine import AsyncEngine
from lorakit.serve.config import EngineConfig
from lorakit.serve.engine import Engine
from lorakit.serve.server import build_app

pytestmark = pytest.mark.usefixtures("one_thread_module")
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.integers(-3, 40),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)


def field(good):
    return st.one_of(good, json_values)


GOOD = {  # values a client would plausibly send (mostly accepted)
    "model": st.sampled_from(["tiny-llama", "a1"]), "max_tokens": st.integers(1, 6), "temperature": st.floats(0, 2),
    "top_p": st.floats(0.05, 1), "seed": st.integers(0, 2 ** 32), "stop": st.lists(st.text(min_size=1, max_size=3),
                                                                                  max_size=3),
    "stop_token_ids": st.lists(st.integers(0, 511), max_size=3), "ignore_eos": st.booleans(), "stream": st.booleans(),
}
SAMPLING = {
    "model": field(st.sampled_from(["tiny-llama", "a1", "", "nope"])),
    "max_tokens": field(st.integers(-2, 6)),
    "temperature": field(st.floats(-1, 3)),
    "top_p": field(st.floats(-0.5, 1.5)),
    "seed": field(st.integers(-5, 2 ** 64)),
    "stop": field(st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4), max_size=5))),
    "stop_token_ids": field(st.lists(st.integers(-2, 2 ** 40), max_size=4)),
    "ignore_eos": field(st.booleans()),
    "stream": field(st.booleans()),
    "n": field(st.integers(0, 3)),
    "echo": field(st.booleans()),
    "logprobs": field(st.integers(0, 2)),
    "stream_options": field(st.fixed_dictionaries({"include_usage": field(st.booleans())})),
    "max_completion_tokens": field(st.integers(-1, 6)),
}
prompts = st.one_of(st.text(max_size=60), st.lists(st.integers(-3, 600), max_size=20),
                    st.lists(st.lists(st.integers(0, 600), max_size=5), max_size=2), st.just("word " * 300),
                    json_values)
messages = st.one_of(
    st.lists(st.fixed_dictionaries({"role": field(st.sampled_from(["user", "system", "assistant", "tool"])),
                                    "content": field(st.one_of(st.text(max_size=40), st.lists(
                                        st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)}),
                                        max_size=2)))}), max_size=3),
    json_values)


def bodies(extra: dict, good_extra: dict):
    return st.one_of(st.fixed_dictionaries(good_extra, optional=GOOD),
                     st.fixed_dictionaries({}, optional={**SAMPLING, **extra}))


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from starlette.testclient import TestClient

    root = tmp_path_factory.mktemp("fuzz-adapters")
    save_adapter(tiny_model_dir(), root / "a1", r=4, seed=1)
    engine = Engine.from_dir(tiny_model_dir(), EngineConfig(memory_bytes=1 << 24, max_waiting=4))
    engine.register_adapter("a1", str(root / "a1"))
    app = build_app(AsyncEngine(engine), tiny_tokenizer(), adapter_roots=[str(root)])
    with TestClient(app, raise_server_exceptions=True) as c:
        c.root = root
        yield c


def check(r):
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"]
    return r


def post(client, path, body):
    if isinstance(body, (bytes, str)):
        return check(client.post(path, content=body, headers={"content-type": "application/json"}))
    return check(client.post(path, content=json.dumps(body, allow_nan=True),
                             headers={"content-type": "application/json"}))


@FUZZ
@given(body=bodies({"prompt": prompts}, {"prompt": st.one_of(st.text(min_size=1, max_size=40),
                                                              st.lists(st.integers(0, 511), min_size=1, max_size=20))}))
def test_fuzz_completions(client, body):
    r = post(client, "/v1/completions", body)
    if r.status_code == 200 and not body.get("stream"):
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


@FUZZ
@given(body=bodies({"messages": messages}, {"messages": st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant"]), "content": st.text(max_size=30)}), min_size=1,
    max_size=3)}))
def test_fuzz_chat(client, body):
    post(client, "/v1/chat/completions", body)


@FUZZ
@given(raw=st.one_of(st.binary(max_size=40), st.text(max_size=40), json_values.map(json.dumps)),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
                             "/v1/unload_lora_adapter"]))
def test_fuzz_raw_bodies(client, raw, path):
    post(client, path, raw)


names = field(st.one_of(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,10}", fullmatch=True), st.text(max_size=12),
                        st.just("a1"), st.just("tiny-llama")))


@FUZZ
@given(name=names, path=field(st.one_of(st.sampled_from(["a1", "../a1", "/etc", "/", ".", "..", "a1/../../x",
                                                         "a1/\x00", "~", "a1//"]), st.text(max_size=20))),
       unload=st.booleans())
def test_fuzz_load_unload(client, name, path, unload):
    body = {"lora_name": name, "lora_path": path if not isinstance(path, str) or path.startswith("/") or path == ""
            else os.path.join(str(client.root), path)}
    r = post(client, "/v1/load_lora_adapter", body)
    root = os.path.realpath(client.root)
    for m in client.get("/v1/models").json()["data"][1:]:  # nothing outside the adapter root is ever loaded
        assert os.path.realpath(m["root"]).startswith(root + os.sep)
    if r.status_code == 200 and unload:
        assert check(client.post("/v1/unload_lora_adapter", json={"lora_name": name})).status_code == 200
    if unload:
        post(client, "/v1/unload_lora_adapter", {"lora_name": name} if name != "a1" else {"lora_name": 5})
