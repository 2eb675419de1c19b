"""Trans-LoRA's parts (`lorakit.compose.transfer`): synthetic inputs, the discriminator's data and scores, filtering
and the teacher's labels, on the tiny random Llama with a chat-template tokenizer (the server tests' model)."""
import random
import sys
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.compose.transfer import (DISCRIMINATOR_CHOICES, DISCRIMINATOR_INSTRUCTION, list_items,
                                      discriminator_data, keep_real, realness, synthesis_prompt, synthesize,
                                      teacher_labels)
from lorakit.errors import ConfigError

sys.path.insert(0, str(Path(__file__).parent / "serve"))
from fake_engine import tiny_model_dir, tiny_tokenizer  # noqa: E402

from contract import perturb  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")
SEEDS = ["the food was great", "i hated every minute of it", "a calm and quiet evening", "what a mess", "lovely!"]


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir())).eval()
    lorakit.inject(m, lorakit.AdapterConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb(m, scale=1.0)
    return m


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_list_items_and_prompt():
    reply = '1. "A sunny day at the beach."\nSome chatter\n2) second one\n  3.   \'quoted\'  \n- not numbered'
    assert list_items(reply) == ["A sunny day at the beach.", "second one", "quoted"]
    assert list_items("no list here") == []
    a = synthesis_prompt(SEEDS, random.Random(0))[0]["content"]
    b = synthesis_prompt(SEEDS, random.Random(1))[0]["content"]
    assert all(s in a and s in b for s in SEEDS) and a != b and "5 examples" in a and "5 new texts" in a


def test_synthesize_collects_complete_new_list_items(model, tok):
    """The model's replies (scripted here) are read as numbered lists after the "1." the reply starts with: seeds,
    repeats and an item cut off by the token limit are dropped; at most `max_requests` generations."""
    scripts = [" alpha one\n2. beta two\n3. the food was great\n4. cut off", " alpha one\n2. gamma three\n"]
    prompts, side = [], tok.padding_side

    def scripted(input_ids, attention_mask, **kw):
        prompts.append(tok.decode(input_ids[0]))
        reply = tok(scripts[len(prompts) - 1], add_special_tokens=False)["input_ids"]
        if len(prompts) == 2:
            reply = reply + [tok.eos_token_id]
        return torch.cat([input_ids, torch.tensor([reply] * len(input_ids))], 1)
    generate, model.generate = model.generate, scripted
    try:
        out = synthesize(model, tok, SEEDS, n=5, batch_size=1, max_requests=2, progress=False)
    finally:
        model.generate = generate
    assert out == ["alpha one", "beta two", "gamma three"] and len(prompts) == 2
    assert all(p.endswith("1.") and "numbered list" in p for p in prompts) and tok.padding_side == side
    real = synthesize(model, tok, SEEDS, n=3, max_new_tokens=8, batch_size=2, progress=False)  # the real generate
    assert real == synthesize(model, tok, SEEDS, n=3, max_new_tokens=8, batch_size=2, progress=False)
    with pytest.raises(ConfigError):
        synthesize(model, tok, [], n=2)


def test_discriminator_data_balances_the_classes():
    data = discriminator_data(SEEDS[:2], ["s1", "s2", "s3", "s4", "s5"])
    assert len(data) == 10 and sorted(data.labels) == [0] * 5 + [1] * 5
    reals = [m[0]["content"].rsplit("\n", 1)[-1] for m, y in zip(data.messages, data.labels) if y == 0]
    assert sorted(reals) == sorted([SEEDS[0], SEEDS[1]] * 2 + [SEEDS[0]])
    assert data.choices == DISCRIMINATOR_CHOICES


def by_hand(model, tok, instruction, text, choices):
    """Total log-probability of each choice's tokens after the chat prompt, one unpadded forward per choice."""
    prompt = tok.apply_chat_template([{"role": "user", "content": instruction.format(text=text)}],
                                     add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    out = []
    for c in choices:
        cid = tok(c, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = model(torch.tensor([ids + cid])).logits[0].float().log_softmax(-1)
        out.append(sum(logp[len(ids) - 1 + j, t].item() for j, t in enumerate(cid)))
    return torch.tensor(out)


def test_realness_and_teacher_labels_are_label_scoring(model, tok):
    texts = ["a nice day", "terrible service and cold soup", "ok"]
    p = realness(model, tok, texts, batch_size=2)
    want = torch.stack([by_hand(model, tok, DISCRIMINATOR_INSTRUCTION, t, DISCRIMINATOR_CHOICES).softmax(0)[0]
                        for t in texts])
    torch.testing.assert_close(p, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(p, torch.full_like(p, 0.5))
    instruction, choices = "Is this positive or negative?\n\n{text}", ("negative", "positive", "neutral")
    labels = teacher_labels(model, tok, texts, instruction, choices, batch_size=2)
    assert labels == [int(by_hand(model, tok, instruction, t, choices).argmax()) for t in texts]


def test_keep_real_threshold_and_floor():
    texts = ["a", "b", "c", "d"]
    assert keep_real(texts, torch.tensor([0.9, 0.2, 0.6, 0.1])) == ["a", "c"]
    assert keep_real(texts, torch.tensor([0.1, 0.3, 0.2, 0.0]), min_keep=0.5) == ["b", "c"]
    assert keep_real(texts, torch.tensor([0.1, 0.3, 0.2, 0.0]), min_keep=0.0) == ["b"]
    with pytest.raises(ConfigError):
        keep_real(texts, torch.tensor([0.5]))
