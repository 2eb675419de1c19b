"""Uni-LoRA: parameter count, the isometric projection, init, merge, files (with and without indices), mixed batches,
planted task, PEFT parity, the index-stream checksum, invalid options, and conv/embedding layers."""
import json

import pytest
import torch
from peft import UniLoraConfig, get_peft_model
from safetensors.torch import load_file

import lorakit
from lorakit.errors import ConfigError, StateDictError, UnsupportedFeatureError
from lorakit.layers import AdaptedLayer
from lorakit.variants import unilora

from contract import (MLP, check_merge_cycle, check_mixed_batch, check_peft_files_both_ways, check_save_load_save,
                      close, config_meaning, injected, mlp, peft_trained, perturb, planted_task, run)
from models import convnet, gpt2, inputs, vit

X = torch.randn(6, 64, generator=torch.Generator().manual_seed(5))


def uni(r=4, targets=("fc1", "fc2"), **options):
    return lorakit.AdapterConfig(r=r, variant="unilora", target_modules=list(targets),
                                 options={"theta_d_length": 300, **options})


def layers(model, name="default"):
    return [m.adapters[name] for m in model.modules() if isinstance(m, AdaptedLayer)]


def test_only_theta_d_trains():
    model = vit()
    torch.manual_seed(0)
    lorakit.inject(model, uni(targets=["q_proj", "v_proj", "fc1", "fc2"], theta_d_length=1000))
    assert lorakit.count_parameters(model)[0] == 1000
    assert all(not p.requires_grad for v in layers(model) for p in v.parameters())


def test_projection_is_balanced_and_isometric_and_regenerated_from_the_seed():
    """Each θ_d entry feeds ⌊D/d⌋ or ⌈D/d⌉ LoRA entries, Σ scale² over its entries is 1 (PᵀP = I); the same seed
    gives the same indices on a new model, another seed others."""
    model = injected(uni(theta_d_length=300))
    idx = torch.cat([t.flatten() for v in layers(model) for t in (v.unilora_indices_A, v.unilora_indices_B)])
    scales = torch.cat([t.flatten() for v in layers(model) for t in (v.unilora_scales_A, v.unilora_scales_B)])
    d, total = 300, 2 * 4 * (64 + 64)
    assert idx.numel() == total
    counts = torch.bincount(idx, minlength=d)
    assert set(counts.tolist()) == {total // d, total // d + 1}
    assert torch.allclose(torch.zeros(d).index_add_(0, idx, scales ** 2), torch.ones(d))
    same, other = injected(uni(theta_d_length=300)), injected(uni(theta_d_length=300, proj_seed=7))
    assert torch.equal(same.fc2.adapters["default"].unilora_indices_B, model.fc2.adapters["default"].unilora_indices_B)
    assert not torch.equal(other.fc1.adapters["default"].unilora_indices_A,
                           model.fc1.adapters["default"].unilora_indices_A)


def test_init_gives_a_tiny_nonzero_change():
    model = mlp()
    torch.manual_seed(0)
    lorakit.inject(model, uni())
    theta = model.lorakit_shared["default"].unilora_theta_d
    assert theta.requires_grad and 0 < theta.abs().max() <= 0.02
    for v, w in ((model.fc1.adapters["default"], model.fc1.base_layer.weight),
                 (model.fc2.adapters["default"], model.fc2.base_layer.weight)):
        assert 0 < v.delta_weight().abs().max() < 0.01 * w.abs().max()
    wild = mlp()
    lorakit.inject(wild, lorakit.AdapterConfig(r=4, variant="unilora", target_modules=["fc1"], init_lora_weights=False,
                                               options={"theta_d_length": 300}))
    assert wild.lorakit_shared["default"].unilora_theta_d.abs().max() > 1  # N(0, 1): PEFT's init_weights=False


def test_merge_cycle():
    check_merge_cycle(injected(uni()), X)


@pytest.mark.parametrize("save_indices", [False, True])
def test_save_load_save(tmp_path, save_indices):
    check_save_load_save(injected(uni(save_indices=save_indices)), mlp(), X, tmp_path)
    keys = set(load_file(tmp_path / "first" / "adapter_model.safetensors"))
    per_layer = {f"base_model.model.{m}.unilora_{what}_{p}" for m in ("fc1", "fc2") for what in ("indices", "scales")
                 for p in "AB"}
    assert keys == {"base_model.unilora_theta_d"} | (per_layer if save_indices else set())


def test_mixed_batch():
    model = injected(uni(), seed=1)
    torch.manual_seed(2)
    lorakit.inject(model, uni(r=2, theta_d_length=100, proj_seed=3), "b")
    perturb(model, "b", seed=2)
    lorakit.set_active(model, ["default"])
    check_mixed_batch(model, X, names=("default", "b"))


def test_planted_task():
    """d = 384 of D = 512 LoRA entries (d = 256 reached only 0.0055, 53% of the start)."""
    before, after, n = planted_task(uni(targets=["fc1"], theta_d_length=384), steps=200, lr=2e-2)
    assert n == 384
    assert after <= 0.5 * before, (before, after)  # measured 0.0104 → 0.0028


# ---- PEFT -----------------------------------------------------------------------------------------------
CASES = {"mlp": (mlp, X, ["fc2", "fc1"]), "gpt2": (gpt2, inputs("gpt2"), ["c_attn", "c_proj", "c_fc"])}


@pytest.mark.parametrize("case,save_indices", [("mlp", False), ("mlp", True), ("gpt2", False)])
def test_peft_files_load_with_equal_outputs_both_ways(tmp_path, case, save_indices):
    build, x, targets = CASES[case]
    peft_model = peft_trained(build(), UniLoraConfig(r=4, theta_d_length=200, proj_seed=5, target_modules=targets,
                                                     save_indices=save_indices, unilora_dropout=0.1))
    checksum = check_peft_files_both_ways(peft_model, build, x, tmp_path, extra_key=unilora.CHECKSUM_KEY)
    assert (checksum is None) == save_indices  # (and PEFT warned about the key)


def test_on_a_bf16_base_the_scales_are_rounded_as_peft_s(tmp_path):
    """PEFT keeps 1/√n in the base dtype: on a bf16 base 1/√10 is 0.3164, not 0.3162."""
    peft_model = peft_trained(mlp().bfloat16(), UniLoraConfig(r=4, theta_d_length=100, target_modules=["fc1", "fc2"]))
    peft_model.save_pretrained(tmp_path)
    ours = lorakit.load_adapter(mlp().bfloat16(), tmp_path)
    for name in ("fc1", "fc2"):
        mine, theirs = ours.get_submodule(name).adapters["default"], peft_model.base_model.model.get_submodule(name)
        for part in "AB":
            ref = getattr(theirs, f"unilora_scales_{part}")["default"].float()
            assert torch.equal(getattr(mine, f"unilora_scales_{part}"), ref)
        assert torch.equal(mine.delta_weight(), theirs.get_delta_weight("default").float())


def test_a_config_written_by_lorakit_equals_peft_s(tmp_path):
    model = injected(lorakit.AdapterConfig(r=2, variant="unilora", target_modules=["fc1"], lora_dropout=0.05,
                                           options={"theta_d_length": 64, "proj_seed": 9, "init_theta_d_bound": 0.01}))
    lorakit.save_adapter(model, tmp_path / "ours")
    peft_config = UniLoraConfig(r=2, target_modules=["fc1"], theta_d_length=64, proj_seed=9, init_theta_d_bound=0.01,
                                unilora_dropout=0.05)
    get_peft_model(mlp(), peft_config).save_pretrained(tmp_path / "peft")
    mine = config_meaning(tmp_path / "ours")
    assert mine.pop(unilora.CHECKSUM_KEY).startswith("numpy.PCG64:sha256:")
    assert mine == config_meaning(tmp_path / "peft")


# ---- the index stream -----------------------------------------------------------------------------------
def test_a_changed_index_stream_fails_loudly_unless_the_indices_were_saved(tmp_path, monkeypatch):
    lorakit.save_adapter(injected(uni()), tmp_path / "seed_only")
    with_indices = injected(uni(save_indices=True))
    lorakit.save_adapter(with_indices, tmp_path / "indices")
    real = unilora.assign_indices  # numpy as if a release had changed the stream behind default_rng:
    monkeypatch.setattr(unilora, "assign_indices", lambda n, d, seed: real(n, d, seed + 1))
    assert not torch.equal(injected(uni(save_indices=True)).fc1.adapters["default"].unilora_indices_A,
                           with_indices.fc1.adapters["default"].unilora_indices_A)
    fresh = mlp()
    with pytest.raises(StateDictError, match="proj_seed=42 do not match the recorded index_checksum"):
        lorakit.load_adapter(fresh, tmp_path / "seed_only")
    assert lorakit.adapter_names(fresh) == []
    loaded = lorakit.load_adapter(fresh, tmp_path / "indices")  # the file's indices win over the new stream
    assert close(run(loaded, X), run(with_indices, X), tol=1e-6)


def test_a_seed_only_file_for_other_layer_sizes_is_refused(tmp_path):
    """θ_d fits any model; the recorded checksum is what tells the layers apart."""
    lorakit.save_adapter(injected(uni()), tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())[unilora.CHECKSUM_KEY].startswith(
        "numpy.PCG64:sha256:")
    with pytest.raises(StateDictError, match="index_checksum"):
        lorakit.load_adapter(MLP(dim=32), tmp_path)


def test_a_malformed_checksum_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="index_checksum"):
        uni(index_checksum="abc")


# ---- errors ---------------------------------------------------------------------------------------------
def test_theta_d_longer_than_the_lora_entries_is_refused():
    model = mlp()
    with pytest.raises(ConfigError, match=r"theta_d_length=513.*D = .* = 512"):
        lorakit.inject(model, uni(targets=["fc1"], theta_d_length=513))
    assert lorakit.adapter_names(model) == []
    lorakit.inject(model, uni(targets=["fc1"], theta_d_length=512))


@pytest.mark.parametrize("options,name", [({"theta_d_length": 0}, "theta_d_length"), ({"proj_seed": -1}, "proj_seed"),
                                          ({"proj_seed": 1.5}, "proj_seed"),
                                          ({"init_theta_d_bound": 0}, "init_theta_d_bound"),
                                          ({"save_indices": "no"}, "save_indices"), ({"theta_d": 8}, "theta_d")])
def test_invalid_options_name_the_option(options, name):
    with pytest.raises(ConfigError, match=name):
        uni(**options)


@pytest.mark.parametrize("extra,name", [({"rank_pattern": {"fc1": 2}}, "rank_pattern"),
                                        ({"exclude_modules": ["fc2"]}, "exclude_modules"),
                                        ({"use_rslora": True}, "use_rslora"),
                                        ({"init_lora_weights": "gaussian"}, "gaussian")])
def test_what_the_peft_format_cannot_hold_is_refused(extra, name):
    with pytest.raises(UnsupportedFeatureError if name != "gaussian" else ConfigError, match=name):
        lorakit.inject(mlp(), lorakit.AdapterConfig(r=4, variant="unilora", target_modules=["fc1", "fc2"],
                                                    options={"theta_d_length": 64}, **extra))


def test_a_minimal_peft_config_takes_peft_defaults():
    config = lorakit.AdapterConfig.from_dict({"peft_type": "UNILORA", "target_modules": ["fc1"], "init_weights": False})
    assert (config.r, config.variant, config.init_lora_weights) == (4, "unilora", False)
    assert config.options["theta_d_length"] == 256 and config.options["proj_seed"] == 42


# ---- convolutions, embeddings, vision -------------------------------------------------------------------
def test_conv_and_embedding_layers(tmp_path):
    """Embedding, Conv1d, Conv2d and Linear of one model share θ_d (PEFT's Uni-LoRA has only Linear/Conv1D)."""
    config = uni(r=2, targets=["emb", "conv", "conv2d", "head"], theta_d_length=200)
    ids = inputs("convnet")["input_ids"]
    model = injected(config, model=convnet())
    assert lorakit.count_parameters(model)[0] == 200
    total = sum(v.unilora_indices_A.numel() + v.unilora_indices_B.numel() for v in layers(model))
    assert total == 2 * (50 + 16) + 2 * (48 + 24) + 2 * (9 + 4) + 2 * (96 + 5)
    check_merge_cycle(model, ids)
    check_save_load_save(injected(config, model=convnet()), convnet(), ids, tmp_path)
