"""LoLDU (variant "loldu"): the LDU decomposition reconstructs W, ΔW = σ·P L_r diag(z − D_r) U_r (0 at init), the
init methods, the permutation stored as indices, dropout on the trainable path only, and the contract."""
from __future__ import annotations

import json

import contract
import pytest
import torch
from contract import (check_export_loads_in_peft, check_merge_cycle, check_mixed_batch, check_save_load_save, close, mlp,
                      perturb, planted_task, run)
from models import convnet, inputs, llama, vit
from safetensors.torch import load_file

import lorakit
from lorakit.errors import ConfigError, UnsupportedFeatureError
from lorakit.variants.loldu import ldu


def config(**kw):
    return lorakit.AdapterConfig(**{"r": 8, "lora_alpha": 4, "variant": "loldu", **kw})


def dense_delta(v):
    """σ·P·L_r·diag(z − D_r)·U_r written out with the dense permutation matrix of torch.linalg.lu."""
    p = torch.linalg.lu(v.kind.weight().detach())[0]
    return v.scale * p @ v.loldu_L @ torch.diag(v.vector_z - v.loldu_D) @ v.loldu_U


@pytest.mark.parametrize("shape", [(64, 64), (32, 64), (128, 64)])
def test_ldu_reconstructs_w(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    perm, lower, d, upper = ldu(w)
    k = min(shape)
    assert lower.shape == (shape[0], k) and upper.shape == (k, shape[1]) and perm.dtype == torch.int64
    assert close(lower[perm] @ torch.diag(d) @ upper, w)  # P·L·diag(D)·U = W, P as indices
    p = torch.linalg.lu(w)[0]
    assert torch.equal(p @ lower, lower[perm])
    assert torch.equal(torch.diagonal(lower), torch.ones(k)) and torch.equal(lower.triu(1), torch.zeros_like(lower))
    assert close(torch.diagonal(upper), torch.ones(k)) and torch.equal(upper.tril(-1), torch.zeros_like(upper))


def test_ldu_of_a_singular_matrix_keeps_the_reconstruction():
    w = torch.tensor([[0.0, 2.0, 1.0], [0.0, 1.0, 3.0], [0.0, 4.0, 1.0]])  # zero first column: pivot D_0 = 0
    perm, lower, d, upper = ldu(w)
    assert torch.isfinite(upper).all() and d[0] == 1
    assert close(lower[perm] @ torch.diag(d) @ upper, w)


def test_full_rank_offset_is_sigma_w_and_init_keeps_output():
    """At r = min(m, n) the frozen offset σ·P L diag(D) U is σ·W; at init (z = D_r) ΔW is exactly 0."""
    model, x = mlp(), torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    base_out = run(model, x)
    lorakit.inject(model, config(r=64, lora_alpha=64, target_modules=["fc1", "fc2"]))
    v = model.fc1.adapters["default"]
    a0, b0 = v.offset_factors()
    assert close(v.scale * b0 @ a0, model.fc1.base_layer.weight)
    assert torch.equal(v.vector_z, v.loldu_D)
    assert v.delta_weight().abs().max() == 0
    assert torch.equal(run(model, x), base_out)


def test_trainable_count_is_r_per_layer():
    model = llama()
    lorakit.inject(model, config(target_modules=["q_proj", "k_proj", "down_proj"], rank_pattern={"k_proj": 3}))
    layers = 2  # llama() has 2 decoder layers
    assert lorakit.count_parameters(model)[0] == layers * (8 + 3 + 8)


@pytest.mark.parametrize("method", ["uniform", "normal", "constant", "ones", "zeros"])
def test_init_methods(method):
    """z from the LU diagonal D_r per method; the residual as the reference takes it: with the drawn z (ΔW = 0) for
    uniform/normal/constant, whose z shares D_r's storage there, with D_r (ΔW = σ·P L_r diag(z − D_r) U_r) for
    ones/zeros, whose z does not."""
    torch.manual_seed(0)
    model = lorakit.inject(mlp(), config(target_modules=["fc1"], options={"init_method": method}))
    v = model.fc1.adapters["default"]
    z = v.vector_z.detach()
    perm, lower, d, upper = ldu(model.fc1.base_layer.weight.detach().float())
    d = d[:8]
    mean = d.mean()
    expect = {"constant": lambda: torch.equal(z, torch.full_like(z, mean.item())),
              "ones": lambda: torch.equal(z, torch.ones(8)), "zeros": lambda: torch.equal(z, torch.zeros(8)),
              "uniform": lambda: bool((z.abs() <= mean.abs() / 2).all()) and z.unique().numel() == 8,
              "normal": lambda: z.unique().numel() == 8}
    assert expect[method]()
    if method in ("ones", "zeros"):
        p_l = lower[:, :8].index_select(0, perm)
        assert close(v.delta_weight(), v.scale * p_l @ torch.diag(z - d) @ upper[:8])
        assert v.delta_weight().abs().max() > 0.1
    else:
        assert v.delta_weight().abs().max() == 0
    assert close(v.delta_weight(), dense_delta(v))


def test_factors_are_rank_r_and_match_the_definition():
    model = lorakit.inject(llama(), config(target_modules=["gate_proj", "k_proj"]))
    perturb(model)
    for name in ("gate_proj", "k_proj"):
        v = getattr(model.model.layers[0].mlp if name == "gate_proj" else model.model.layers[0].self_attn,
                    name).adapters["default"]
        a, b, s = v.factors()
        assert a.shape == (8, v.kind.in_features) and b.shape == (v.kind.out_features, 8) and s == 0.5
        assert close(v.delta_weight(), dense_delta(v))
        assert v.delta_weight().abs().max() > 0


def test_export_is_a_rank_r_lora_that_peft_loads(tmp_path):
    model, x = lorakit.inject(llama(), config(target_modules=["q_proj", "k_proj", "down_proj"])), inputs("llama")
    perturb(model)
    check_export_loads_in_peft(model, llama(), x, tmp_path, r=8)


def test_merge_cycle_save_load_and_mixed_batch(tmp_path):
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    model = lorakit.inject(mlp(), config(target_modules=["fc1", "fc2"]))
    perturb(model)
    check_merge_cycle(model, x)
    check_save_load_save(model, mlp(), x, tmp_path)
    saved = load_file(tmp_path / "first" / "adapter_model.safetensors")
    assert saved["base_model.model.fc1.loldu_P"].dtype == torch.int64
    assert sorted(k.rsplit(".", 1)[1] for k in saved if ".fc1." in k) == \
        ["loldu_D", "loldu_L", "loldu_P", "loldu_U", "vector_z"]
    assert json.loads((tmp_path / "first" / "adapter_config.json").read_text())["peft_type"] == "LORAKIT_LOLDU"
    both = lorakit.inject(mlp(), config(target_modules=["fc1", "fc2"]), "a")
    lorakit.inject(both, config(r=4, target_modules=["fc1"], options={"init_method": "constant"}), "b")
    perturb(both, "a", seed=1)
    perturb(both, "b", seed=2)
    check_mixed_batch(both, x)


def test_vit(tmp_path):
    model, x = vit(), inputs("vit")
    lorakit.inject(model, config(r=4, target_modules=["q_proj", "v_proj", "fc1", "fc2"]))
    perturb(model, scale=3.0)
    check_merge_cycle(model, x)
    check_save_load_save(model, vit(), x, tmp_path)


def test_dropout_only_on_the_trainable_path():
    """Train mode: y = W x + b + σ·P L_r diag(z) U_r·dropout(x) − σ·P L_r diag(D_r) U_r·x."""
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    model = lorakit.inject(mlp(), config(target_modules=["fc1"], lora_dropout=0.4))
    perturb(model)
    layer = model.fc1.train()
    v = layer.adapters["default"]
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    xd = torch.nn.functional.dropout(x, 0.4, training=True)
    b = v.lower_factor()
    ref = layer.base_layer(x) + v.scale * (xd @ (v.vector_z[:, None] * v.loldu_U).T - x @ (v.loldu_D[:, None] *
                                                                                        v.loldu_U).T) @ b.T
    assert close(y, ref)
    with torch.no_grad():
        torch.manual_seed(5)
        out = layer(x)  # the in-place inference path in train mode draws the same mask
    assert close(out, ref)
    assert not close(layer.eval()(x), ref)


def test_refusals():
    with pytest.raises(ConfigError, match="option init_method"):
        config(options={"init_method": "kaiming"})
    with pytest.raises(ConfigError, match="r=65.*min"):
        lorakit.inject(mlp(), config(r=65, target_modules=["fc1"]))
    with pytest.raises(UnsupportedFeatureError, match="gaussian"):
        lorakit.inject(mlp(), config(target_modules=["fc1"], init_lora_weights="gaussian"))


def family_teacher(full_rank=False, seed=0, r=16):
    """The planted MLP with ΔW inside LoLDU's family on fc1: P·L_r·diag(δ)·U_r, ‖ΔW‖ = ½‖W‖."""
    teacher = mlp(seed)
    w = teacher.fc1.weight
    perm, lower, d, upper = ldu(w.detach())
    delta = lower[perm, :r] @ torch.diag(torch.randn(r, generator=torch.Generator().manual_seed(99)) * d[:r]) \
        @ upper[:r]
    with torch.no_grad():
        w.add_(delta * (0.5 * w.norm() / delta.norm()))
    return teacher


def test_planted_task(monkeypatch):
    """The shared planted task (a random rank-4 ΔW) is out of reach of r diagonal values in a fixed basis: at
    r = 64 (64 parameters) the MSE drops only ~2-2.5%. A ΔW planted inside the family is fitted (MSE −99.9%)."""
    before, after, n = planted_task(config(r=64, lora_alpha=64, target_modules=["fc1"]), steps=30, lr=1e-2)
    assert n == 64 and after < 0.99 * before, (before, after)
    monkeypatch.setattr(contract, "planted_teacher", family_teacher)
    before, after, n = planted_task(config(r=16, lora_alpha=16, target_modules=["fc1"]), steps=50, lr=1e-2)
    assert n == 16
    assert after <= 1e-2 * before, (before, after)


def test_conv_and_embedding_layers_take_the_ldu_of_their_weight_matrix(tmp_path):
    x = inputs("convnet", batch=5)
    model = lorakit.inject(convnet(), config(r=2, target_modules=["emb", "conv", "conv2d"]))
    assert close(contract.run(model, x), contract.run(convnet(), x))
    contract.perturb(model)
    check_merge_cycle(model, x)
    check_save_load_save(model, convnet(), x, tmp_path)
