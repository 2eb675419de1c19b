"""`make_model` / `lorakit make-model`: a random-weight decoder directory that transformers loads offline."""
import json

import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli import main
from lorakit.errors import ModelError
from lorakit.serve.model_dir import (CHAT_TEMPLATE, build_tokenizer, load_tokenizer, make_model, model_config,
                                     parameter_count, random_state_dict)

pytestmark = pytest.mark.usefixtures("one_thread_module")
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab_size=400,
            max_position_embeddings=128)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("m") / "tiny", seed=3, **TINY)


def test_files_and_config(tiny_dir):
    names = sorted(p.name for p in tiny_dir.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"],
            config["max_position_embeddings"]) == (64, 2, 4, 2, 128, 400, 128)
    assert (config["pad_token_id"], config["bos_token_id"], config["eos_token_id"]) == (0, 1, 2)
    assert config["tie_word_embeddings"] is False
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 0)
    assert "chat_template" in json.loads((tiny_dir / "tokenizer_config.json").read_text())
    tensors = load_file(tiny_dir / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert parameter_count(tiny_dir) == sum(t.numel() for t in tensors.values())


def test_weights_are_the_seeded_ones_and_transformers_gives_the_same_logits(tiny_dir):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    written = load_file(tiny_dir / "model.safetensors")
    config = model_config("llama", **{k: v for k, v in TINY.items()})
    expected = random_state_dict(config, seed=3)
    assert sorted(written) == sorted(expected)
    for k in expected:
        assert torch.equal(written[k], expected[k]), k
    assert not torch.equal(random_state_dict(config, seed=4)["lm_head.weight"], expected["lm_head.weight"])
    q = written["model.layers.0.self_attn.q_proj.weight"]
    assert abs(q.std().item() - config.initializer_range) < 0.002
    assert torch.equal(written["model.norm.weight"], torch.ones(64))
    assert torch.equal(written["model.embed_tokens.weight"][0], torch.zeros(64))  # <pad> row, as HF inits it

    loaded = AutoModelForCausalLM.from_pretrained(tiny_dir, local_files_only=True).eval()
    reference = LlamaForCausalLM(config).eval()
    reference.load_state_dict(expected, strict=True)
    ids = torch.randint(4, 400, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = loaded(ids).logits, reference(ids).logits
    assert loaded.config.vocab_size == 400 and a.shape == (2, 9, 400)
    assert torch.equal(a, b)
    assert a.abs().max() > 0


def test_tokenizer_round_trips_and_matches_the_vocab(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    assert tok.is_fast and len(tok) == 400
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    text = "The quick brown fox — naïve café, 42 × 7 = 294!\n\tdef f(x): return x"
    ids = tok(text)["input_ids"]
    assert ids[0] == 1 and max(ids) < 400
    assert tok.decode(ids, skip_special_tokens=True) == text
    # deterministic: the same vocabulary every time
    assert build_tokenizer(400).get_vocab() == tok.get_vocab()


def test_vocab_is_padded_when_the_corpus_runs_out():
    tok = build_tokenizer(40_000)
    assert len(tok) == 40_000
    assert "<|reserved_0|>" in tok.get_vocab()


def test_chat_template(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi there</s>\n<|assistant|>\n"
    assert tok.apply_chat_template(messages, tokenize=False).endswith("Hi there</s>\n")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids[0] == 1 and ids.count(1) == 1 and ids.count(2) == 2  # one <s>, one </s> per message
    assert tok.decode(ids) == text
    assert tok.chat_template == CHAT_TEMPLATE


@pytest.mark.parametrize("arch, cls", [("mistral", "MistralForCausalLM"), ("qwen2", "Qwen2ForCausalLM")])
def test_other_archs_load(tmp_path, arch, cls):
    from transformers import AutoModelForCausalLM

    out = make_model(tmp_path / arch, arch=arch, hidden_size=64, num_layers=1, num_heads=4, vocab_size=300,
                     max_position_embeddings=64)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert type(model).__name__ == cls and model.config.vocab_size == len(load_tokenizer(out)) == 300
    assert model.config.intermediate_size == 256  # round(64 * 2.75 / 256) * 256, at least 256
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 50, 60]])).logits).all()


def test_default_sizes():
    config = model_config()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.vocab_size) == (1024, 8, 16, 16, 2816, 4096)


def test_refuses_non_empty_dir_and_bad_sizes(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x.txt").write_text("keep me")
    with pytest.raises(ModelError, match="not empty"):
        make_model(busy, **TINY)
    assert sorted(p.name for p in busy.iterdir()) == ["x.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (make_model(empty, **TINY) / "config.json").is_file()  # an empty directory is fine
    for bad, match in [(dict(num_heads=3), "divisible by num_heads"), (dict(num_kv_heads=3), "divisible"),
                       (dict(vocab_size=100), "vocab_size"), (dict(num_layers=0), "num_layers")]:
        with pytest.raises(ModelError, match=match):
            make_model(tmp_path / "bad", **{**TINY, **bad})
    with pytest.raises(ModelError, match="unknown arch"):
        make_model(tmp_path / "bad", arch="gpt2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "empty"]  # no temp dirs left behind


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(ModelError, match="no usable tokenizer"):
        load_tokenizer(tmp_path)


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["make-model", "qwen2", "--hidden-size", "64", "--num-layers", "2", "--num-heads", "4",
                 "--num-kv-heads", "1", "--intermediate-size", "96", "--vocab-size", "320",
                 "--max-position-embeddings", "64", "--seed", "1", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and f"{parameter_count(out):,} parameters" in printed
    config = json.loads((out / "config.json").read_text())
    assert (config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"]) == (1, 96, 320)
    assert main(["make-model", "llama", str(out)]) == 2  # not empty any more
    assert "not empty" in capsys.readouterr().err
    assert main(["make-model", "gpt2", str(tmp_path / "x")]) == 2
