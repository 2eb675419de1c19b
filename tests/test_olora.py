"""OLoRA (variant "olora"): init equal to PEFT's `olora_init` (A, B and residual), the base layer untouched, the
exported rank-2r LoRA loads in PEFT on the original base, and the contract."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from contract import (adapted_layers, check_export_loads_in_peft, check_merge_cycle, check_mixed_batch,
                      check_save_load_save, close, copy_lora_into_peft, mlp, perturb, planted_task,
                      residual_init_error, run)
from models import convnet, gpt2, inputs, llama
from peft import LoraConfig, get_peft_model

import lorakit
from lorakit.errors import ConfigError

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def config(**kw):
    return lorakit.AdapterConfig(**{"r": 4, "lora_alpha": 12, "variant": "olora", **kw})


@pytest.mark.filterwarnings("ignore:Using Rank-Stabilized LoRA")
@pytest.mark.parametrize("extra", [{}, {"use_rslora": True, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"o_proj": 5}}])
def test_init_equals_peft(extra):
    base = llama()
    w_before = {n: p.clone() for n, p in base.named_parameters()}
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=12, target_modules=LLAMA_TARGETS,
                                                         init_lora_weights="olora", **extra))
    ours = lorakit.inject(base, config(target_modules=LLAMA_TARGETS, **extra))
    assert residual_init_error(ours, ref) <= 1e-5  # llama: no transposed layers (PEFT's OLoRA skips the transpose)
    for n, p in lorakit.unload(ours).named_parameters():  # the base layer was never modified
        assert torch.equal(p, w_before[n]), n


def test_qr_structure_and_conv1d_layers():
    """B₀ has orthonormal columns, A₀ is upper triangular, B₀A₀ is the leading QR part of the (out, in) matrix — also
    for transformers Conv1D (stored (in, out); PEFT's olora_init skips the transpose there), so the output is kept."""
    model, x = gpt2(), inputs("gpt2")
    base_out = run(model, x)
    lorakit.inject(model, config(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True))
    assert close(run(model, x), base_out)
    for layer in adapted_layers(model).values():
        v, w = layer.adapters["default"], layer.base_layer.weight.T  # (out, in)
        assert close(v.lora_B0.T @ v.lora_B0, torch.eye(4))
        assert torch.equal(v.lora_A0, v.lora_A0.triu())
        q, r = torch.linalg.qr(w)
        assert close(v.lora_B0 @ v.lora_A0, q[:, :4] @ r[:4])


def test_peft_spelling_of_the_init_selects_the_variant():
    c = lorakit.AdapterConfig(r=4, target_modules=["fc1"], init_lora_weights="olora")
    assert (c.variant, c.options, c.init_lora_weights) == ("olora", {}, True)
    with pytest.raises(ConfigError, match="takes no options"):
        config(options={"niter": 2})


def test_trainable_count_and_init_keeps_output():
    model, x = llama(), inputs("llama")
    base_out = run(model, x)
    lorakit.inject(model, config(target_modules=LLAMA_TARGETS, rank_pattern={"down_proj": 3}))
    expected = 0
    for path, layer in adapted_layers(model).items():
        out_f, in_f = layer.base_layer.weight.shape
        expected += (3 if path.endswith("down_proj") else 4) * (in_f + out_f)  # r·(m + n) per layer
    assert lorakit.count_parameters(model)[0] == expected
    assert close(run(model, x), base_out)
    for layer in adapted_layers(model).values():  # ΔW = s(BA − B₀A₀) = 0 at init (up to the rounding of one matmul)
        assert layer.adapters["default"].delta_weight().abs().max() <= 1e-6 * layer.base_layer.weight.abs().max()


def test_trained_adapter_equals_peft_and_export_loads_in_peft(tmp_path):
    """The same trained A, B give the same outputs as PEFT's OLoRA model (on its residual base), and the exported
    rank-2r plain LoRA, loaded by PEFT on the ORIGINAL base, gives them too."""
    ours, x = lorakit.inject(llama(), config(target_modules=LLAMA_TARGETS)), inputs("llama")
    perturb(ours)
    expected = run(ours, x)
    ref = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=12, target_modules=LLAMA_TARGETS,
                                             init_lora_weights="olora"))
    copy_lora_into_peft(ours, ref)
    assert close(run(ref.eval(), x), expected)
    check_export_loads_in_peft(ours, llama(), x, tmp_path / "export", r=8)


def test_merge_cycle_save_load_and_mixed_batch(tmp_path):
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    model = lorakit.inject(mlp(), config(target_modules=["fc1", "fc2"]))
    perturb(model)
    check_merge_cycle(model, x)
    check_save_load_save(model, mlp(), x, tmp_path)
    assert json.loads((tmp_path / "first" / "adapter_config.json").read_text())["peft_type"] == "LORAKIT_OLORA"
    both = lorakit.inject(mlp(), config(target_modules=["fc1", "fc2"]), "a")
    lorakit.inject(both, config(r=2, lora_alpha=3, target_modules=["fc2"]), "b")
    perturb(both, "a", seed=1)
    perturb(both, "b", seed=2)
    check_mixed_batch(both, x)


def test_conv_and_embedding_layers_take_the_qr_of_their_weight_matrix(tmp_path):
    x = inputs("convnet", batch=5)
    model = lorakit.inject(convnet(), config(r=2, target_modules=["emb", "conv", "conv2d"]))
    assert close(run(model, x), run(convnet(), x))
    perturb(model)
    check_merge_cycle(model, x)
    check_save_load_save(model, convnet(), x, tmp_path)


def test_refusals():
    with pytest.raises(ConfigError, match="r=33.*min"):  # llama k_proj is 64 → 32
        lorakit.inject(llama(), config(r=33, target_modules=["k_proj"]))


def test_planted_task():
    before, after, n = planted_task(config(r=4, lora_alpha=4, target_modules=["fc1"]), steps=100, lr=1e-2)
    assert n == 4 * (64 + 64)
    assert after <= 0.5 * before, (before, after)
