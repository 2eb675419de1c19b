"""LoRAPrune (training card §8): LoRA-gradient importance, grouped heads/channels, cubic schedule, physical removal."""
import copy

import pytest
import torch
from torch import nn

import lorakit
import models
from contract import close, perturb, run
from lorakit.errors import ConfigError, UnsupportedFeatureError
from lorakit.rank.prune import LoRAPrune, cubic_sparsity, estimated_weight_grad, group_scores, parameter_count, \
    weight_importance

pytestmark = pytest.mark.usefixtures("one_thread_module")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def _llama(r=4):
    model = models.llama()
    lorakit.inject(model, lorakit.AdapterConfig(r=r, lora_alpha=2 * r, target_modules=LLAMA_TARGETS,
                                                init_lora_weights=False))
    return model


def _backward(model, batch):
    out = model(**batch, labels=batch["input_ids"]) if "attention_mask" not in batch else \
        model(**batch, labels=torch.tensor([0, 1]))
    out.loss.backward()


def test_importance_is_the_cards_estimator_on_a_toy_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    lorakit.inject(model, lorakit.AdapterConfig(r=2, lora_alpha=3, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(4, 6)
    model(x).pow(2).sum().backward()
    layer = model[0]
    v = layer.adapters["default"]
    assert layer.base_layer.weight.grad is None  # no ∇W is computed, let alone stored
    A, B, s, W = v.lora_A.detach(), v.lora_B.detach(), v.scale, layer.base_layer.weight.detach()
    gA, gB = v.lora_A.grad, v.lora_B.grad
    g_hat = gB @ A + B @ gA - gB @ gA
    assert torch.allclose(estimated_weight_grad(v), g_hat)
    expected = (g_hat * (W + s * B @ A)).abs()
    assert torch.allclose(weight_importance(layer, "default", "lora"), expected)
    assert torch.allclose(weight_importance(layer, "default", "magnitude"), (W + s * B @ A).abs())
    # groups: rows in units of 1 (out) and pairs of columns (in)
    assert torch.allclose(group_scores(expected, "out", 5, 1), expected.sum(1))
    cols = expected.sum(0)
    assert torch.allclose(group_scores(expected[:, :6], "in", 3, 2), cols.view(3, 2).sum(1))


def test_heads_share_one_score_over_q_k_v_o_with_gqa():
    model, batch = _llama(), models.inputs("llama")
    _backward(model, batch)
    pruner = LoRAPrune(model, skip_last=False)
    got = pruner.block_importance()["model.layers.0.self_attn"]
    attn = model.model.layers[0].self_attn
    hd, kv, per = 16, 2, 2  # 4 query heads read 2 kv heads: a group is one kv head and its 2 query heads
    total = torch.zeros(kv)
    for mod, axis, unit in [(attn.q_proj, 0, per * hd), (attn.k_proj, 0, hd), (attn.v_proj, 0, hd),
                            (attn.o_proj, 1, per * hd)]:
        v = mod.adapters["default"]
        A, B, W = v.lora_A.detach(), v.lora_B.detach(), mod.base_layer.weight.detach()
        g = v.lora_B.grad @ A + B @ v.lora_A.grad - v.lora_B.grad @ v.lora_A.grad
        imp = (g * (W + v.scale * B @ A)).abs()
        s = torch.stack([(imp[j * unit:(j + 1) * unit] if axis == 0 else imp[:, j * unit:(j + 1) * unit]).sum()
                         for j in range(kv)])
        total += s / (s.norm() + 1e-8)
    assert torch.allclose(got, total, rtol=1e-5, atol=1e-7)
    mlp = model.model.layers[0].mlp
    got = pruner.block_importance()["model.layers.0.mlp"]
    want = torch.zeros(128)
    for mod, dim in [(mlp.gate_proj, 1), (mlp.up_proj, 1), (mlp.down_proj, 0)]:
        s = weight_importance(mod, "default").sum(dim)
        want += s / (s.norm() + 1e-8)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)


def test_cubic_schedule_values():
    f = [cubic_sparsity(t, 100, 0.5) for t in range(101)]
    assert f[:11] == [0.0] * 11 and f[91:] == [0.5] * 10
    assert f[30] == pytest.approx(0.5 * (1 - 0.75 ** 3))
    assert f[50] == pytest.approx(0.5 * (1 - 0.5 ** 3))
    assert f[90] == pytest.approx(0.5)
    assert all(a <= b for a, b in zip(f, f[1:]))
    assert cubic_sparsity(5, 10, 0.8, initial=0.2, initial_warmup=0.0, final_warmup=0.0) == pytest.approx(
        0.8 - 0.6 * 0.5 ** 3)


def test_llama_prune_during_training_then_remove_physically():
    model, batch = _llama(), models.inputs("llama")
    unpruned = run(model, batch)
    pruner = LoRAPrune(model, sparsity=0.5, prune_every=2, skip_last=False)
    assert [b.name for b in pruner.blocks] == ["model.layers.0.self_attn", "model.layers.0.mlp",
                                               "model.layers.1.self_attn", "model.layers.1.mlp"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    seen = []
    for step in range(10):
        _backward(model, batch)
        pruner.step(step, 10)
        seen.append(pruner.pruned_fraction)
        opt.step()
        opt.zero_grad()
    model.eval()
    assert seen[0] == 0 and seen[-1] == pytest.approx(0.5) and all(a <= b for a, b in zip(seen, seen[1:]))
    assert all(int(m.sum()) == m.numel() // 2 for m in pruner.masks.values())
    masked = run(model, batch)
    assert not close(masked, unpruned, 1e-3)  # the masks change the function
    before = parameter_count(model)
    record = pruner.finalize()
    pruned = run(model, batch)
    assert close(pruned, masked)
    r, h = 4, 64
    per_layer = (32 + 16 + 16) * h + h * 32 + r * (32 + 16 + 16) + r * 32 + 3 * 64 * h + 2 * 64 * r + r * 64
    assert before - parameter_count(model) == 2 * per_layer
    assert record.layers[0] == {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64}
    assert model.config.intermediate_size == 64
    assert model.model.layers[0].self_attn.q_proj.kind.out_features == 32
    # the pruned model keeps training with a fresh optimizer
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    _backward(model, batch)
    opt.step()
    assert torch.isfinite(run(model.eval(), batch)).all()


def test_trainer_hook_and_default_skipped_layers():
    model = _llama()
    pruner = LoRAPrune(model)  # 2 layers: int(0.1·2) = 0 leading layers skipped, the last layer skipped
    assert {b.layer for b in pruner.blocks} == {0}

    class T:
        step, total_steps = 0, 1
    _backward(model, models.inputs("llama"))
    pruner.before_optimizer_step(T())  # the last step: masks reach the target
    assert pruner.pruned_fraction == pytest.approx(0.5)


def test_baselines_prune_equal_structured_sparsity():
    counts, masks = {}, {}
    for metric in ("lora", "magnitude", "random"):
        model = _llama()
        if metric == "lora":
            _backward(model, models.inputs("llama"))
        pruner = LoRAPrune(model, metric=metric, skip_last=False)
        pruner.prune_now(0.5)
        counts[metric] = {k: int(m.sum()) for k, m in pruner.masks.items()}
        masks[metric] = torch.cat([m for m in pruner.masks.values()])
    assert counts["lora"] == counts["magnitude"] == counts["random"]
    assert not torch.equal(masks["random"], masks["magnitude"])


def test_minilm_heads_and_channels_removed():
    model, batch = models.minilm(), models.inputs("minilm")
    lorakit.inject(model, lorakit.AdapterConfig(r=4, lora_alpha=8, target_modules=BERT_TARGETS,
                                                init_lora_weights=False, task_type="SEQ_CLS"))
    perturb(model)
    _backward(model, batch)
    pruner = LoRAPrune(model, sparsity=0.5)  # 6 layers: the last is kept
    assert len(pruner.blocks) == 10
    pruner.prune_now()
    masked = run(model, batch)
    before = parameter_count(model)
    pruner.finalize()
    assert close(run(model, batch), masked)
    sa = model.bert.encoder.layer[0].attention.self
    assert sa.num_attention_heads == 6 and sa.query.base_layer.weight.shape == (192, 384)
    assert model.bert.encoder.layer[0].intermediate.dense.base_layer.weight.shape == (768, 384)
    assert model.bert.encoder.layer[5].attention.self.num_attention_heads == 12
    r, h, d, f = 4, 384, 192, 768  # removed per pruned layer: half the heads' width d and half the channels f
    per_layer = 3 * (d * h + d) + h * d + r * 3 * d + r * d + (f * h + f) + h * f + r * f + r * f
    assert before - parameter_count(model) == 5 * per_layer


def test_invalid_options_and_unsupported_adapters():
    model = models.llama()
    with pytest.raises(ConfigError, match="sparsity"):
        LoRAPrune(model, sparsity=1.0)
    with pytest.raises(ConfigError, match="metric"):
        LoRAPrune(model, metric="grad")
    with pytest.raises(ConfigError, match="adapter"):
        LoRAPrune(model)  # no LoRA to take gradients from
    dora = copy.deepcopy(model)
    lorakit.inject(dora, lorakit.AdapterConfig(r=2, target_modules=LLAMA_TARGETS, use_dora=True))
    with pytest.raises(UnsupportedFeatureError):
        LoRAPrune(dora)


def tiny_run_config(tmp_path, n=48, **extra):
    """A RunConfig for a 3-step tiny-llama classification run on a word-decided sentiment file."""
    import json
    import random

    from lorakit.train.args import RunConfig

    rng = random.Random(0)
    words = ("awful dull bad poor boring sad".split(), "great fine good lovely superb nice".split())
    with open(tmp_path / "data.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"the film was {rng.choice(words[i % 2])}", "label": i % 2}) + "\n")
    return RunConfig.from_flat({"model": "tiny-llama", "data": str(tmp_path / "data.jsonl"), "r": 4,
                                "target_modules": "all-linear", "init_lora_weights": False, "learning_rate": 1e-2,
                                "max_steps": 3, "per_device_train_batch_size": 8, "disable_tqdm": True,
                                "output_dir": str(tmp_path / "run"), **extra})


@pytest.mark.parametrize("metric", ["lora", "random"])
def test_prune_experiment_entry_point_tiny(tmp_path, metric):
    from lorakit.rank.prune import prune_experiment

    res = prune_experiment(tiny_run_config(tmp_path), metric=metric, prune_every=1, skip_last=False)
    assert res["pruned_group_fraction"] == pytest.approx(0.5)
    assert res["parameters_after"] < res["parameters_before"]
    assert res["test_accuracy"] == res["masked_test_accuracy"]  # removal does not change predictions
    assert res["layers"][0]["intermediate_size"] == 64


def test_nothing_to_prune_is_a_config_error():
    with pytest.raises(ConfigError, match="skip"):
        LoRAPrune(models.llama(num_hidden_layers=1), metric="random")
