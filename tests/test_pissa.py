"""PiSSA (variant "pissa"): init equal to PEFT's `pissa_init` (A, B and residual), the base layer untouched, the
exported rank-2r LoRA loads in PEFT on the original base, dropout as PEFT (trainable path only), and the contract."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from contract import (adapted_layers, check_export_loads_in_peft, check_merge_cycle, check_mixed_batch,
                      check_save_load_save, close, copy_lora_into_peft, mlp, perturb, planted_task,
                      residual_init_error, run)
from models import convnet, gpt2, inputs, llama, vit
from peft import LoraConfig, get_peft_model

import lorakit
from lorakit.errors import ConfigError, UnsupportedFeatureError

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def config(**kw):
    return lorakit.AdapterConfig(**{"r": 4, "lora_alpha": 12, "variant": "pissa", **kw})


@pytest.mark.filterwarnings("ignore:Using Rank-Stabilized LoRA")
@pytest.mark.parametrize("build,targets,extra", [
    (llama, LLAMA_TARGETS, {}),
    (llama, LLAMA_TARGETS, {"use_rslora": True, "rank_pattern": {"v_proj": 2}}),
    (gpt2, ["c_attn", "c_proj", "c_fc"], {"fan_in_fan_out": True}),  # transformers Conv1D: W stored (in, out)
])
def test_init_equals_peft(build, targets, extra):
    base = build()
    w_before = {n: p.clone() for n, p in base.named_parameters()}
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=12, target_modules=targets,
                                                         init_lora_weights="pissa", **extra))
    ours = lorakit.inject(base, config(target_modules=targets, **extra))
    assert residual_init_error(ours, ref) <= 1e-5
    for n, p in lorakit.unload(ours).named_parameters():  # the base layer was never modified
        assert torch.equal(p, w_before[n]), n


def test_bf16_base_keeps_output_exactly_and_rounds_to_peft():
    """PEFT rounds A, B to a bf16 base's dtype (its output moves at init); ours stay fp32 and keep the output."""
    base, x = llama().to(torch.bfloat16), inputs("llama")
    targets = ["q_proj", "down_proj"]
    expected = run(base, x)
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=12, target_modules=targets,
                                                         init_lora_weights="pissa"))
    ours = lorakit.inject(base, config(target_modules=targets))
    assert torch.equal(run(ours, x), expected)
    peft_layers = dict(ref.named_modules())
    for path, layer in adapted_layers(ours).items():
        v, p = layer.adapters["default"], peft_layers["base_model.model." + path]
        assert v.lora_A.dtype == torch.float32
        assert torch.equal(v.lora_A.bfloat16().float(), p.lora_A["default"].weight.float())
        assert torch.equal(v.lora_B.bfloat16().float(), p.lora_B["default"].weight.float())


def test_randomized_init_equals_peft_given_the_same_random_state(monkeypatch):
    """`niter=k` is PEFT's "pissa_niter_k": torch.svd_lowrank(W, q=r, niter=k) on the global RNG. PEFT draws other
    numbers (its kaiming init of lora_A) before each call, so the test hands our call the RNG state PEFT's had."""
    import peft.tuners.lora.layer as peft_layer
    real, states = torch.svd_lowrank, []

    def recording(*args, **kwargs):
        states.append(torch.get_rng_state())
        return real(*args, **kwargs)

    def replaying(*args, **kwargs):
        torch.set_rng_state(states.pop(0))
        return real(*args, **kwargs)

    base = llama()
    monkeypatch.setattr(peft_layer, "svd_lowrank", recording)
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=12, target_modules=LLAMA_TARGETS,
                                                         init_lora_weights="pissa_niter_2"))
    assert len(states) == 14
    monkeypatch.setattr(torch, "svd_lowrank", replaying)
    ours = lorakit.inject(base, config(target_modules=LLAMA_TARGETS, options={"niter": 2}))
    assert not states
    assert residual_init_error(ours, ref) <= 1e-5
    # the randomized factors are not the exact SVD's: the option is really used
    exact = lorakit.inject(llama(), config(target_modules=LLAMA_TARGETS))
    a = next(iter(adapted_layers(ours).values())).adapters["default"].lora_A
    b = next(iter(adapted_layers(exact).values())).adapters["default"].lora_A
    assert not torch.equal(a, b)


def test_peft_spelling_of_the_init_selects_the_variant():
    c = lorakit.AdapterConfig(r=4, target_modules=["fc1"], init_lora_weights="pissa_niter_4")
    assert (c.variant, c.options, c.init_lora_weights) == ("pissa", {"niter": 4}, True)
    c = lorakit.AdapterConfig(r=4, target_modules=["fc1"], init_lora_weights="pissa")
    assert (c.variant, c.options, c.init_lora_weights) == ("pissa", {"niter": None}, True)
    assert lorakit.AdapterConfig.from_dict(c.to_peft_dict()).to_dict() == {**c.to_dict(), "inference_mode": True}
    with pytest.raises(UnsupportedFeatureError, match="init_lora_weights"):  # DoRA + PiSSA is not implemented
        lorakit.AdapterConfig(r=4, use_dora=True, init_lora_weights="pissa")
    # a PEFT LoRA file of a PiSSA run holds A, B relative to a residual base it does not carry: refused by name
    peft_file = {**lorakit.AdapterConfig(r=4, target_modules=["fc1"]).to_peft_dict(), "init_lora_weights": "pissa"}
    with pytest.raises(UnsupportedFeatureError, match="path_initial_model_for_weight_conversion"):
        lorakit.AdapterConfig.from_dict(peft_file)


def test_trainable_count_and_init_keeps_output():
    model, x = llama(), inputs("llama")
    base_out = run(model, x)
    lorakit.inject(model, config(target_modules=LLAMA_TARGETS, rank_pattern={"v_proj": 2}))
    expected = 0
    for path, layer in adapted_layers(model).items():
        out_f, in_f = layer.base_layer.weight.shape
        expected += (2 if path.endswith("v_proj") else 4) * (in_f + out_f)  # r·(m + n) per layer
    assert lorakit.count_parameters(model)[0] == expected
    assert close(run(model, x), base_out)
    for layer in adapted_layers(model).values():  # ΔW = s(BA − B₀A₀) = 0 at init (up to the rounding of one matmul)
        v = layer.adapters["default"]
        assert torch.equal(v.lora_A, v.lora_A0) and torch.equal(v.lora_B, v.lora_B0)
        assert v.delta_weight().abs().max() <= 1e-6 * layer.base_layer.weight.abs().max()


def test_principal_part_is_the_top_singular_triplets():
    """s·B₀A₀ = U_r S_r V_rᵀ whatever α, and the residual carries the remaining singular values."""
    model = mlp()
    w = model.fc1.weight.detach().clone()
    lorakit.inject(model, config(r=5, lora_alpha=3, target_modules=["fc1"]))
    v = model.fc1.adapters["default"]
    u, s, vh = torch.linalg.svd(w)
    assert close(v.scale * v.lora_B0 @ v.lora_A0, u[:, :5] @ torch.diag(s[:5]) @ vh[:5])
    assert close(torch.linalg.svdvals(w - v.scale * v.lora_B0 @ v.lora_A0)[:59], s[5:])


def trained_llama(r=4):
    model = lorakit.inject(llama(), config(r=r, target_modules=LLAMA_TARGETS))
    perturb(model)
    return model


def test_trained_adapter_equals_peft_and_export_loads_in_peft(tmp_path):
    """The same trained A, B give the same outputs as PEFT's PiSSA model (which runs on its residual base), and the
    exported rank-2r plain LoRA, loaded by PEFT on the ORIGINAL base, gives them too."""
    ours, x = trained_llama(), inputs("llama")
    expected = run(ours, x)
    ref = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=12, target_modules=LLAMA_TARGETS,
                                             init_lora_weights="pissa"))
    copy_lora_into_peft(ours, ref)
    assert close(run(ref.eval(), x), expected)
    check_export_loads_in_peft(ours, llama(), x, tmp_path / "export", r=8)


def test_dropout_only_on_the_trainable_path_as_peft():
    """Train mode with dropout: PEFT computes W_res·x + s·B·A·dropout(x); ours W·x + s·B·A·dropout(x) − s·B₀A₀·x.
    Same masks (same seed, same order of draws) → same outputs and gradients."""
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    ours = lorakit.inject(mlp(), config(target_modules=["fc1", "fc2"], lora_dropout=0.3))
    perturb(ours)
    ref = get_peft_model(mlp(), LoraConfig(r=4, lora_alpha=12, target_modules=["fc1", "fc2"], lora_dropout=0.3,
                                           init_lora_weights="pissa"))
    pairs = copy_lora_into_peft(ours, ref)
    assert len(pairs) == 4  # fc1 and fc2
    ours.train()
    ref.train()
    torch.manual_seed(11)
    y = ours(x)
    torch.manual_seed(11)
    y_ref = ref(x)
    assert close(y, y_ref)
    torch.manual_seed(12)
    assert not close(ours(x), y)  # dropout really draws masks
    ours.eval()
    assert not close(run(ours, x), y)
    for model, out in ((ours, y), (ref, y_ref)):
        out.pow(2).sum().backward()
    for a, b in pairs:
        assert close(a.grad, b.grad, tol=1e-4)


def test_merge_cycle_save_load_and_mixed_batch(tmp_path):
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    model = lorakit.inject(mlp(), config(target_modules=["fc1", "fc2"]))
    perturb(model)
    check_merge_cycle(model, x)
    loaded = check_save_load_save(model, mlp(), x, tmp_path)
    assert json.loads((tmp_path / "first" / "adapter_config.json").read_text())["peft_type"] == "LORAKIT_PISSA"
    both = lorakit.inject(mlp(), config(target_modules=["fc1", "fc2"], lora_dropout=0.1), "a")
    lorakit.inject(both, config(r=2, target_modules=["fc1"], options={"niter": 1}), "b")
    perturb(both, "a", seed=1)
    perturb(both, "b", seed=2)
    check_mixed_batch(both.eval(), x)  # (inject leaves new modules in train mode: dropout would run)
    assert loaded.fc1.adapters["default"].lora_A0.requires_grad is False


def test_vision_vit_and_convnet(tmp_path):
    """ViT: every Linear and the patch Conv2d adapted; ConvNet: Embedding, Conv1d, Conv2d (the flattened kernel
    matrix is decomposed; PEFT's pissa_init takes Linear layers only) and the head. Output unchanged at init,
    then merge cycle + save/load + mixed batch."""
    model, x = vit(), inputs("vit")
    lorakit.inject(model, config(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", "projection"]))
    assert close(run(model, x), run(vit(), x))
    perturb(model)
    check_merge_cycle(model, x)
    check_save_load_save(model, vit(), x, tmp_path / "vit")
    x = inputs("convnet", batch=5)
    targets = ["emb", "conv", "conv2d", "head"]
    model = lorakit.inject(convnet(), config(r=2, target_modules=targets))
    assert close(run(model, x), run(convnet(), x))
    perturb(model)
    check_merge_cycle(model, x)
    check_save_load_save(model, convnet(), x, tmp_path / "convnet")
    both = lorakit.inject(convnet(), config(r=2, target_modules=targets), "a")
    lorakit.inject(both, config(r=3, target_modules=targets), "b")
    perturb(both, "a", seed=1)
    perturb(both, "b", seed=2)
    check_mixed_batch(both, x)


def test_invalid_options_and_ranks():
    with pytest.raises(ConfigError, match="option niter"):
        config(options={"niter": -1})
    with pytest.raises(ConfigError, match="option niter"):
        config(options={"niter": "4"})
    with pytest.raises(ConfigError, match="unknown option"):
        config(options={"n_iter": 4})
    with pytest.raises(ConfigError, match="r=65.*min"):
        lorakit.inject(mlp(), config(r=65, target_modules=["fc1"]))
    with pytest.raises(UnsupportedFeatureError, match="gaussian"):
        lorakit.inject(mlp(), config(target_modules=["fc1"], init_lora_weights="gaussian"))
    model = mlp()
    lorakit.inject(model, config(target_modules=["fc1"], init_lora_weights=False))  # random A, B: non-identity
    assert model.fc1.adapters["default"].delta_weight().abs().max() > 0.1


def test_planted_task():
    """The trainable pair replaces the top-r principal part, so fitting the planted rank-4 change exactly needs rank
    r + 4: PiSSA plateaus (r = 4: ~55% of the base MSE; r = 8: ~36%, reached within 100 steps)."""
    before, after, n = planted_task(config(r=8, lora_alpha=8, target_modules=["fc1"]), steps=100, lr=1e-2)
    assert n == 8 * (64 + 64)
    assert after <= 0.5 * before, (before, after)
