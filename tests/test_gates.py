"""Gates over frozen adapters: Arrow equals PEFT's Arrow; a one-hot gate equals its adapter alone; LoRA-Flow's gate
trains with the Trainer and nothing else moves."""
import copy
import os

import pytest
import torch

import lorakit
from lorakit.compose import ArrowGate, FusionGate, LayerGate, MoleGate, gated
from lorakit.compose.gates import top_right_singular_vector, transformer_blocks
from lorakit.errors import ConfigError, RoutingError
from lorakit.models import tiny_llama
from models import llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
NAMES = ["t0", "t1", "t2", "t3"]
TARGETS = ["q_proj", "v_proj", "down_proj"]


def pool(seed=0, names=NAMES, targets=TARGETS):
    torch.manual_seed(seed)
    model = llama(eos_token_id=None, pad_token_id=0)
    for name in names:
        lorakit.inject(model, lorakit.AdapterConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                    target_modules=targets), name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapters." in n:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def test_exact_and_power_iteration_prototypes_agree_with_the_svd():
    torch.manual_seed(0)
    a, b = torch.randn(4, 30), torch.randn(20, 4)
    want = torch.linalg.svd(b @ a).Vh[0]
    for got in (top_right_singular_vector(a, b, None), top_right_singular_vector(a, b, 200)):
        assert abs(float(got @ want)) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("top_k, temperature", [(2, 1.0), (3, 0.5), (4, 2.0)])
def test_arrow_equals_peft_create_arrow_model(tmp_path, top_k, temperature):
    from peft import ArrowConfig
    from peft.tuners.lora.arrow import create_arrow_model

    model = pool()
    base = llama(eos_token_id=None, pad_token_id=0)
    base.load_state_dict({k: v for k, v in lorakit.unload(copy.deepcopy(model)).state_dict().items()})
    paths = []
    for name in NAMES:
        lorakit.save_adapter(model, tmp_path / name, name=name)
        paths.append(str(tmp_path / name))
    peft_model = create_arrow_model(base, paths, ArrowConfig(top_k=top_k, router_temperature=temperature,
                                                             rng_seed=0))
    ids = torch.randint(1, 100, (2, 9))
    gate = ArrowGate(model, NAMES, top_k=top_k, temperature=temperature, seed=0)
    with torch.no_grad(), lorakit.route(model, weights=gate, adapters=NAMES):
        ours = model(ids).logits
    with torch.no_grad():
        theirs = peft_model(ids).logits
        lorakit.set_active(model, NAMES[:1])
        one = model(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, one, atol=1e-3)  # the routing mixes: not one adapter's output


def test_arrow_weights_keep_top_k_and_sum_to_one():
    model = pool()
    gate = ArrowGate(model, NAMES, top_k=2, power_iterations=None)
    path = next(iter(gate.prototypes))
    x = torch.randn(7, gate.prototypes[path].shape[1])
    w = gate(path, x)
    assert w.shape == (7, 4) and torch.allclose(w.sum(1), torch.ones(7))
    assert ((w > 0).sum(1) == 2).all()
    scores = (x @ gate.prototypes[path].T).abs()
    assert torch.equal(w.topk(2, dim=1).indices.sort(1).values, scores.topk(2, dim=1).indices.sort(1).values)


def test_arrow_refuses_bad_settings_and_embedding_layers():
    model = pool()
    for kwargs in (dict(top_k=5), dict(top_k=0), dict(temperature=0.0)):
        with pytest.raises(ConfigError):
            ArrowGate(model, NAMES, **kwargs)
    with pytest.raises(ConfigError, match="distinct"):
        ArrowGate(model, ["t0", "nope"])
    with pytest.raises(ConfigError, match="linear layers only"):
        ArrowGate(pool(names=["e0", "e1"], targets=["q_proj", "embed_tokens"]), ["e0", "e1"], top_k=1)


def test_one_hot_layer_gate_equals_that_adapter_alone():
    model = pool()
    ids = torch.randint(1, 100, (2, 8))
    lorakit.set_active(model, ["t2"])
    with torch.no_grad():
        alone = model(ids).logits
    gate = LayerGate(model, NAMES)
    with torch.no_grad():
        gate.bias.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]) - 0.25)  # softmax(0) = 1/4 everywhere, + bias = e₂
    with torch.no_grad(), gated(model, gate):
        routed = model(ids).logits
    torch.testing.assert_close(routed, alone, rtol=1e-5, atol=1e-5)
    assert not hasattr(model, "lorakit_gate")


def test_layer_gate_uses_one_weight_per_block_from_the_block_input():
    model = pool()
    gate = LayerGate(model, NAMES, temperature=0.7)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in gate.proj:
            p.weight.normal_()
    seen = {}
    layers = model.model.layers
    hooks = [layers[i].register_forward_pre_hook(lambda m, a, k, i=i: seen.__setitem__(i, a[0] if a else
                                                                                       k["hidden_states"]),
                                                 with_kwargs=True) for i in range(len(layers))]
    with torch.no_grad(), gated(model, gate):
        model(torch.randint(1, 100, (2, 5)))
        for i, h in seen.items():
            want = torch.softmax(gate.proj[i](h.reshape(-1, h.shape[-1])) / 0.7, dim=-1) + gate.bias[i]
            for path in (f"model.layers.{i}.self_attn.q_proj", f"model.layers.{i}.mlp.down_proj"):
                torch.testing.assert_close(gate(path, torch.zeros(10, 1)), want)
    for h in hooks:
        h.remove()
    assert [p for p, _ in transformer_blocks(model)] == [f"model.layers.{i}" for i in range(len(layers))]


def test_layer_gate_trains_with_the_trainer_and_only_the_gate_moves(tmp_path):
    from lorakit.data import CompletionDataset
    from lorakit.models import train_tokenizer
    from lorakit.train.args import TrainingArguments
    from lorakit.train.tasks import make_task
    from lorakit.train.trainer import Trainer

    texts = [f"the film was {'good' if i % 2 else 'bad'}" for i in range(32)]
    tok = train_tokenizer(texts + ["prompt: "], vocab_size=200)
    model = tiny_llama(len(tok), "causal-lm", 2, 0, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id)
    torch.manual_seed(1)
    for name in ("a", "b"):
        lorakit.inject(model, lorakit.AdapterConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                    task_type="CAUSAL_LM"), name)
    adapters_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gate = LayerGate(model, ["a", "b"])
    task = make_task("causal-lm", tok, max_length=16)
    args = TrainingArguments(output_dir=str(tmp_path), disable_tqdm=True, save_steps=0, max_steps=6,
                             per_device_train_batch_size=8, learning_rate=5e-2)
    with gated(model, gate):
        assert {n for n, p in model.named_parameters() if p.requires_grad} == \
            {f"lorakit_gate.{n}" for n, _ in gate.named_parameters()}
        Trainer(model, task, args, CompletionDataset(["prompt: "] * 32, texts)).train()
    assert gate.bias.abs().sum() > 0 and any(p.weight.abs().sum() > 0 for p in gate.proj)
    for n, p in model.named_parameters():
        assert torch.equal(p, adapters_before[n]), n
        assert p.requires_grad == (".adapters." in n)  # restored: adapters trainable again, base frozen


def test_gate_errors():
    model = pool()
    gate = LayerGate(model, NAMES)
    with pytest.raises(RoutingError, match="attach it"):
        with torch.no_grad(), lorakit.route(model, weights=gate, adapters=NAMES):
            model(torch.randint(1, 100, (1, 4)))
    stack = torch.nn.Module()
    stack.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))
    for name in ("a", "b"):
        lorakit.inject(stack, lorakit.AdapterConfig(r=2, target_modules=["0", "1", "2"]), name)
    with pytest.raises(ConfigError, match="hidden_size"):
        LayerGate(stack, ["a", "b"])
    assert LayerGate(stack, ["a", "b"], hidden_size=8).block_paths == ["layers.0", "layers.1", "layers.2"]
    with gated(model, gate):
        with pytest.raises(ConfigError, match="already has"):
            with gated(model, ArrowGate(model, NAMES)):
                pass


def test_fusion_gate_open_equals_every_adapter_on_and_closed_equals_the_base():
    model = pool()
    ids = torch.randint(1, 100, (2, 6))
    lorakit.set_active(model, NAMES)
    with torch.no_grad():
        all_on = model(ids).logits
        with lorakit.disabled(model):
            base = model(ids).logits
    gate = FusionGate(model, NAMES, timesteps=3)
    for bias, want in ((60.0, all_on), (-60.0, base)):
        with torch.no_grad():
            for w in gate.weights:
                w[:2] = 0.0  # no dependence on the activations: g = σ(b)
                w[2], w[3] = bias, 1.0
        with torch.no_grad(), gated(model, gate):
            torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
    gate.set_timestep(1)
    with torch.no_grad():
        for w in gate.weights:
            w[4 + 1] = 120.0  # bucket 1 opens the gate again
        with gated(model, gate):
            torch.testing.assert_close(model(ids).logits, all_on, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError):
        gate.set_timestep(3)


def test_fusion_gate_is_per_channel_and_trains_alone():
    model = pool()
    gate = FusionGate(model, NAMES[:3])
    path = next(iter(gate.index))
    w = gate.weights[gate.index[path]]
    h, d0, d1 = (torch.randn(5, w.shape[1]) for _ in range(3))
    ln = lambda t: torch.nn.functional.layer_norm(t, t.shape[-1:])  # noqa: E731
    want = h + sum(w[3] * torch.sigmoid(w[0] * ln(d) + w[1] * ln(h) * ln(d) + w[2]) * d for d in (d0, d1))
    torch.testing.assert_close(gate(path, h, [d0, None, d1]), want)  # None: an adapter the layer lacks
    with gated(model, gate):
        model(torch.randint(1, 100, (2, 6))).logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate.weights)
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapters." in n)


def test_mole_gate_starts_uniform_follows_its_formula_and_trains_alone():
    model = pool()
    ids = torch.randint(1, 100, (2, 6))
    gate = MoleGate(model, NAMES, record_balance=True)
    with torch.no_grad():
        with lorakit.route(model, weights=torch.full((1, 4), 0.25), adapters=NAMES):
            uniform = model(ids).logits
        with gated(model, gate):
            torch.testing.assert_close(model(ids).logits, uniform, rtol=1e-5, atol=1e-5)  # e = 0: weights 1/4
    path = next(iter(gate.index))
    e = gate.e[gate.index[path]]
    with torch.no_grad():
        e.normal_()
        gate.log_tau.fill_(-0.5)
    h, d0, d1 = (torch.randn(5, e.numel()) for _ in range(3))
    ln = lambda t: torch.nn.functional.layer_norm(t, t.shape[-1:])  # noqa: E731
    w = torch.softmax(torch.stack([ln(d0) @ e, ln(d1) @ e], -1) / torch.exp(torch.tensor(-0.5)), -1)
    torch.testing.assert_close(gate(path, h, [d0, None, d1, None]), h + w[:, :1] * d0 + w[:, 1:] * d1)
    gate._mass.clear()
    with gated(model, gate):
        loss = model(ids).logits.pow(2).mean() + gate.balance_loss()
        loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate.e) and gate.log_tau.grad is not None
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapters." in n)
    with pytest.raises(RoutingError, match="record_balance"):
        gate.balance_loss()
