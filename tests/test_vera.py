"""VeRA: shared seeded bases, trainable λ_d/λ_b, PEFT's VERA format both ways, the basis checksum, ViT."""
import json
import warnings

import pytest
import torch
from peft import PeftModel, VeraConfig, get_peft_model
from safetensors.torch import load_file

import lorakit
from lorakit.errors import ConfigError, StateDictError, TargetError, UnsupportedFeatureError
from lorakit.variants import _seeded, vera

from contract import (MLP, check_export_loads_in_peft, check_merge_cycle, check_mixed_batch, check_save_load_save,
                      close, config_meaning, injected, mlp, perturb, perturb_peft, planted_task, run)
from models import convnet, gpt2, inputs, vit

X = torch.randn(6, 64, generator=torch.Generator().manual_seed(5))
VIT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]


def config(r=8, targets=("fc1", "fc2"), **options):
    return lorakit.AdapterConfig(r=r, variant="vera", target_modules=list(targets), options=options)


def adapted(cfg=None, name="default", seed=0, base=mlp):
    return injected(cfg or config(), name, seed, base(), seed_torch=False)


def peft_perturbed(model, seed=0):
    return perturb_peft(model, seed, relative=False)  # N(0, 0.3²) on λ_b (0 at init) and λ_d alike


def test_trainable_count_is_r_plus_out_features_per_layer():
    model = vit()
    lorakit.inject(model, lorakit.AdapterConfig(r=16, variant="vera", target_modules=VIT_TARGETS))
    # per layer r + out: q, k, v, o (32 out), fc1 (64 out), fc2 (32 out); 2 blocks
    assert lorakit.count_parameters(model)[0] == 2 * (4 * (16 + 32) + (16 + 64) + (16 + 32))
    shared = model.lorakit_shared["default"]
    assert tuple(shared.vera_A.shape) == (16, 64) and tuple(shared.vera_B.shape) == (64, 16)  # largest in / out


def test_init_is_identity_and_equals_peft_bit_for_bit():
    model = mlp()
    lorakit.inject(model, config(d_initial=0.25, projection_prng_key=7))
    with lorakit.disabled(model):
        base = run(model, X)
    assert torch.equal(run(model, X), base)
    ref = get_peft_model(mlp(), VeraConfig(r=8, target_modules=["fc1", "fc2"], d_initial=0.25, projection_prng_key=7))
    shared = model.lorakit_shared["default"]
    assert torch.equal(shared.vera_A, ref.base_model.vera_A["default"])
    assert torch.equal(shared.vera_B, ref.base_model.vera_B["default"])
    for name in ("fc1", "fc2"):
        ours, theirs = getattr(model, name).adapters["default"], getattr(ref.base_model.model, name)
        assert torch.equal(ours.vera_lambda_b, theirs.vera_lambda_b["default"])
        assert torch.equal(ours.vera_lambda_d, theirs.vera_lambda_d["default"])
    assert (ours.vera_lambda_d == 0.25).all() and (ours.vera_lambda_b == 0).all()


def test_factors_are_the_scaled_shared_bases():
    model = adapted(config(targets=["fc1"]))
    v, sh = model.fc1.adapters["default"], model.lorakit_shared["default"]
    a, b, s = v.factors()
    dense = torch.diag(v.vera_lambda_b) @ sh.vera_B @ torch.diag(v.vera_lambda_d) @ sh.vera_A
    assert s == 1.0 and close(b @ a, dense, tol=1e-6)


def test_merge_cycle_save_load_and_mixed_batch(tmp_path):
    check_merge_cycle(adapted(), X)
    for save in (True, False):
        model = adapted(config(save_projection=save))
        loaded = check_save_load_save(model, mlp(), X, tmp_path / str(save))
        keys = set(load_file(tmp_path / str(save) / "first" / "adapter_model.safetensors"))
        assert ("base_model.vera_A" in keys) == save and ("base_model.vera_B" in keys) == save
        assert torch.equal(loaded.lorakit_shared["default"].vera_A, model.lorakit_shared["default"].vera_A)
    model = adapted(config(projection_prng_key=1), "a")
    lorakit.inject(model, config(r=6, projection_prng_key=2, d_initial=0.5), "b")
    perturb(model, "b", seed=1)
    check_mixed_batch(model, X)


def test_vit_merge_cycle_and_save_load(tmp_path):
    cfg = lorakit.AdapterConfig(r=8, variant="vera", target_modules=VIT_TARGETS, lora_dropout=0.1)
    model = adapted(cfg, base=vit)
    pixels = inputs("vit", batch=3)
    check_merge_cycle(model, pixels)
    check_save_load_save(model, vit(), pixels, tmp_path)


def test_planted_task(one_thread):
    before, after, n = planted_task(lorakit.AdapterConfig(r=2048, variant="vera", target_modules=["fc1"]),
                                    lr=5e-2, steps=60)
    print(f"vera r=2048 planted rank-4: MSE {before:.5f} -> {after:.5f} ({n} params)")
    assert n == 2048 + 64 and after <= 0.5 * before


@pytest.mark.parametrize("save", [True, False])
def test_peft_saved_adapter_loads_with_equal_outputs(tmp_path, save):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about save_projection=False
        ref = peft_perturbed(get_peft_model(mlp(), VeraConfig(r=8, target_modules=["fc1", "fc2"], d_initial=0.3,
                                                              projection_prng_key=11, save_projection=save)))
    ref.save_pretrained(tmp_path)
    ours = lorakit.load_adapter(mlp(), tmp_path)
    with torch.no_grad():
        expected = ref(X)
    assert close(run(ours, X), expected)
    opts = lorakit.get_config(ours).options
    assert opts["d_initial"] == 0.3 and opts["projection_prng_key"] == 11 and opts["save_projection"] is save


@pytest.mark.parametrize("save", [True, False])
def test_lorakit_saved_adapter_loads_in_peft_and_config_equals_pefts(tmp_path, save):
    cfg = lorakit.AdapterConfig(r=8, variant="vera", target_modules=["fc1", "fc2"], lora_dropout=0.05,
                                options={"d_initial": 0.2, "projection_prng_key": 3, "save_projection": save})
    model = adapted(cfg)
    lorakit.save_adapter(model, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about our checksum key and save_projection=False
        theirs = PeftModel.from_pretrained(mlp(), str(tmp_path / "ours"))
        with torch.no_grad():
            assert close(theirs(X), run(model, X))
        get_peft_model(mlp(), VeraConfig(r=8, target_modules=["fc1", "fc2"], vera_dropout=0.05, d_initial=0.2,
                                         projection_prng_key=3, save_projection=save)).save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["auto_mapping"] is None  # PEFT: class
    ours_json, peft_json = config_meaning(tmp_path / "ours"), config_meaning(tmp_path / "p")
    checksum = ours_json.pop("lorakit_projection_checksum", None)
    assert (checksum is not None) == (not save)  # the one key we add, only when the bases are not in the file
    assert ours_json == peft_json
    # and PEFT's own file reads back to the same config (JSON written again equals it)
    back = lorakit.AdapterConfig.from_dict(peft_json)
    assert back.variant == "vera" and back.lora_dropout == 0.05
    assert json.loads(back.to_json()) == {**peft_json, "auto_mapping": None}


def test_checksum_is_recorded_without_touching_the_users_config_and_verified_at_load(tmp_path, monkeypatch):
    cfg = config(save_projection=False)
    model = adapted(cfg)
    recorded = lorakit.get_config(model).options["projection_checksum"]
    assert recorded.startswith(_seeded.GENERATOR + ":sha256:") and cfg.options["projection_checksum"] is None
    other = lorakit.inject(MLP(dim=48), cfg)
    assert lorakit.get_config(other).options["projection_checksum"] != recorded  # same config, other sizes: fine
    lorakit.save_adapter(model, tmp_path)
    real = vera.vera_bases
    # a torch whose generator gives a different stream: the load fails and leaves the model alone
    monkeypatch.setattr(vera, "vera_bases", lambda *a: tuple(t + 1e-7 for t in real(*a)))
    fresh = mlp()
    with pytest.raises(StateDictError, match="projection_checksum"):
        lorakit.load_adapter(fresh, tmp_path)
    assert lorakit.adapter_names(fresh) == []
    monkeypatch.setattr(vera, "vera_bases", real)
    assert close(run(lorakit.load_adapter(mlp(), tmp_path), X), run(model, X))
    # an edited record fails too
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["lorakit_projection_checksum"] = recorded[:-4] + "0000"
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(StateDictError, match="torch's random stream changed"):
        lorakit.load_adapter(mlp(), tmp_path)


def test_export_as_plain_lora_loads_in_peft(tmp_path):
    check_export_loads_in_peft(adapted(), mlp(), X, tmp_path)


def test_invalid_options_and_unsupported_settings_raise_typed_errors():
    for options, name in (({"d_initial": "big"}, "d_initial"), ({"d_initial": float("nan")}, "d_initial"),
                          ({"projection_prng_key": 1.5}, "projection_prng_key"),
                          ({"projection_prng_key": True}, "projection_prng_key"),
                          ({"save_projection": "yes"}, "save_projection"),
                          ({"projection_checksum": "abc"}, "projection_checksum"), ({"alpha": 1}, "alpha")):
        with pytest.raises(ConfigError, match=name):
            config(**options)
    with pytest.raises(TargetError, match="conv"):
        lorakit.inject(convnet(), lorakit.AdapterConfig(r=2, variant="vera", target_modules=["conv", "head"]))
    with pytest.raises(TargetError, match="emb"):
        lorakit.inject(convnet(), lorakit.AdapterConfig(r=2, variant="vera", target_modules=["emb"]))
    for key, value in (("rank_pattern", {"fc1": 4}), ("alpha_pattern", {"fc1": 4}), ("use_rslora", True),
                       ("exclude_modules", ["fc2"])):
        cfg = lorakit.AdapterConfig(r=8, variant="vera", target_modules=["fc1", "fc2"], **{key: value})
        with pytest.raises(UnsupportedFeatureError, match=key):
            lorakit.inject(mlp(), cfg)
    with pytest.raises(ConfigError, match="gaussian"):
        lorakit.inject(mlp(), lorakit.AdapterConfig(variant="vera", target_modules=["fc1"],
                                                    init_lora_weights="gaussian"))
    peft_json = {**VeraConfig(target_modules=["fc1"]).to_dict(), "peft_type": "VERA", "bias": "vera_only"}
    with pytest.raises(UnsupportedFeatureError, match="bias"):
        lorakit.AdapterConfig.from_dict(json.loads(json.dumps(peft_json, default=list)))


def test_random_init_is_not_identity():
    model = mlp()
    lorakit.inject(model, lorakit.AdapterConfig(r=8, variant="vera", target_modules=["fc1"], init_lora_weights=False))
    v = model.fc1.adapters["default"]
    assert (v.vera_lambda_b == 1).all() and v.vera_lambda_d.std() > 0.5
    check_merge_cycle(model, X)  # asserts the adapter changes the output


def test_gpt2_conv1d_layers_both_ways_and_config_equals_pefts(tmp_path):
    ids = inputs("gpt2")
    targets = ["c_attn", "c_proj", "c_fc"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "fan_in_fan_out is set to False but the target module is Conv1D"
        ref = peft_perturbed(get_peft_model(gpt2(), VeraConfig(r=4, target_modules=targets)))
    ref.save_pretrained(tmp_path / "p")
    ours = lorakit.load_adapter(gpt2(), tmp_path / "p")
    with torch.no_grad():
        expected = ref(**ids).logits
    assert close(run(ours, ids), expected)
    model = adapted(lorakit.AdapterConfig(r=4, variant="vera", target_modules=targets), base=gpt2)
    lorakit.save_adapter(model, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(gpt2(), str(tmp_path / "ours"))
    with torch.no_grad():
        assert close(theirs(**ids).logits, run(model, ids))
    ours_json, peft_json = config_meaning(tmp_path / "ours"), config_meaning(tmp_path / "p")
    assert ours_json["fan_in_fan_out"] is True  # as PEFT leaves it on Conv1D layers
    assert ours_json == peft_json


@pytest.mark.parametrize("save", [True, False])
def test_adapter_for_other_layer_sizes_is_refused(tmp_path, save):
    """The bases are sized to the largest adapted layer: an adapter made for other sizes does not fit."""
    lorakit.save_adapter(adapted(config(save_projection=save)), tmp_path)
    small = MLP(dim=48)
    with pytest.raises(StateDictError, match="projection_checksum" if not save else "shape"):
        lorakit.load_adapter(small, tmp_path)
    assert lorakit.adapter_names(small) == []
