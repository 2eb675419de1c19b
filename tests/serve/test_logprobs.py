"""n > 1, lists of prompts, echo and log-probabilities on /v1/completions and /v1/chat/completions, with the real
engine on the tiny random Llama: the scoring request lm-evaluation-harness sends, through the openai client, against
the model's own log-softmax (transformers, PEFT for the adapter)."""
import asyncio

import openai
import pytest
import torch

from lorakit.serve import Engine, EngineConfig, Request, SamplingParams

from fake_engine import FakeEngine, save_adapter, served, tiny_model_dir

TOL = 1e-4
MAX_DELTA = {}  # worst |engine - reference| log-prob seen, reported by test_scoring_* (pytest -s)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    return save_adapter(tiny_model_dir(), tmp_path_factory.mktemp("lp") / "sql", r=4, seed=3)


@pytest.fixture(scope="module")
def reference(adapter_dir):
    """name -> a function giving the fp32 log-softmax (positions, vocab) of a token sequence."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir()), dtype=torch.float32).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir()),
                                                                           dtype=torch.float32), str(adapter_dir)).eval()

    def log_softmax(model):
        def f(ids):
            with torch.no_grad():
                return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        return f
    return {None: log_softmax(base), "sql": log_softmax(tuned)}


def engine(adapter_dir, **config):
    e = Engine.from_dir(tiny_model_dir(), EngineConfig(dtype="float32", memory_bytes=1 << 24, **config))
    e.register_adapter("sql", str(adapter_dir))
    return e


def openai_client(c):
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=c)


# ---------------------------------------------------------------- scoring (lm-evaluation-harness)
@pytest.mark.parametrize("model", [None, "sql"])
def test_scoring_matches_the_models_log_softmax(tok, adapter_dir, reference, model):
    contexts = ["The capital of France is", "def add(a, b):"]
    continuations = [" Paris", "\n    return a + b"]
    requests = [tok(ctx)["input_ids"] + tok(cont, add_special_tokens=False)["input_ids"]
                for ctx, cont in zip(contexts, continuations)]

    async def main():
        async with served(engine(adapter_dir), tok) as c:
            client = openai_client(c)
            name = model or "tiny-llama"
            r = await client.completions.create(model=name, prompt=requests, echo=True, logprobs=1, max_tokens=1,
                                                temperature=0)
            text = await client.completions.create(model=name, prompt=contexts[0] + continuations[0], echo=True,
                                                   logprobs=1, max_tokens=1, temperature=0)
            only = await client.completions.create(model=name, prompt=requests[1], echo=True, logprobs=1,
                                                   max_tokens=0, temperature=0)
            return r, text, only

    r, text, only = run(main())
    assert [ch.index for ch in r.choices] == [0, 1]
    assert r.usage.prompt_tokens == sum(map(len, requests)) and r.usage.completion_tokens == 2
    worst = 0.0
    for choice, ids in zip(r.choices, requests):
        lp = choice.logprobs
        ref = reference[model](ids)
        assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        want = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))] + [ref[-1].max().item()]
        worst = max(worst, max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], want)))
        generated = int(ref[-1].argmax())
        assert lp.tokens[-1] == tok.decode([generated]) and choice.text.endswith(tok.decode([generated]))
        for token, top, value in zip(lp.tokens[1:], lp.top_logprobs[1:], lp.token_logprobs[1:]):
            assert top[token] == value and len(top) <= 2  # the top 1 plus the token itself
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert text.choices[0].logprobs.token_logprobs == r.choices[0].logprobs.token_logprobs
    assert text.choices[0].text.startswith(contexts[0] + continuations[0])
    lp = only.choices[0].logprobs  # max_tokens 0: the prompt alone
    assert only.usage.completion_tokens == 0 and len(lp.tokens) == len(requests[1])
    assert lp.token_logprobs[1:] == r.choices[1].logprobs.token_logprobs[1:-1]
    MAX_DELTA[model] = worst
    print(f"max |logprob - log_softmax| ({model or 'base'}): {worst:.2e}")
    assert worst <= TOL


def test_generated_logprobs_match_under_sampling_and_batching(tok, adapter_dir, reference):
    """Sampled tokens' log-probs are the raw log-softmax (not the temperature-scaled one), requests batched."""
    prompt = tok("once upon a time")["input_ids"]

    async def main():
        async with served(engine(adapter_dir), tok) as c:
            bodies = [{"model": m, "prompt": prompt, "max_tokens": 6, "temperature": 1.5, "seed": 7, "logprobs": 3,
                       "ignore_eos": True} for m in ("tiny-llama", "sql")]
            return await asyncio.gather(*[c.post("/v1/completions", json=b) for b in bodies])

    for r, model in zip(run(main()), (None, "sql")):
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == 6 and lp["token_logprobs"][0] is not None
        req = Request(prompt_ids=prompt, adapter=model, params=SamplingParams(max_tokens=6, temperature=1.5, seed=7,
                                                                                ignore_eos=True))
        e = engine(adapter_dir)
        e.generate([req])
        e.close()
        ref = reference[model](req.all_ids)
        want = [ref[len(prompt) - 1 + i, t].item() for i, t in enumerate(req.output_ids)]
        assert max(abs(a - b) for a, b in zip(lp["token_logprobs"], want)) <= TOL
        for token, top, value in zip(lp["tokens"], lp["top_logprobs"], lp["token_logprobs"]):
            assert top[token] == value and len(top) <= 4  # the top 3 and the token (texts may coincide)


# ---------------------------------------------------------------- n and lists of prompts
def test_n_choices_per_prompt_are_seeded_and_indexed(tok, adapter_dir):
    prompts = ["hello world", "the quick brown fox"]

    async def main():
        async with served(engine(adapter_dir), tok) as c:
            client = openai_client(c)
            many = await client.completions.create(model="sql", prompt=prompts, n=3, max_tokens=8, temperature=1.0,
                                                   seed=11, extra_body={"ignore_eos": True})
            alone = [[(await client.completions.create(model="sql", prompt=p, max_tokens=8, temperature=1.0,
                                                       seed=11 + j, extra_body={"ignore_eos": True})).choices[0].text
                      for j in range(3)] for p in prompts]
            chat = await client.chat.completions.create(model="tiny-llama", n=2, max_tokens=5, temperature=0,
                                                        logprobs=True, messages=[{"role": "user", "content": "hi"}])
            return many, alone, chat

    many, alone, chat = run(main())
    assert [ch.index for ch in many.choices] == list(range(6))
    assert [ch.text for ch in many.choices] == alone[0] + alone[1]  # index = prompt_i * n + j, choice j: seed + j
    assert len(set(alone[0])) == 3
    prompt_tokens = sum(len(tok(p)["input_ids"]) for p in prompts)
    assert (many.usage.prompt_tokens, many.usage.completion_tokens) == (prompt_tokens, 6 * 8)
    assert [ch.index for ch in chat.choices] == [0, 1] and chat.choices[0].message == chat.choices[1].message
    assert chat.usage.completion_tokens == sum(len(ch.logprobs.content) for ch in chat.choices)


# ---------------------------------------------------------------- chat log-probs
def test_chat_logprobs_format(tok, adapter_dir):
    async def main():
        async with served(engine(adapter_dir), tok) as c:
            return await openai_client(c).chat.completions.create(
                model="sql", messages=[{"role": "user", "content": "say something"}], max_tokens=6, temperature=0,
                logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})

    r = run(main())
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    assert "".join(item.token for item in content) == r.choices[0].message.content
    for item in content:
        assert bytes(item.bytes) == item.token.encode("utf-8") and len(item.top_logprobs) == 3
        values = [t.logprob for t in item.top_logprobs]
        assert values == sorted(values, reverse=True) and item.logprob == values[0]  # greedy: the best one


# ---------------------------------------------------------------- refusals
def test_refusals_name_the_field(tok):
    async def main():
        async with served(FakeEngine(len(tok), max_model_len=64), tok) as c:
            cases = [("/v1/completions", {"prompt": "x", "echo": True, "stream": True}, "stream"),
                     ("/v1/completions", {"prompt": "x", "logprobs": 1, "stream": True}, "stream"),
                     ("/v1/completions", {"prompt": ["a", "b"], "stream": True}, "stream"),
                     ("/v1/completions", {"prompt": "x", "top_logprobs": 2}, "top_logprobs"),
                     ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
                     ("/v1/completions", {"prompt": ["a"] * 100, "n": 3}, "n"),
                     ("/v1/completions", {"prompt": ["a", [1, -2]]}, "prompt[1]"),
                     ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
                      "top_logprobs"),
                     ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "echo": True}, "echo"),
                     ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": 1},
                      "logprobs")]
            for path, body, field in cases:
                r = await c.post(path, json=body)
                assert r.status_code == 400 and r.json()["error"]["param"] == field, (body, r.text)
            r = await c.post("/v1/completions", json={"prompt": "x", "logprobs": 1})  # an engine without log-probs
            assert r.status_code == 501 and r.json()["error"]["param"] == "logprobs"
            r = await c.post("/v1/completions", json={"prompt": "x y", "echo": True, "max_tokens": 3})
            assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("x y")
    run(main())


# ---------------------------------------------------------------- engine
def test_engine_logprobs_follow_the_recorded_logits(adapter_dir):
    """Prompt and generated log-probs of requests batched with requests that ask for none."""
    e = engine(adapter_dir)
    g = torch.Generator().manual_seed(0)
    reqs = [Request(torch.randint(3, 500, (n,), generator=g).tolist(), adapter=a,
                    params=SamplingParams(max_tokens=5, ignore_eos=True, record_logits=True, logprobs=lp,
                                          prompt_logprobs=plp))
            for n, a, lp, plp in [(7, None, 2, 2), (3, "sql", None, None), (5, "sql", 0, 1), (1, None, 1, 0)]]
    e.generate(reqs)
    e.close()
    for r in reqs:
        wanted = r.params.logprobs is not None
        assert len(r.output_logprobs) == (5 if wanted else 0)
        for row, token, entry in zip(r.logits, r.output_ids, r.output_logprobs):
            logp = torch.log_softmax(row, -1)
            assert entry.token_id == token and abs(entry.logprob - logp[token].item()) < 1e-6
            assert [t for t, _ in entry.top] == logp.topk(r.params.logprobs).indices.tolist()
        if r.params.prompt_logprobs is None:
            assert r.prompt_logprobs is None
        else:
            assert len(r.prompt_logprobs) == len(r.prompt_ids) and r.prompt_logprobs[0] is None
            assert all(len(x.top) == r.params.prompt_logprobs for x in r.prompt_logprobs[1:])
