"""Per-token composition (`lorakit.route(model, weights=...)`): the output is base + Σᵢ wᵢ(token)·ΔᵢWx, exactly."""

import pytest
import torch
from torch import nn

import lorakit
from lorakit.errors import RoutingError
from models import llama


class OneLayer(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def layer_with(*specs, dtype=torch.float64):
    """One Linear(12 → 10) with adapters named a, b, ...: specs are (variant, r)."""
    torch.manual_seed(0)
    model = OneLayer(nn.Linear(12, 10)).to(dtype)
    for i, (variant, r) in enumerate(specs):
        lorakit.inject(model, lorakit.AdapterConfig(r=r, lora_alpha=2 * r, variant=variant, target_modules=["proj"],
                                                    init_lora_weights=False), "abcd"[i])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def delta_of(model, name, x):
    with torch.no_grad(), lorakit.disabled(model):
        base = model(x)
    lorakit.set_active(model, [name])
    with torch.no_grad():
        return model(x) - base, base


def test_layer_output_is_base_plus_weighted_deltas():
    model = layer_with(("lora", 4), ("dora", 3), ("vera", 6))
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    w = torch.rand(3, 5, 3, dtype=torch.float64)
    w[0, :2] = 0  # some tokens weight no adapter
    w[1, :, 1] = 0  # some adapters skip some tokens
    (da, base), (db, _), (dc, _) = (delta_of(model, n, x) for n in "abc")
    want = base + w[..., :1] * da + w[..., 1:2] * db + w[..., 2:] * dc
    with torch.no_grad(), lorakit.route(model, weights=w, adapters=["a", "b", "c"]):
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the same weights given as one value per token per adapter
    with torch.no_grad(), lorakit.route(model, weights={"a": w[..., 0], "b": w[..., 1], "c": w[..., 2]}):
        torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[0, :2], base[0, :2])  # no weight: the base output, bit for bit


def test_masked_tokens_are_bit_identical_to_the_base_in_a_whole_model():
    torch.manual_seed(1)
    model = llama(eos_token_id=None, pad_token_id=0)
    for name in ("a", "b"):
        lorakit.inject(model, lorakit.AdapterConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                    target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]),
                       name)
    ids = torch.randint(1, 100, (2, 9))
    with torch.no_grad(), lorakit.disabled(model):
        base = model(ids).logits
    masks = {"a": torch.zeros(2, 9, dtype=torch.bool), "b": torch.zeros(2, 9, dtype=torch.bool)}
    masks["a"][:, 6:] = True  # the last three tokens of each row
    masks["b"][1, 7:] = True
    with torch.no_grad(), lorakit.route(model, weights=masks):
        mixed = model(ids).logits
    assert torch.equal(mixed[:, :6], base[:, :6])  # causal: tokens before every mask see the base model
    assert not torch.allclose(mixed[:, 6:], base[:, 6:], atol=1e-4)


def test_one_hot_gate_equals_that_adapter_alone_and_sequence_weights_work_in_generate():
    torch.manual_seed(2)
    model = llama(eos_token_id=None, pad_token_id=0)
    for name in ("a", "b", "c"):
        lorakit.inject(model, lorakit.AdapterConfig(r=4, lora_alpha=8, init_lora_weights=False), name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapters." in n:
                p.add_(torch.randn_like(p) * 0.2)
    ids = torch.randint(1, 100, (2, 7))
    lorakit.set_active(model, ["b"])
    with torch.no_grad():
        alone = model(ids).logits
        alone_gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    lorakit.set_active(model, ["a", "c"])  # the active set does not matter inside a mix
    calls = []

    def gate(path, x):
        calls.append(path)
        return torch.tensor([0.0, 1.0, 0.0], dtype=x.dtype).expand(x.shape[0], 3)

    with torch.no_grad(), lorakit.route(model, weights=gate, adapters=["a", "b", "c"]):
        gated = model(ids).logits
    torch.testing.assert_close(gated, alone, rtol=1e-5, atol=1e-5)
    assert calls and all(p.startswith("model.layers.") for p in calls)
    with torch.no_grad(), lorakit.route(model, weights=torch.tensor([[0.0, 1.0, 0.0]] * 2), adapters=["a", "b", "c"]):
        generated = model.generate(ids, max_new_tokens=5, do_sample=False)  # (batch, n): per sequence, any length
    assert torch.equal(generated, alone_gen)


def test_weights_get_gradients_and_adapters_get_only_their_tokens_gradient():
    model = layer_with(("lora", 4), ("lora", 2))
    x = torch.randn(2, 4, 12, dtype=torch.float64)
    w = torch.rand(2, 4, 2, dtype=torch.float64, requires_grad=True)
    with lorakit.route(model, weights=w, adapters=["a", "b"]):
        model(x).pow(2).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    da, base = delta_of(model, "a", x)
    db, _ = delta_of(model, "b", x)
    wd = w.detach().clone().requires_grad_()
    (base + wd[..., :1] * da + wd[..., 1:] * db).pow(2).sum().backward()
    torch.testing.assert_close(w.grad, wd.grad, rtol=1e-10, atol=1e-10)
    # a mask that leaves adapter b no token sends b no gradient
    model.zero_grad()
    mask = {"a": torch.ones(2, 4), "b": torch.zeros(2, 4)}
    with lorakit.route(model, weights=mask):
        model(x).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if ".adapters." in n}
    assert all(g is None or not g.any() for n, g in grads.items() if ".adapters.b." in n)
    assert any(g is not None and g.any() for n, g in grads.items() if ".adapters.a." in n)


def test_bf16_base_mixes_in_bf16():
    model = layer_with(("lora", 4), ("lora", 4), dtype=torch.bfloat16)
    x = torch.randn(3, 12, dtype=torch.bfloat16)
    with torch.no_grad(), lorakit.route(model, weights=torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 0.0]]),
                                        adapters=["a", "b"]):
        out = model(x)
    with torch.no_grad(), lorakit.disabled(model):
        base = model(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out[2], base[2])


@pytest.mark.parametrize("kwargs, match", [
    (dict(weights=torch.ones(4, 2)), "needs adapters"),
    (dict(weights=torch.ones(4, 3), adapters=["a", "b"]), "shaped"),
    (dict(weights=torch.ones(4, 2), adapters=["a", "zz"]), "unknown adapter"),
    (dict(weights=torch.ones(4, 2), adapters=["a", "a"]), "distinct"),
    (dict(weights=torch.full((4, 2), float("nan")), adapters=["a", "b"]), "non-finite"),
    (dict(weights=torch.ones(4, 2, dtype=torch.long), adapters=["a", "b"]), "bool or floating"),
    (dict(weights={"a": torch.ones(4), "b": torch.ones(5)}), "same number of tokens"),
    (dict(adapter_names=["a"], weights={"a": torch.ones(3)}), "not both"),
    (dict(adapters=["a"]), "pass weights too"),
    (dict(weights=lambda path, x: x, ), "gate needs adapters"),
])
def test_bad_mixing_arguments_raise_before_anything_runs(kwargs, match):
    model = layer_with(("lora", 4), ("lora", 2))
    with pytest.raises(RoutingError, match=match):
        with lorakit.route(model, **kwargs):
            pass
    assert model.proj.routing is None


def test_bad_shapes_at_run_time_raise_and_leave_the_model_unrouted():
    model = layer_with(("lora", 4), ("lora", 2))
    x = torch.randn(5, 12, dtype=torch.float64)
    with pytest.raises(RoutingError, match="multiple"):
        with lorakit.route(model, weights=torch.ones(2, 2), adapters=["a", "b"]):
            model(x)
    with pytest.raises(RoutingError, match="gate must return"):
        with lorakit.route(model, weights=lambda path, x: torch.ones(3), adapters=["a", "b"]):
            model(x)
    assert model.proj.routing is None
    lorakit.merge(model, ["a"])
    with pytest.raises(RoutingError, match="unmerged"):
        with lorakit.route(model, weights={"a": torch.ones(5)}):
            pass


def test_conv_layers_refuse_per_token_mixing():
    torch.manual_seed(0)
    model = OneLayer(nn.Conv2d(3, 4, 3))
    lorakit.inject(model, lorakit.AdapterConfig(r=2, target_modules=["proj"]), "a")
    with pytest.raises(RoutingError, match="features last"):
        with lorakit.route(model, weights={"a": torch.ones(1)}):
            model(torch.randn(1, 3, 6, 6))


@pytest.mark.parametrize("as_gate", [False, True])
def test_each_adapter_runs_only_on_the_tokens_it_weights(monkeypatch, as_gate):
    model = layer_with(("lora", 4), ("lora", 2))
    seen = {}
    for name in "ab":
        variant = model.proj.adapters[name]

        def counting(x, base, n=name, original=variant.delta):
            seen[n] = x.shape[0]
            return original(x, base)
        monkeypatch.setattr(variant, "delta", counting)
    w = torch.zeros(10, 2, dtype=torch.float64)
    w[:3, 0], w[3:4, 1] = 1.0, 0.5
    weights = (lambda path, x: w) if as_gate else w
    with torch.no_grad(), lorakit.route(model, weights=weights, adapters=["a", "b"]):
        model(torch.randn(10, 12, dtype=torch.float64))
    assert seen == {"a": 3, "b": 1}
