"""LoRA's fused training path: `plus_delta` (one addmm) and the CPU dropout+A step (`_DropoutDown`)."""
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.variants.base import Variant
from lorakit.variants.lora import _DropoutDown


def _layer(dropout: float, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 16))
    return lorakit.inject(model, lorakit.AdapterConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0"],
                                                       init_lora_weights=False))


def test_dropout_down_gradcheck_and_same_mask_reference():
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)

    def fused(x, a):
        torch.manual_seed(0)
        return _DropoutDown.apply(x, a, 0.3)

    assert torch.autograd.gradcheck(fused, (x, a))
    torch.manual_seed(0)
    keep = torch.rand_like(x) >= 0.3
    ref = F.linear(x * keep, a)
    out = fused(x, a)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (x, a), g), torch.autograd.grad(ref, (x, a), g)):
        torch.testing.assert_close(got, want)


def test_fused_add_equals_plain_sum_without_dropout():
    model = _layer(0.0).train()
    x = torch.randn(6, 24, requires_grad=True)
    fused = model(x)
    variant = model[0].adapters["default"]
    plain = model[0].base_layer(x) + Variant.plus_delta(variant, torch.zeros(6, 16), x, None)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    gx = torch.autograd.grad(fused.square().sum(), x)[0]
    gx_plain = torch.autograd.grad(plain.square().sum(), x)[0]
    torch.testing.assert_close(gx, gx_plain, rtol=1e-5, atol=1e-6)


def test_dropout_is_unbiased_and_keeps_one_minus_p():
    model = _layer(0.25).train()
    x = torch.randn(512, 24)
    with torch.no_grad():
        model.eval()
        expected = model(x) - model[0].base_layer(x)
        model.train()
        torch.manual_seed(0)
        mean = torch.stack([model(x) - model[0].base_layer(x) for _ in range(400)]).mean(0)
    rel = (mean - expected).abs().mean() / expected.abs().mean()
    assert rel < 0.05  # 400 masks: sampling error about 3 %; a missing 1/(1 - p) rescale would be 25 %
    torch.manual_seed(0)
    assert abs((torch.rand(10**6) >= 0.25).float().mean().item() - 0.75) < 2e-3
