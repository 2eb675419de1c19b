"""Attention-logit monitoring (`AttentionLogitMonitor`, `attention_logit_every`): the logged max |q·k|/√d per layer
equals a brute-force max over the eager attention's own pre-softmax scores; it is logged on every N-th step only;
its hooks are gone after training (also after an error); it is off by default."""
import json

import pytest
import torch
from transformers.models.llama import modeling_llama

import lorakit
from lorakit.analysis.attention_logits import AttentionLogitMonitor, max_attention_logit
from lorakit.cli import build_parser, settings
from lorakit.data import ChatDataset, CompletionDataset
from lorakit.errors import ConfigError, TrainingError
from lorakit.models import load_model
from lorakit.train import RunConfig
from lorakit.train.args import TrainingArguments
from lorakit.train.tasks import IGNORE, CausalLM, make_task
from lorakit.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread_module")

WORDS = "red green blue cat dog sun moon tree fish bird".split()
PROMPTS = [f"say {' '.join(WORDS[i % 10: i % 10 + 1 + i % 4])} =>" for i in range(16)]
COMPLETIONS = [f" {' '.join(WORDS[(3 * i) % 10: (3 * i) % 10 + 1 + i % 3])}" for i in range(16)]
SYSTEM = "You are a careful assistant. Answer with one colour word and nothing else, please."


def adapted(task="causal-lm"):
    """The tiny Llama (4 heads, 2 KV heads) with a LoRA on q/k/v whose B is random, so the adapter moves q and k."""
    model, tok = load_model("tiny-llama", task, texts=PROMPTS + COMPLETIONS + [SYSTEM])
    lorakit.inject(model, lorakit.AdapterConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    return model, tok


def args(tmp_path, **kw):
    return TrainingArguments(**{**dict(output_dir=str(tmp_path), disable_tqdm=True, save_steps=0, max_steps=1,
                                       per_device_train_batch_size=4, learning_rate=1e-2), **kw})


def brute_force(model, monkeypatch, batch: dict) -> dict[int, float]:
    """Per layer, max |scores| over causal pairs of real tokens, the scores being the eager attention's own
    q·kᵀ·scaling (its rotated q and k, k heads repeated), taken before the softmax."""
    seen = {}
    original = modeling_llama.eager_attention_forward

    def spy(module, query, key, value, attention_mask, scaling, **kw):
        keys = modeling_llama.repeat_kv(key, module.num_key_value_groups)
        seen[module.layer_idx] = (torch.matmul(query, keys.transpose(2, 3)) * scaling).detach()
        return original(module, query, key, value, attention_mask, scaling, **kw)

    implementation = model.config._attn_implementation
    with monkeypatch.context() as patch:
        patch.setattr(modeling_llama, "eager_attention_forward", spy)
        model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                model(**batch)
        finally:
            model.set_attn_implementation(implementation)
    real = batch["attention_mask"].bool()
    width = real.shape[1]
    pairs = torch.ones(width, width, dtype=torch.bool).tril()[None] & real[:, None, :] & real[:, :, None]
    assert len(seen) == 2
    return {i: s.abs().masked_fill(~pairs[:, None], 0).amax().item() for i, s in seen.items()}


def hooks_of(model):
    return {n: (list(m._forward_hooks), list(m._forward_pre_hooks)) for n, m in model.named_modules()}


def test_logged_value_equals_the_eager_attention_scores(tmp_path, monkeypatch):
    model, tok = adapted()
    data = CompletionDataset(PROMPTS, COMPLETIONS)
    task = make_task("causal-lm", tok, 32)
    trainer = Trainer(model, task, args(tmp_path, attention_logit_every=1), data)
    batch = task.collate([data[j] for j in trainer.micro_batches(0)[0]])  # the batch step 1 trains on
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # rows of different lengths: padding is masked
    model.train()
    expected = brute_force(model, monkeypatch, {k: batch[k] for k in ("input_ids", "attention_mask")})
    record = trainer.train()[0]
    assert record["attn_logit_max/0"] == pytest.approx(expected[0], rel=1e-5)
    assert record["attn_logit_max/1"] == pytest.approx(expected[1], rel=1e-5)
    assert record["attn_logit_max"] == max(record["attn_logit_max/0"], record["attn_logit_max/1"])
    assert record["attn_logit_max"] > 1.0  # not a trivially small number


def test_a_shared_prompt_prefix_in_the_kv_cache_is_measured_too(tmp_path, monkeypatch):
    """The instruct task runs the prompt prefix all rows share once and the rows after it against the cached keys;
    the monitor's max then equals the whole rows' (left padded, positions counting real tokens)."""
    model, tok = adapted("instruct")
    data = ChatDataset([[{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}] for p in PROMPTS],
                       COMPLETIONS)
    task = make_task("instruct", tok, 64)
    trainer = Trainer(model, task, args(tmp_path, attention_logit_every=1), data)
    batch = task.collate([data[j] for j in trainer.micro_batches(0)[0]])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    keep = labels.shape[1] - int((labels != IGNORE).int().argmax(-1).min()) + 1  # as Instruct._reply_logits
    model.train()
    with torch.enable_grad():
        assert task._shared_length(model, ids, mask, keep) > 0  # the training forward does share the prefix
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    expected = brute_force(model, monkeypatch, dict(input_ids=ids, attention_mask=mask, position_ids=positions))
    record = trainer.train()[0]
    assert record["attn_logit_max/0"] == pytest.approx(expected[0], rel=1e-5)
    assert record["attn_logit_max/1"] == pytest.approx(expected[1], rel=1e-5)


def test_max_attention_logit_with_cached_keys_and_grouped_heads():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 3, 8, generator=gen), torch.randn(2, 2, 5, 8, generator=gen)  # 2 cached positions
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    best = 0.0
    for b in range(2):
        for h in range(4):
            for i in range(3):
                for j in range(5):
                    if j <= 2 + i and mask[b, j] and mask[b, 2 + i]:
                        best = max(best, abs(float(q[b, h, i] @ k[b, h // 2, j])) * 0.5)
    assert max_attention_logit(q, k, 0.5, mask) == pytest.approx(best, rel=1e-6)
    assert max_attention_logit(q, k, 0.5) >= best


def test_logged_every_n_steps_only_and_hooks_removed(tmp_path):
    model, tok = adapted()
    before = hooks_of(model)
    trainer = Trainer(model, CausalLM(tok, 32), args(tmp_path, max_steps=4, attention_logit_every=2),
                      CompletionDataset(PROMPTS, COMPLETIONS))
    history = trainer.train()
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    assert ["attn_logit_max" in r for r in history] == [False, True, False, True]
    assert all(f"attn_logit_max/{i}" in r for r in history if "attn_logit_max" in r for i in (0, 1))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["attn_logit_max"] for line in lines if "attn_logit_max" in line] == \
        [history[1]["attn_logit_max"], history[3]["attn_logit_max"]]
    assert hooks_of(model) == before

    sparse = Trainer(model, CausalLM(tok, 32), args(tmp_path / "sparse", max_steps=4, logging_steps=3,
                                                     attention_logit_every=2), CompletionDataset(PROMPTS, COMPLETIONS))
    assert [r["step"] for r in sparse.train()] == [2, 3, 4]  # a monitored step is logged whatever logging_steps says


def test_hooks_are_removed_when_training_fails(tmp_path):
    class FailsAtStep2(CausalLM):
        calls = 0

        def loss(self, model, batch):
            FailsAtStep2.calls += 1
            loss = super().loss(model, batch)
            return loss * float("nan") if self.calls == 2 else loss

    model, tok = adapted()
    before = hooks_of(model)
    trainer = Trainer(model, FailsAtStep2(tok, 32), args(tmp_path, max_steps=4, attention_logit_every=1),
                      CompletionDataset(PROMPTS, COMPLETIONS))
    with pytest.raises(TrainingError, match="non-finite"):
        trainer.train()
    assert hooks_of(model) == before


def test_off_by_default_and_set_by_the_flag(tmp_path):
    assert TrainingArguments().attention_logit_every == 0
    model, tok = adapted()
    trainer = Trainer(model, CausalLM(tok, 32), args(tmp_path, max_steps=2), CompletionDataset(PROMPTS, COMPLETIONS))
    assert not any(isinstance(h, AttentionLogitMonitor) for h in trainer.hooks)
    assert not any(k.startswith("attn_logit_max") for r in trainer.train() for k in r)
    flags = settings(build_parser().parse_args(["train", "--attention-logit-every", "5"]))
    assert RunConfig.from_flat(flags).training.attention_logit_every == 5
    with pytest.raises(ConfigError, match="attention_logit_every"):
        TrainingArguments(attention_logit_every=-1)
    with pytest.raises(ConfigError, match="every"):
        AttentionLogitMonitor(0)


def test_a_model_without_q_and_k_projections_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model, tok = adapted()
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tok), n_positions=64))
    lorakit.inject(gpt2, lorakit.AdapterConfig(r=2, target_modules=["c_attn"]))
    trainer = Trainer(gpt2, CausalLM(tok, 32), args(tmp_path, attention_logit_every=1),
                      CompletionDataset(PROMPTS, COMPLETIONS))
    with pytest.raises(ConfigError, match="q_proj, k_proj"):
        trainer.train()
    assert trainer.step == 0
