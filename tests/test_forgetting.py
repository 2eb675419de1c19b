"""`lorakit.analysis.behaviour.forgetting` on the tiny random Llama: base vs adapted perplexity and KL(base ‖ adapted),
checked against a hand-computed cross entropy, an inactive / zero-scaled adapter, and batching with padding."""
import math

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.analysis.behaviour import encode, forgetting, token_logprobs
from lorakit.errors import AdapterNameError, ConfigError, DataError
from lorakit.models import load_model
from lorakit.variants import Variant

pytestmark = pytest.mark.usefixtures("one_thread_module")

TEXTS = ["the cat sat on the mat", "a dog ran in the park and then it slept under the old tree",
         "birds sing", "the sun rose over the quiet hills while the river ran on"]


def adapted_llama(seed: int = 1):
    """The tiny Llama with a LoRA on q/v/down/lm_head whose B is random (so the adapter changes the logits)."""
    model, tok = load_model("tiny-llama", "causal-lm", texts=TEXTS)
    config = lorakit.AdapterConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"])
    lorakit.inject(model, config, "default")
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model, tok


@pytest.fixture(scope="module")
def lm():
    return adapted_llama()


def test_a_non_zero_adapter_changes_perplexity_and_has_positive_kl(lm):
    model, tok = lm
    got = forgetting(model, tok, TEXTS)
    assert got["tokens"] == sum(len(ids) - 1 for ids in encode(tok, TEXTS))
    assert got["kl"] > 1e-3
    assert abs(got["adapted_perplexity"] - got["base_perplexity"]) > 1e-3 * got["base_perplexity"]
    assert got["base_perplexity"] == pytest.approx(math.exp(got["base_nll"]), rel=1e-12)
    assert model.training is False and lorakit.active_adapters(model) == ["default"]  # left as it was


def test_perplexity_is_exp_of_the_cross_entropy_of_the_logits(lm):
    model, tok = lm
    text = TEXTS[1]
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        adapted = F.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:])
        with lorakit.disabled(model):
            base_logits = model(input_ids=ids).logits[0, :-1]
        adapted_logits = model(input_ids=ids).logits[0, :-1]
    base = F.cross_entropy(base_logits, ids[0, 1:])
    got = forgetting(model, tok, [text])
    assert got["adapted_perplexity"] == pytest.approx(math.exp(adapted.item()), rel=1e-5)
    assert got["base_perplexity"] == pytest.approx(math.exp(base.item()), rel=1e-5)
    kl = F.kl_div(adapted_logits.log_softmax(-1), base_logits.log_softmax(-1), log_target=True, reduction="sum")
    assert got["kl"] == pytest.approx(kl.item() / (ids.shape[1] - 1), rel=1e-4)
    assert token_logprobs(model, tok, [text])[0].sum().item() == pytest.approx(-adapted.item() * (ids.shape[1] - 1),
                                                                                rel=1e-5)


def test_padding_does_not_change_the_result(lm):
    model, tok = lm
    texts = TEXTS[:3]  # 3 texts of different lengths
    lengths = [len(ids) for ids in encode(tok, texts)]
    assert len(set(lengths)) == 3
    together = forgetting(model, tok, texts, batch_size=3)
    alone = [forgetting(model, tok, [t]) for t in texts]
    assert together["tokens"] == sum(a["tokens"] for a in alone)
    for key in ("base_nll", "adapted_nll", "kl"):
        pooled = sum(a[key] * a["tokens"] for a in alone) / together["tokens"]
        assert together[key] == pytest.approx(pooled, rel=1e-5)
    one_by_one = torch.cat(token_logprobs(model, tok, texts, batch_size=1))
    torch.testing.assert_close(torch.cat(token_logprobs(model, tok, texts, batch_size=3)), one_by_one,
                               rtol=1e-5, atol=1e-5)


def test_no_active_adapter_or_zero_scale_gives_zero_kl():
    model, tok = adapted_llama()
    with lorakit.disabled(model):  # the "adapted" pass sees the base too (disabled nests)
        off = forgetting(model, tok, TEXTS)
    assert off["kl"] == 0 and off["base_perplexity"] == off["adapted_perplexity"]
    assert forgetting(model, tok, TEXTS)["kl"] > 1e-3  # the adapter is back on after the context
    for m in model.modules():
        if isinstance(m, Variant):
            m.scale = 0.0
    zero = forgetting(model, tok, TEXTS, batch_size=2)
    assert zero["kl"] == 0 and zero["base_perplexity"] == zero["adapted_perplexity"]
    assert zero["base_perplexity"] == pytest.approx(off["base_perplexity"], rel=1e-6)


def test_adapter_argument_picks_the_adapter_and_restores_the_active_one():
    model, tok = adapted_llama()
    config = lorakit.AdapterConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    lorakit.inject(model, config, "zero")  # B = 0: the base exactly
    assert lorakit.active_adapters(model) == ["default"]
    assert forgetting(model, tok, TEXTS, adapter="zero")["kl"] == 0
    assert lorakit.active_adapters(model) == ["default"]
    assert forgetting(model, tok, TEXTS, adapter="default")["kl"] > 1e-3
    with pytest.raises(AdapterNameError, match="nope"):
        forgetting(model, tok, TEXTS, adapter="nope")
    assert lorakit.active_adapters(model) == ["default"]


def test_bad_input(lm):
    model, tok = lm
    with pytest.raises(DataError, match="non-empty list"):
        forgetting(model, tok, [])
    with pytest.raises(DataError, match="non-empty list"):
        forgetting(model, tok, "one text, not a list")
    with pytest.raises(DataError, match="two tokens"):
        forgetting(model, tok, [""])  # only <s>: nothing to predict
    with pytest.raises(ConfigError, match="batch_size"):
        forgetting(model, tok, TEXTS, batch_size=0)
    with pytest.raises(ConfigError, match="max_length"):
        forgetting(model, tok, TEXTS, max_length=1)


def test_a_reference_model_gives_the_same_numbers_as_the_disabled_adapter(lm):
    """A full fine-tune is scored against its base model: a merged copy of the adapted model against a plain copy
    of the base gives what the adapter form gives."""
    import copy

    model, tok = lm
    tuned = lorakit.merge_and_unload(copy.deepcopy(model))
    with lorakit.disabled(model):
        base = copy.deepcopy(model)
    base = lorakit.unload(base)
    want = forgetting(model, tok, TEXTS)
    got = forgetting(tuned, tok, TEXTS, reference=base)
    assert got["tokens"] == want["tokens"]
    for key in ("base_nll", "adapted_nll", "kl"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6)
