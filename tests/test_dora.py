"""DoRA: factored row norm equals the dense one; the norm cache is used and invalidated correctly."""
import pytest
import torch
from torch import nn

import lorakit
from lorakit.variants import dora as dora_mod
from lorakit.variants.dora import factored_row_norm


@pytest.mark.parametrize("m,n,r", [(48, 64, 8), (768, 1024, 64), (4096, 4096, 16), (4096, 4096, 384)])
def test_factored_norm_equals_dense_norm(m, n, r):
    g = torch.Generator().manual_seed(m + r)
    w = torch.randn(m, n, generator=g) / n ** 0.5
    a = torch.randn(r, n, generator=g) / n ** 0.5
    b = torch.randn(m, r, generator=g) / r ** 0.5   # ΔW comparable to W: all three terms matter
    s = 0.7
    dense = torch.linalg.vector_norm(w.double() + s * (b.double() @ a.double()), dim=1)
    ours = factored_row_norm(w, a, b, s)
    assert ours.dtype == torch.float32
    assert ((ours.double() - dense).abs() / dense).max() <= 1e-6


def test_factored_norm_chunks_columns(monkeypatch):
    """A small chunk budget forces many column chunks; the result must not change."""
    w, a, b = torch.randn(96, 640), torch.randn(5, 640), torch.randn(96, 5)
    whole = factored_row_norm(w, a, b, 0.3)
    monkeypatch.setattr(dora_mod, "CHUNK_BUDGET_BYTES", 96 * 4 * 128)
    assert len(dora_mod._chunks(w)) == 5
    assert torch.allclose(factored_row_norm(w, a, b, 0.3), whole, rtol=1e-6, atol=0)


def dora_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 24))
    lorakit.inject(model, lorakit.AdapterConfig(r=4, use_dora=True, target_modules=["0"], init_lora_weights=False))
    return model, model[0].adapters["default"]


def count_norms(monkeypatch):
    calls = []
    real = dora_mod.factored_row_norm
    monkeypatch.setattr(dora_mod, "factored_row_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_norm_cached_until_an_input_changes(monkeypatch):
    model, variant = dora_linear()
    calls = count_norms(monkeypatch)
    x = torch.randn(3, 32)
    with torch.no_grad():
        y0 = model(x)
        model(x)
        assert len(calls) == 0                      # nothing changed since init computed it
        variant.lora_A.add_(0.1)                    # in-place change of A
        y1 = model(x)
        model(x)
        assert len(calls) == 1 and not torch.allclose(y0, y1)
        model[0].base_layer.weight.mul_(1.01)       # change of W
        model(x)
        assert len(calls) == 2
        variant.scale *= 2                          # change of scale
        model(x)
        assert len(calls) == 3
        variant.lora_magnitude_vector.add_(0.5)     # magnitude is not part of the norm
        model(x)
        assert len(calls) == 3


def test_cached_norm_is_never_stale_during_training(monkeypatch):
    model, variant = dora_linear()
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(5, 32)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
        a, b, s = variant.matrices()
        w = model[0].base_layer.weight
        fresh = torch.linalg.vector_norm(w + s * (b @ a), dim=1)
        assert torch.allclose(variant.weight_norm(), fresh, rtol=1e-5)


def test_norm_is_detached_and_magnitude_gets_gradient():
    model, variant = dora_linear()
    model(torch.randn(2, 32)).sum().backward()
    assert not variant.weight_norm().requires_grad
    assert variant.lora_magnitude_vector.grad is not None and variant.lora_magnitude_vector.grad.abs().sum() > 0


def test_dora_output_matches_definition():
    """y = m ⊙ (W + sBA) x / ‖W + sBA‖_row + bias, from the dense definition."""
    model, variant = dora_linear()
    with torch.no_grad():
        variant.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 24))
        x = torch.randn(4, 32)
        a, b, s = variant.matrices()
        lin = model[0].base_layer
        v = lin.weight + s * b @ a
        ref = x @ (variant.lora_magnitude_vector[:, None] * v / v.norm(dim=1, keepdim=True)).T + lin.bias
        assert torch.allclose(model(x), ref, atol=1e-5)
