"""Requests that run a RecLoRA bank for one user (`reclora`: {bank, user}), served by the real Engine on the tiny random
Llama of the other server tests (in-process ASGI, no sockets)."""
import asyncio

import pytest
import torch

import lorakit
from fake_engine import served, tiny_model_dir
from lorakit.errors import ConfigError
from lorakit.variants.reclora import personal_lora

pytestmark = pytest.mark.usefixtures("one_thread_module")

D_U = 6
USERS = torch.randn(3, D_U, generator=torch.Generator().manual_seed(0))
BODY = {"prompt": "hello world", "max_tokens": 10, "temperature": 0, "ignore_eos": True, "logprobs": 0}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """`bank`: a RecLoRA bank (4 meta-LoRAs of rank 4 on q, v; every tensor perturbed, B ≠ 0), `user0`: user 0's
    adapter written offline, `plain`: a plain LoRA (not a bank)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("banks")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir()))
    config = lorakit.AdapterConfig(r=4, lora_alpha=8, variant="reclora", target_modules=["q_proj", "v_proj"],
                                   options={"user_dim": D_U, "bank_size": 4, "temperature": 0.5})
    lorakit.inject(model, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in lorakit.adapter_parameters(model, "default").values():
            t.add_(torch.randn(t.shape, generator=g) * 0.5)
    lorakit.save_adapter(model, root / "bank")
    personal_lora(root / "bank", USERS[0].tolist(), root / "user0")
    config = lorakit.AdapterConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    plain = lorakit.inject(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir())), config)
    lorakit.save_adapter(plain, root / "plain")
    return root


def engine(root):
    from lorakit.serve.config import EngineConfig
    from lorakit.serve.engine import Engine

    e = Engine.from_dir(tiny_model_dir(), EngineConfig(memory_bytes=1 << 24))
    e.register_adapter("user0-offline", str(root / "user0"))
    return e


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def output(body):
    choice = body["choices"][0]
    return choice["text"], choice["logprobs"]["token_logprobs"]


def same(x, y, tol=1e-5):
    return x[0] == y[0] and len(x[1]) == len(y[1]) and all(abs(p - q) <= tol for p, q in zip(x[1], y[1]))


def reclora(user, bank="bank"):
    return {"reclora": {"bank": bank, "user": [float(v) for v in user]}}


async def complete(c, **fields):
    r = await c.post("/v1/completions", json={**BODY, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_user_request_equals_that_users_adapter_written_offline(tok, root):
    async def main():
        async with served(engine(root), tok, reclora_banks={"bank": root / "bank"}) as c:
            got = await complete(c, **reclora(USERS[0]))
            assert got["model"].startswith("user:bank:")
            assert same(output(got), output(await complete(c, model="user0-offline")))
            other = output(await complete(c, **reclora(USERS[1])))
            base = output(await complete(c))
            assert other[1] != output(got)[1] and base[1] != output(got)[1]  # users differ; both differ from base
            again = await complete(c, **reclora(USERS[0]), model=got["model"])  # `model` may repeat the name
            assert again["model"] == got["model"] and same(output(again), output(got))
            assert c.app.state.merges.builds == 2  # one build per distinct user
            r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                           "max_tokens": 3, **reclora(USERS[2])})
            assert r.status_code == 200 and r.json()["model"].startswith("user:bank:")
    run(main())


def test_bad_reclora_requests_are_refused_and_change_nothing(tok, root):
    async def main():
        async with served(engine(root), tok, reclora_banks={"bank": root / "bank"}) as c:
            async def refused(status, param, **fields):
                r = await c.post("/v1/completions", json={**BODY, **fields})
                assert r.status_code == status, r.text
                assert r.json()["error"]["param"] == param, r.json()

            await refused(404, "reclora.bank", **reclora(USERS[0], bank="nope"))
            await refused(400, "reclora.user", **reclora(USERS[0][:3]))
            await refused(400, "reclora.user", reclora={"bank": "bank", "user": ["a"] * D_U})
            await refused(400, "reclora.user", reclora={"bank": "bank", "user": []})
            await refused(400, "reclora.bank", reclora={"user": [0.0] * D_U})
            await refused(400, "reclora.weights", reclora={"bank": "bank", "user": [0.0] * D_U, "weights": [1]})
            await refused(400, "reclora", reclora=[1, 2])
            await refused(400, "reclora", **reclora(USERS[0]), retrieve={"k": 1})
            await refused(400, "model", **reclora(USERS[0]), model="user0-offline")
            assert c.app.state.merges.builds == 0
            name = (await complete(c, **reclora(USERS[0])))["model"]
            r = await c.post("/v1/unload_lora_adapter", json={"lora_name": name})
            assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"
            assert name in (await c.get("/v1/models")).text
    run(main())


def test_banks_are_checked_at_start(tok, root):
    from lorakit.serve.async_engine import AsyncEngine
    from lorakit.serve.server import build_app

    ae = AsyncEngine(engine(root))
    try:
        with pytest.raises(ConfigError, match="not a RecLoRA bank"):
            build_app(ae, tok, reclora_banks={"p": root / "plain"})
        with pytest.raises(ConfigError, match="differ from the base model's and every adapter's name"):
            build_app(ae, tok, reclora_banks={"user0-offline": root / "bank"})
    finally:
        asyncio.run(ae.shutdown(5))
