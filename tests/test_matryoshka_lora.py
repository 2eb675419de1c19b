"""MatryoshkaLoRA: a LoRA with a fixed diagonal P (Algorithm 1) training all nested ranks of S at once; at rank k
ΔW = s·c(k)·B[:, :k]A[:k] (or the truncated P form); merge, save and export at any rank."""
import json
import math
import os

import pytest
import torch

import lorakit
from lorakit.errors import ConfigError
from lorakit.layers import AdaptedLayer
from lorakit.variants.matryoshka_lora import at_rank, default_train_ranks, diagonal, export_at_rank

from contract import (check_export_loads_in_peft, check_merge_cycle, check_mixed_batch, check_save_load_save,
                      check_vision, close, mlp, perturb, planted_task, run)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread_module")
X = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))


def config(r=8, **kw):
    return lorakit.AdapterConfig(r=r, variant="matryoshka_lora", target_modules=kw.pop("target_modules", ["fc1", "fc2"]),
                                 **kw)


def variants(model, name="default"):
    return {p: m.adapters[name] for p, m in model.named_modules() if isinstance(m, AdaptedLayer) and name in m.adapters}


def mat_mlp(names=("default",), **kw):
    model = mlp()
    for i, n in enumerate(names):
        torch.manual_seed(i)
        lorakit.inject(model, config(r=8 - 2 * i, lora_alpha=kw.get("lora_alpha", 8 + i),
                                     options=kw.get("options", {})), n)
        perturb(model, n, seed=i)
    return model


def manual(model, x, pairs, name="default"):
    """Base MLP output with ΔW = Σ weight·s·B[:, :k]A[:k] over `pairs` [(k, weight)] on both layers."""
    def layer(mod, path, h):
        v = variants(model, name)[path]
        w = mod.base_layer.weight + sum(wt * v.scale * v.lora_B[:, :k] @ v.lora_A[:k] for k, wt in pairs)
        return torch.nn.functional.linear(h, w, mod.base_layer.bias)
    with torch.no_grad():
        return layer(model.fc2, "fc2", torch.nn.functional.gelu(layer(model.fc1, "fc1", x)))


def test_parameter_count_and_init():
    r = 8
    model = mlp()
    base = run(model, X)
    lorakit.inject(model, config(r=r))
    assert lorakit.count_parameters(model)[0] == 2 * r * (64 + 64)  # P is a fixed buffer: r·(in + out) per layer
    assert torch.equal(run(model, X), base)  # B = 0
    with at_rank(model, 2):
        assert torch.equal(run(model, X), base)
    for v in variants(model).values():
        assert not v.lora_P.requires_grad and v.lora_B.abs().max() == 0 and v.lora_A.abs().min() > 0
    assert not any("lora_P" in k for k in lorakit.adapter_parameters(model, "default"))
    model = mlp()
    lorakit.inject(model, config(r=r, init_lora_weights=False))
    assert not close(run(model, X), base)


def test_a_init_is_the_reference_kaiming_on_in_by_r():
    """The reference stores A as (in, r) and runs kaiming_uniform_(a=√5): U(±1/√r), independent of in (PEFT's
    (r, in) layout gives U(±1/√in), 10× smaller here). Bound and std (bound/√3) within 5 %."""
    torch.manual_seed(0)
    model = lorakit.inject(torch.nn.Sequential(torch.nn.Linear(768, 32)), config(r=8, target_modules=["0"]))
    a = model[0].adapters["default"].lora_A.detach()
    bound = 1 / math.sqrt(8)
    assert a.abs().max().item() <= bound and a.abs().max().item() == pytest.approx(bound, rel=0.05)
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert model[0].adapters["default"].lora_B.abs().max() == 0


def test_diagonal_p_by_hand():
    assert default_train_ranks(8) == [1, 2, 4, 8] and default_train_ranks(6) == [1, 2, 4, 6]
    assert default_train_ranks(1) == [1]
    p = diagonal(8, [1, 2, 4, 8], "rank")
    assert torch.allclose(p, torch.tensor([1.875, 0.875, 0.375, 0.375, 0.125, 0.125, 0.125, 0.125],
                                          dtype=torch.float64))
    q = 1 / math.sqrt(2) + 0.5 + 1 / math.sqrt(8)
    assert torch.allclose(diagonal(8, [1, 2, 4, 8], "sqrt")[:3], torch.tensor([1 + q, q, 0.5 + 1 / math.sqrt(8)],
                                                                               dtype=torch.float64))
    assert torch.equal(diagonal(4, [2, 4], "none"), torch.tensor([2.0, 2, 1, 1], dtype=torch.float64))
    assert torch.equal(diagonal(4, [2, 4], "none", "binary"), torch.tensor([1.0, 1, 0.5, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("c", ["none", "rank", "sqrt"])
def test_default_forward_is_the_weighted_sum_of_all_nested_ranks(c):
    weight = {"none": lambda k: 1.0, "rank": lambda k: 1 / k, "sqrt": lambda k: k ** -0.5}[c]
    model = mat_mlp(options={"c": c})
    assert close(run(model, X), manual(model, X, [(k, weight(k)) for k in (1, 2, 4, 8)]), tol=1e-6)
    binary = mat_mlp(options={"c": c, "mode": "binary"})
    assert close(run(binary, X), manual(binary, X, [(k, weight(k) / 4) for k in (1, 2, 4, 8)]), tol=1e-6)
    model.train()  # training runs the same form (no sampling)
    with torch.no_grad():
        assert close(model(X), manual(model, X, [(k, weight(k)) for k in (1, 2, 4, 8)]), tol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_rank_k_is_the_truncation_with_c_of_k_or_with_p(k):
    model = mat_mlp(options={"c": "sqrt"})
    with at_rank(model, k):
        assert close(run(model, X), manual(model, X, [(k, k ** -0.5)]), tol=1e-6)
        for v in variants(model).values():
            a, b, s = v.factors()
            assert a.shape == (k, 64) and s == pytest.approx(v.scale / math.sqrt(k))
    diag = mat_mlp(options={"c": "rank", "rank_form": "diag"})  # P truncated: Σ_{ρ∈S} c(ρ)·B[:, :min(ρ,k)]A[:min(ρ,k)]
    with at_rank(diag, k):
        assert close(run(diag, X), manual(diag, X, [(min(rho, k), 1 / rho) for rho in (1, 2, 4, 8)]), tol=1e-6)
    # a plain LoRA of the first k components with scale s·c(k) (lora_alpha = s·c(k)·k) gives the same outputs
    ref = mlp()
    s = variants(model)["fc1"].scale
    lorakit.inject(ref, lorakit.AdapterConfig(r=k, lora_alpha=s * k ** 0.5, target_modules=["fc1", "fc2"]))
    with torch.no_grad():
        for p, v in variants(model).items():
            variants(ref)[p].lora_A.copy_(v.lora_A[:k])
            variants(ref)[p].lora_B.copy_(v.lora_B[:, :k])
    with at_rank(model, k):
        assert close(run(model, X), run(ref, X), tol=1e-6)


def test_every_component_gets_gradient():
    model = mat_mlp(options={"train_ranks": [2, 4]})
    model.train()
    model(X).pow(2).sum().backward()
    for v in variants(model).values():
        assert (v.lora_A.grad.abs().sum(1)[:4] > 0).all() and (v.lora_B.grad.abs().sum(0)[:4] > 0).all()
        assert (v.lora_A.grad[4:] == 0).all() and (v.lora_B.grad[:, 4:] == 0).all()  # P = 0 above max(S)


def test_merge_cycle_save_load_save_and_mixed_batch(tmp_path):
    model = mat_mlp()
    check_merge_cycle(model, X)
    with at_rank(model, 2):
        check_merge_cycle(model, X)
    fresh = check_save_load_save(mat_mlp(), mlp(), X, tmp_path)
    with at_rank(fresh, 4):
        assert close(run(fresh, X), manual(fresh, X, [(4, 0.5)]), tol=1e-6)
    data = json.loads((tmp_path / "first" / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORAKIT_MATRYOSHKA_LORA"
    assert data["options"] == {"train_ranks": None, "c": "sqrt", "mode": "diag", "rank_form": "scale"}
    mixed = mat_mlp(("a", "b"))
    check_mixed_batch(mixed, X)
    with at_rank(mixed, 1, "b"):
        check_mixed_batch(mixed, X)


@pytest.mark.parametrize("k", [3, 8])
def test_export_at_rank_loads_in_peft(tmp_path, k):
    model = mat_mlp()
    with at_rank(model, k):
        check_export_loads_in_peft(model, mlp(), X, tmp_path / "a", r=k)
    check_export_loads_in_peft(model, mlp(), X, tmp_path / "p", r=8)  # no rank: the P form, a rank-8 LoRA
    export_at_rank(model, tmp_path / "b", k)
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["r"] == k


def test_vit_and_conv(tmp_path):
    check_vision(config(r=4, target_modules=["q_proj", "v_proj", "fc1"]), config(r=3, target_modules=["conv", "conv2d", "head"]), tmp_path, at_rank=2)


def test_planted_task():
    before, after, n = planted_task(config(r=8, target_modules=["fc1"]), lr=1e-2)
    print("matryoshka planted MSE", before, after)
    assert n == 8 * (64 + 64)
    assert after <= 0.5 * before, (before, after)


def test_invalid_options():
    for options, word in [({"c": "log"}, "option c"), ({"mode": "masked"}, "mode"), ({"rank_form": "x"}, "rank_form"),
                          ({"train_ranks": []}, "train_ranks"), ({"train_ranks": [0]}, "train_ranks"),
                          ({"train_ranks": [16]}, "train_ranks"), ({"P": 1}, "P")]:
        with pytest.raises(ConfigError, match=word):
            lorakit.inject(mlp(), config(options=options))
