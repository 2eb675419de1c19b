"""`lorakit serve smollm2` end to end (slow: the real SmolLM2-135M-Instruct, fp32).

A lorakit LoRA (r=8, all linear layers, B drawn from a seeded generator so it is not a no-op) is saved with
`lorakit.save_adapter`; the server is built by the CLI exactly as `lorakit serve smollm2 --lora-modules
movies=PATH` builds it (uvicorn replaced by an in-process httpx client), and greedy chat replies over HTTP must equal
PEFT + transformers `generate` on the same folder token for token (text, token count, finish reason).
"""
import asyncio
import contextlib

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread_module")]
MAX_TOKENS = 24
CHATS = [
    ("movies", [{"role": "user", "content": "Is this movie review positive or negative? 'A dull, lifeless film.'"}]),
    ("movies", [{"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": "Review: 'I loved every minute of it.' Sentiment?"}]),
    ("smollm2", [{"role": "user", "content": "What is the capital of France?"}]),
    ("movies", [{"role": "user", "content": "Name a film by Hitchcock."}]),
]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    import lorakit
    from lorakit.models import load_model

    model, _ = load_model("smollm2", "causal-lm")
    lorakit.inject(model, lorakit.AdapterConfig(r=8, lora_alpha=16, target_modules="all-linear"), "movies")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, t in lorakit.adapter_parameters(model, "movies").items():
            if "lora_B" in key:
                t.copy_(torch.randn(t.shape, generator=g) * 0.02)
    path = lorakit.save_adapter(model, tmp_path_factory.mktemp("smollm2") / "movies", "movies")
    del model
    return path


def reference_replies(adapter_dir):
    """PEFT + transformers greedy `generate` per chat: tokenizer, [(new ids, prompt ids)], and the base model's
    reply to the first chat (without the adapter)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.models import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name="movies").eval()

    def generate(messages, adapter: bool):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                            return_tensors="pt")["input_ids"]
        with torch.no_grad(), (contextlib.nullcontext() if adapter else model.disable_adapter()):
            gen = model.generate(input_ids=ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        return gen[0, ids.shape[1]:].tolist(), ids[0].tolist()

    out = [generate(messages, name == "movies") for name, messages in CHATS]
    return tokenizer, out, generate(CHATS[0][1], False)[0]


def test_serve_smollm2_chat_equals_peft_generate(adapter_dir, monkeypatch):
    import httpx

    from lorakit.cli import main
    from lorakit.serve import server

    apps = []
    monkeypatch.setattr(server, "run_server", lambda app, sock, **kwargs: apps.append(app))  # the app, not a socket
    assert main(["serve", "smollm2", "--lora-modules", f"movies={adapter_dir}", "--memory-gb", "0.5",
                 "--port", "0"]) == 0

    async def ask(app):
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=600) as client:
                bodies = [{"model": name, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
                          for name, messages in CHATS]
                return await asyncio.gather(*[client.post("/v1/chat/completions", json=b) for b in bodies])
    responses = asyncio.run(ask(apps[0]))  # all at once: the engine batches them, base and adapter rows mixed
    tokenizer, reference, base_reply = reference_replies(adapter_dir)
    replies = []
    for (name, _), r, (ids, prompt_ids) in zip(CHATS, responses, reference):
        assert r.status_code == 200, r.text
        body = r.json()
        choice = body["choices"][0]
        want = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert choice["message"]["content"] == want, (name, choice["message"]["content"], want)
        assert body["usage"]["completion_tokens"] == len(ids)
        assert body["usage"]["prompt_tokens"] == len(prompt_ids)  # the chat template, system prompt included
        assert choice["finish_reason"] == ("stop" if ids[-1] == tokenizer.eos_token_id else "length")
        replies.append(want)
    default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert default_system in tokenizer.decode(reference[0][1]) and default_system not in tokenizer.decode(reference[1][1])
    assert len(set(replies)) == len(replies)
    assert base_reply != reference[0][0]  # the adapter changes the model's reply
