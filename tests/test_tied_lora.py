"""Tied-LoRA: one (A, B) pair per layer shape shared across layers, per-layer scaling vectors u, v; the
configurations of which parts train."""
import json

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.errors import ConfigError

import contract
from contract import (check_export_loads_in_peft, check_merge_cycle, check_mixed_batch, check_save_load_save, close, mlp,
                      planted_task, run)
from models import convnet, inputs, vit

X = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
VIT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
CONFIGS = {"default": {}, "frozen_vectors": {"vectors": "frozen"}, "no_vectors": {"vectors": "absent"},
           "frozen_pair": {"tied_trainable": False}}


pytestmark = pytest.mark.usefixtures("one_thread_module")  # see conftest.py


def tied(r=4, targets=("fc1", "fc2"), init=True, **options):
    return lorakit.AdapterConfig(r=r, lora_alpha=2 * r, variant="tied_lora", target_modules=list(targets),
                                 init_lora_weights=init, options=options)


def injected(config=None, name="default", seed=0, model=None):
    return contract.injected(config or tied(), name, seed, model, seed_torch=False)


# ---- parameter counts ---------------------------------------------------------------------------
@pytest.mark.parametrize("config,expected", [
    ("default", 4 * (64 + 64) + 2 * (4 + 64)),  # one pair for the two 64×64 layers + (u, v) per layer
    ("frozen_vectors", 4 * (64 + 64)),
    ("no_vectors", 4 * (64 + 64)),
    ("frozen_pair", 2 * (4 + 64)),  # VeRA-like: only the vectors train
])
def test_trainable_count_per_configuration_on_the_mlp(config, expected):
    model = mlp()
    lorakit.inject(model, tied(**CONFIGS[config]))
    assert lorakit.count_parameters(model)[0] == expected


@pytest.mark.parametrize("config", ["default", "frozen_pair"])
def test_vit_has_one_pair_per_shape_group(config):
    model = vit()
    lorakit.inject(model, tied(r=2, targets=VIT_TARGETS, **CONFIGS[config]))
    pairs = 2 * (32 + 32) + 2 * (32 + 64) + 2 * (64 + 32)  # q/k/v/o (32×32), fc1 (64×32), fc2 (32×64)
    vectors = 8 * (2 + 32) + 2 * (2 + 64) + 2 * (2 + 32)   # (r + out) for each of the 12 layers
    assert lorakit.count_parameters(model)[0] == (pairs + vectors if config == "default" else vectors)
    shared = model.lorakit_shared["default"]
    assert sorted(shared.groups) == ["32x32_r2", "32x64_r2", "64x32_r2"]
    layers = model.vit.layers
    assert layers[0].attention.q_proj.adapters["default"].shared.pair("32x32_r2")[0] is \
        layers[1].attention.o_proj.adapters["default"].shared.pair("32x32_r2")[0]


def test_rank_pattern_splits_a_shape_group():
    model = mlp()
    lorakit.inject(model, lorakit.AdapterConfig(r=4, variant="tied_lora", target_modules=["fc1", "fc2"],
                                                rank_pattern={"fc2": 2}))
    assert sorted(model.lorakit_shared["default"].groups) == ["64x64_r2", "64x64_r4"]
    assert lorakit.count_parameters(model)[0] == 4 * 128 + 2 * 128 + (4 + 64) + (2 + 64)


# ---- init -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", list(CONFIGS))
def test_delta_is_zero_at_init(config):
    model = mlp()
    lorakit.inject(model, tied(**CONFIGS[config]))
    assert torch.equal(run(model, X), run(mlp(), X))
    a, b = model.lorakit_shared["default"].pair("64x64_r4")
    assert a.abs().min() > 0
    if config == "frozen_pair":  # B random and frozen, v = 0 (VeRA-style); u = 1
        assert b.abs().min() > 0 and not isinstance(b, torch.nn.Parameter)
        assert torch.equal(model.fc1.adapters["default"].tied_lora_v, torch.zeros(64))
    else:
        assert torch.equal(b, torch.zeros(64, 4))


def test_the_tied_pair_gets_the_sum_of_every_layer_gradient():
    model = mlp()
    lorakit.inject(model, tied(init=False))
    shared = model.lorakit_shared["default"]
    a, b = shared.pair("64x64_r4")
    loss = lambda out: out.pow(2).mean()  # noqa: E731
    loss(model(X)).backward()
    # the same network written out with one private copy of A per layer: the tied gradient is their sum
    base, copies = mlp(), [a.detach().clone().requires_grad_(True) for _ in range(2)]

    def adapted(layer, copy, x):
        v = getattr(model, layer).adapters["default"]
        delta = (v.tied_lora_v[:, None] * b) @ (v.tied_lora_u[:, None] * copy) * v.scale
        return getattr(base, layer)(x) + x @ delta.T
    loss(adapted("fc2", copies[1], torch.nn.functional.gelu(adapted("fc1", copies[0], X)))).backward()
    assert copies[0].grad.abs().max() > 0 and copies[1].grad.abs().max() > 0
    assert close(a.grad, copies[0].grad + copies[1].grad)


# ---- the contract ---------------------------------------------------------------------------------
@pytest.mark.parametrize("config", list(CONFIGS))
def test_merge_cycle(config):
    check_merge_cycle(injected(tied(**CONFIGS[config])), X)


@pytest.mark.parametrize("config", ["default", "frozen_pair", "no_vectors"])
def test_save_load_save(tmp_path, config):
    model = injected(tied(**CONFIGS[config]))
    loaded = check_save_load_save(model, mlp(), X, tmp_path)
    keys = set(load_file(tmp_path / "first" / "adapter_model.safetensors"))
    assert {"base_model.tied_lora_A.64x64_r4", "base_model.tied_lora_B.64x64_r4"} <= keys
    assert ("base_model.model.fc1.tied_lora_u" in keys) == (config != "no_vectors")
    data = json.loads((tmp_path / "first" / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORAKIT_TIED_LORA" and data["options"] == {**tied().options, **CONFIGS[config]}
    assert lorakit.get_config(loaded).options == data["options"]


def test_mixed_batch_of_two_configurations():
    model = injected(tied(), "a", seed=0)
    injected(tied(r=2, tied_trainable=False), "b", seed=1, model=model)
    check_mixed_batch(model, X)


def test_planted_task():
    before, after, n = planted_task(tied(targets=["fc1"]))
    assert n == 4 * 128 + 4 + 64
    assert after <= 0.5 * before, (before, after)


def test_exported_plain_lora_loads_in_peft_with_equal_outputs(tmp_path):
    check_export_loads_in_peft(injected(tied(init=False)), mlp(), X, tmp_path)


# ---- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("options,match", [({"vectors": "shared"}, "vectors"), ({"tied_trainable": 1}, "tied_trainable"),
                                           ({"tied_trainable": False, "vectors": "absent"}, "nothing to train"),
                                           ({"tied_trainable": False, "vectors": "frozen"}, "vectors"),
                                           ({"tie": True}, "tie")])
def test_invalid_options_name_the_option(options, match):
    with pytest.raises(ConfigError, match=match):
        tied(**options)


# ---- vision ---------------------------------------------------------------------------------------
def test_vit_and_convnet_merge_cycle_and_save_load(tmp_path):
    model = injected(tied(r=2, targets=VIT_TARGETS), model=vit())
    pixels = inputs("vit", batch=3)
    check_merge_cycle(model, pixels)
    check_save_load_save(model, vit(), pixels, tmp_path / "vit")
    model = injected(tied(r=2, targets=["emb", "conv", "conv2d", "head"]), model=convnet())
    ids = inputs("convnet", batch=3)
    check_merge_cycle(model, ids)
    check_save_load_save(model, convnet(), ids, tmp_path / "convnet")
