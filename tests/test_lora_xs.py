"""LoRA-XS: frozen B = U_r, A = Σ_r V_rᵀ from the SVD of W, trainable r×r R; also the family's vision test
(ViT Linear layers, and the conv net's Conv1d/Conv2d/Embedding/Linear).

Adapters under test are built with `init_lora_weights=False` (R ~ N(0, 1/r)) before `perturb`: the default R
(std 1e-5) perturbed by 30% of its own RMS would leave the outputs equal within tolerance."""
import json

import pytest
import torch
from peft import PeftModel

import lorakit
from lorakit.errors import ConfigError
from lorakit.layers import AdaptedLayer

from contract import (check_merge_cycle, check_mixed_batch, check_save_load_save, close, mlp, perturb,
                      planted_task, run)
from models import convnet, inputs, vit

X = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))


def xs(r=8, **kw):
    return lorakit.AdapterConfig(r=r, lora_alpha=kw.pop("lora_alpha", 16), variant="lora_xs",
                                 target_modules=kw.pop("target_modules", ["fc1", "fc2"]), **kw)


def xs_mlp(names=("default",), **kw):
    model = mlp()
    for i, n in enumerate(names):
        torch.manual_seed(i)
        lorakit.inject(model, xs(options={"retain": "bottom"} if i % 2 else {}, init_lora_weights=False, **kw), n)
        perturb(model, n, seed=i)
    return model


def layers(model):
    return {p: m for p, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def test_trainable_count_is_r_squared_per_layer():
    for r in (2, 5):
        model = mlp()
        lorakit.inject(model, xs(r=r))
        assert lorakit.count_parameters(model)[0] == 2 * r * r  # fc1, fc2: r² each, independent of width
    model = vit()
    lorakit.inject(model, xs(r=3, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]))
    assert lorakit.count_parameters(model)[0] == 12 * 3 * 3  # 2 ViT layers × 6 Linear


def test_init_is_the_truncated_svd_of_w_with_a_tiny_core():
    r = 8
    model = mlp()
    w = model.fc1.weight.detach().clone()
    torch.manual_seed(0)
    lorakit.inject(model, xs(r=r))
    v = layers(model)["fc1"].adapters["default"]
    b, a = v.lora_B, v.lora_A
    assert close(b.T @ b, torch.eye(r))                                   # B = U_r: orthonormal columns
    sv = torch.linalg.svdvals(w)
    assert close(a.norm(dim=1), sv[:r])                                   # A = Σ_r V_rᵀ: rows of norm σ_i
    err = (w - b @ a).norm() ** 2                                         # Eckart–Young: BA = best rank-r W
    assert abs(err - sv[r:].pow(2).sum()) <= 1e-4 * sv.pow(2).sum()
    assert not v.lora_A.requires_grad and not v.lora_B.requires_grad and v.lora_R.requires_grad
    assert 0.5e-5 < v.lora_R.std().item() < 1.5e-5                       # R ~ N(0, 1e-10): ΔW tiny, non-zero
    with lorakit.disabled(model):
        base = run(model, X)
    out = run(model, X)
    assert 0 < (out - base).abs().max().item() < 1e-4
    bottom = mlp()
    lorakit.inject(bottom, xs(r=r, options={"retain": "bottom", "sigma": 0.0}))
    vb = layers(bottom)["fc1"].adapters["default"]
    assert close(vb.lora_A.norm(dim=1), sv[-r:])                          # the r smallest triplets
    assert torch.count_nonzero(vb.lora_R) == 0                            # sigma = 0: ΔW = 0 exactly
    assert torch.equal(run(bottom, X), base)


def test_merge_cycle_and_save_load_save(tmp_path):
    model = xs_mlp()
    check_merge_cycle(model, X)
    check_save_load_save(xs_mlp(), mlp(), X, tmp_path)
    config = json.loads((tmp_path / "first" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORAKIT_LORA_XS" and config["options"] == {"sigma": 1e-5, "retain": "top"}


def test_loading_keeps_the_saved_factors_on_a_different_base(tmp_path):
    """Frozen factors come from the file, not from the SVD of the base they are loaded on."""
    model = xs_mlp()
    lorakit.save_adapter(model, tmp_path)
    other = mlp(seed=5)
    lorakit.load_adapter(other, tmp_path)
    for (p, a), (_, b) in zip(layers(model).items(), layers(other).items()):
        assert torch.equal(a.adapters["default"].lora_A, b.adapters["default"].lora_A), p
        assert torch.equal(a.adapters["default"].delta_weight(), b.adapters["default"].delta_weight()), p


def test_mixed_batch():
    check_mixed_batch(xs_mlp(("a", "b")), X)


def test_export_as_plain_lora_loads_in_peft(tmp_path):
    model = xs_mlp()
    lorakit.export_lora(model, tmp_path)
    peft_model = PeftModel.from_pretrained(mlp(), str(tmp_path))
    with torch.no_grad():
        assert close(peft_model(X), run(model, X))


def test_planted_task():
    before, after, n = planted_task(xs(r=48, lora_alpha=48, target_modules=["fc1"]), lr=1e-2)
    assert n == 48 * 48
    assert after <= 0.5 * before, (before, after)


def test_invalid_options_and_ranks():
    with pytest.raises(ConfigError, match="sigma"):
        xs(options={"sigma": -1.0})
    with pytest.raises(ConfigError, match="retain"):
        xs(options={"retain": "middle"})
    with pytest.raises(ConfigError, match="sigmaa"):
        xs(options={"sigmaa": 1.0})
    model = mlp()
    with pytest.raises(ConfigError, match=r"r=65 exceeds min\(out, in\)=64"):
        lorakit.inject(model, xs(r=65))
    assert not layers(model)  # refused before the model changed


def test_vision_vit_linear(tmp_path):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]  # the patch Conv2d: see the convnet test
    batch = inputs("vit")

    def build():
        model = vit()
        lorakit.inject(model, xs(r=4, target_modules=targets, init_lora_weights=False))
        perturb(model)
        return model
    model = build()
    assert sum(isinstance(m, AdaptedLayer) for m in model.modules()) == 12
    check_merge_cycle(model, batch)
    check_save_load_save(build(), vit(), batch, tmp_path)


def test_vision_convnet_flattened_kernel_svd(tmp_path):
    """Conv1d/Conv2d: B·A is the best rank-r approximation of the flattened kernel (out × in·k…); Embedding too."""
    ids = inputs("convnet", batch=3, seq=9)

    def build(names=("default",)):
        model = convnet()
        for i, n in enumerate(names):
            lorakit.inject(model, xs(r=4, target_modules=["emb", "conv", "conv2d", "head"], init_lora_weights=False), n)
            perturb(model, n, seed=i)
        return model
    model = build()
    for path, layer in layers(model).items():
        v = layer.adapters["default"]
        w = layer.kind.weight().detach()
        _, b, _ = v.factors()
        a = layer.kind.matrix(v.lora_A)
        sv = torch.linalg.svdvals(w)
        assert abs((w - b @ a).norm() ** 2 - sv[4:].pow(2).sum()) <= 1e-4 * sv.pow(2).sum(), path
    assert tuple(layers(model)["conv2d"].adapters["default"].lora_A.shape) == (4, 1, 3, 3)
    check_merge_cycle(model, ids)
    check_save_load_save(build(), convnet(), ids, tmp_path)
    check_mixed_batch(build(("a", "b")), ids)


def test_batched_serving_sees_in_place_updates_of_the_core():
    """Routed inference stacks factors() = (R·A, B, s) of same-rank adapters and caches the stack; R·A is a fresh
    tensor each call (version 0, possibly at a recycled address), so the cache must follow R itself."""
    model = mlp()
    for n in ("a", "b"):
        lorakit.inject(model, xs(r=4, target_modules=["fc1"], init_lora_weights=False), n)
    plan = ["a", "a", "b", "b"]
    for _ in range(30):
        with lorakit.route(model, plan):
            routed = run(model, X[:4])
        single = []
        for i, n in enumerate(plan):
            lorakit.set_active(model, [n])
            single.append(run(model, X[i:i + 1]))
        assert close(routed, torch.cat(single))
        with torch.no_grad():
            for n in ("a", "b"):
                model.fc1.adapters[n].lora_R.add_(0.05)
