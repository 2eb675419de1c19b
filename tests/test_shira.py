"""SHiRA: sparse trainable entries of W at fixed indices; masks random (PEFT's), struct, weight magnitude,
gradient and SNIP; PEFT's SHIRA file format both ways."""
import json

import pytest
import torch
from peft import PeftModel, ShiraConfig, get_peft_model
from peft.tuners.shira.mask_functions import random_mask
from safetensors.torch import load_file

import lorakit
from lorakit.errors import ConfigError, MergeError, StateDictError, UnsupportedFeatureError
from lorakit.variants.shira import struct_mask

import contract
from contract import (check_merge_cycle, check_mixed_batch, check_save_load_save, close, config_meaning, mlp, mse_loss,
                      perturb, planted_task, run)
from models import convnet, inputs, vit

X = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("one_thread_module")  # see conftest.py


def shira(r=2, targets=("fc1", "fc2"), **options):
    return lorakit.AdapterConfig(r=r, variant="shira", target_modules=list(targets), options=options)


def injected(config=None, name="default", seed=0, model=None):
    return contract.injected(config or shira(), name, seed, model, seed_torch=False)


def batches(n=3, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 64, generator=g), torch.randn(16, 64, generator=g)) for _ in range(n)]


def grad_init(model, loader):
    lorakit.initialize(model, "shira", dataloader=loader, loss_fn=mse_loss, progress=False)


# ---- sizes, init, masks -------------------------------------------------------------------------
def test_trainable_count_is_r_times_m_plus_n_or_density():
    model = mlp()
    lorakit.inject(model, shira(r=3))
    assert lorakit.count_parameters(model)[0] == 3 * (64 + 64) + 3 * (64 + 64)  # r·(m+n) per 64×64 layer
    model = mlp()
    lorakit.inject(model, shira(targets=["fc1"], density=0.05))
    assert lorakit.count_parameters(model)[0] == round(0.05 * 64 * 64)
    model = convnet()  # conv kernels count as their flattened (out, C·k…) matrix
    lorakit.inject(model, shira(r=1, targets=["conv", "conv2d"]))
    assert lorakit.count_parameters(model)[0] == 1 * (24 + 16 * 3) + 1 * (4 + 1 * 3 * 3)


@pytest.mark.parametrize("mask_type", ["random", "struct", "weight_magnitude"])
def test_delta_is_zero_at_init_and_masks_are_sorted_unique_entries(mask_type):
    model = mlp()
    lorakit.inject(model, shira(mask_type=mask_type))
    assert torch.equal(run(model, X), run(mlp(), X))
    for layer in (model.fc1, model.fc2):
        idx = layer.adapters["default"].shira_indices
        flat = idx[0].long() * 64 + idx[1].long()
        assert idx.dtype == torch.int32 and idx.shape == (2, 2 * 128)
        assert torch.equal(flat, flat.unique())  # sorted row-major, no repeats (as PEFT's torch.where order)


@pytest.mark.parametrize("seed", [None, 11])
def test_random_mask_is_peft_bit_for_bit(seed):
    model = mlp()
    lorakit.inject(model, shira(r=3, random_seed=seed))
    for name in ("fc1", "fc2"):
        want = torch.stack(torch.where(random_mask(getattr(mlp(), name), 3, random_seed=seed) == 1)).int()
        assert torch.equal(getattr(model, name).adapters["default"].shira_indices, want)


def test_struct_mask_holds_the_diagonal_and_whole_lines_and_is_full_rank():
    g = torch.Generator().manual_seed(0)
    flat = struct_mask(12, 20, 2 * (12 + 20), g)
    taken = torch.zeros(12 * 20, dtype=torch.bool)
    taken[flat] = True
    taken = taken.view(12, 20)
    assert flat.numel() == 64 and taken.diagonal().all()
    # diagonal (12) + a whole row (20 − 1 on the diagonal) + a whole column (12 − 2 already taken) + ...
    full_rows, full_cols = int(taken.all(1).sum()), int(taken.all(0).sum())
    assert full_rows >= 1 and full_cols >= 1
    values = torch.where(taken, torch.randn(12, 20, generator=g), torch.zeros(12, 20))
    assert torch.linalg.matrix_rank(values) == 12
    model = mlp()  # and the variant's ΔW at r = 2 on 64×64 is full rank (LoRA's would be 2)
    lorakit.inject(model, shira(r=2, targets=["fc1"], mask_type="struct"))
    perturb(model)
    assert torch.linalg.matrix_rank(model.fc1.adapters["default"].delta_weight()) == 64


def test_weight_magnitude_mask_takes_the_largest_weights():
    model = mlp()
    lorakit.inject(model, shira(targets=["fc1"], mask_type="weight_magnitude"))
    idx = model.fc1.adapters["default"].shira_indices.long()
    w = model.fc1.base_layer.weight.abs()
    chosen = torch.zeros_like(w, dtype=torch.bool)
    chosen[idx[0], idx[1]] = True
    assert w[chosen].min() >= w[~chosen].max()


# ---- gradient / SNIP masks from data ------------------------------------------------------------
def explicit_abs_grads(data):
    ref, sums = mlp(), {"fc1": 0, "fc2": 0}
    for x, y in data:
        ref.zero_grad()
        mse_loss(ref, (x, y)).backward()
        sums = {k: sums[k] + getattr(ref, k).weight.grad.abs() for k in sums}
    return sums, ref


@pytest.mark.parametrize("mask_type", ["gradient", "snip"])
def test_data_masks_need_initialize_then_take_the_top_scores(mask_type):
    model = mlp()
    lorakit.inject(model, shira(mask_type=mask_type))
    with pytest.raises(ConfigError, match="lorakit.initialize"):
        run(model, X)
    with pytest.raises(MergeError, match="lorakit.initialize"):
        lorakit.merge(model)
    perturb(model)
    data = batches()
    grad_init(model, data)
    sums, ref = explicit_abs_grads(data)
    for name in ("fc1", "fc2"):
        variant = getattr(model, name).adapters["default"]
        score = sums[name] * (getattr(ref, name).weight.abs() if mask_type == "snip" else 1)
        idx = variant.shira_indices.long()
        chosen = torch.zeros_like(score, dtype=torch.bool)
        chosen[idx[0], idx[1]] = True
        assert score[chosen].min() >= score[~chosen].max() * (1 - 1e-5)
        assert torch.equal(variant.shira_weight, torch.zeros(256))  # values reset: ΔW = 0 again
    assert torch.equal(run(model, X), run(mlp(), X))
    perturb(model)
    check_merge_cycle(model, X)


def test_initialize_refuses_masks_that_need_no_data_and_other_variants():
    model = mlp()
    lorakit.inject(model, shira(mask_type="random"))
    with pytest.raises(ConfigError, match="mask_type"):
        grad_init(model, batches(1))
    model = mlp()
    lorakit.inject(model, lorakit.AdapterConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(ConfigError, match="'lora'"):
        grad_init(model, batches(1))


def test_an_uninitialized_gradient_adapter_still_refuses_after_save_and_load(tmp_path):
    model = mlp()
    lorakit.inject(model, shira(mask_type="gradient"))
    lorakit.save_adapter(model, tmp_path)
    loaded = lorakit.load_adapter(mlp(), tmp_path)
    with pytest.raises(ConfigError, match="lorakit.initialize"):
        run(loaded, X)


# ---- the contract ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_type", ["random", "struct", "weight_magnitude"])
def test_merge_cycle(mask_type):
    check_merge_cycle(injected(shira(mask_type=mask_type)), X)


def test_save_load_save_with_rank_pattern_density_and_settings_peft_lacks(tmp_path):
    config = lorakit.AdapterConfig(r=2, variant="shira", target_modules=["fc1", "fc2"], rank_pattern={"fc2": 3},
                                   options={"mask_type": "struct"})
    check_save_load_save(injected(config), mlp(), X, tmp_path / "pattern")
    tensors = lorakit.read_adapter(tmp_path / "pattern" / "first")[1]
    assert tensors["fc1.shira_weight"].numel() == 2 * 128 and tensors["fc2.shira_weight"].numel() == 3 * 128
    config = shira(density=0.1)
    loaded = check_save_load_save(injected(config), mlp(), X, tmp_path / "density")
    assert lorakit.get_config(loaded).options == config.options
    assert lorakit.adapter_parameters(loaded, "default")["fc1.shira_weight"].numel() == round(0.1 * 64 * 64)
    data = json.loads((tmp_path / "density" / "first" / "adapter_config.json").read_text())
    assert data["peft_type"] == "SHIRA" and data["options"] == {"density": 0.1} and "lora_dropout" not in data
    dropout = lorakit.AdapterConfig.from_dict({**data, "lora_dropout": 0.1})
    assert dropout.lora_dropout == 0.1 and json.loads(dropout.to_json())["lora_dropout"] == 0.1


def test_mixed_batch_of_two_masks_on_conv_and_linear():
    model = convnet()
    targets = ["conv", "conv2d", "head"]
    for i, (name, mask) in enumerate([("a", "random"), ("b", "weight_magnitude")]):
        injected(shira(r=1, targets=targets, mask_type=mask, random_seed=i), name, seed=i, model=model)
    check_mixed_batch(model, inputs("convnet", batch=5))


def test_planted_task_and_full_rank_task_against_lora_at_equal_parameter_count():
    before, after, n = planted_task(shira(r=16, targets=["fc1"]))
    assert n == 16 * 128 and after <= 0.5 * before, (before, after)
    before, after, _ = planted_task(shira(r=16, targets=["fc1"], mask_type="gradient"), init=grad_init)
    assert after <= 0.5 * before, (before, after)
    # planted full-rank ΔW, 512 trainable parameters each: LoRA r = 4 against SHiRA r = 4
    _, lora_after, lora_n = planted_task(lorakit.AdapterConfig(r=4, lora_alpha=4, target_modules=["fc1"]),
                                         full_rank=True)
    _, grad_after, shira_n = planted_task(shira(r=4, targets=["fc1"], mask_type="gradient"), full_rank=True,
                                          init=grad_init)
    assert lora_n == shira_n == 512
    assert grad_after < lora_after, (grad_after, lora_after)


# ---- PEFT's format ----------------------------------------------------------------------------------
@torch.no_grad()
def peft_saved(folder, seed=5):
    pm = get_peft_model(mlp(), ShiraConfig(r=2, target_modules=["fc1", "fc2"], random_seed=seed))
    g = torch.Generator().manual_seed(1)
    for name, p in pm.named_parameters():
        if "shira_weight" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(folder)
    return pm.eval()


def test_peft_saved_adapter_loads_with_equal_outputs_and_config(tmp_path):
    pm = peft_saved(tmp_path / "peft")
    model = lorakit.load_adapter(mlp(), tmp_path / "peft")
    with torch.no_grad():
        ref = pm(X)
    assert not close(ref, run(mlp(), X))
    assert close(run(model, X), ref)
    lorakit.save_adapter(model, tmp_path / "ours")
    assert config_meaning(tmp_path / "ours", "base_model_name_or_path") == \
        config_meaning(tmp_path / "peft", "base_model_name_or_path")
    theirs, ours = load_file(tmp_path / "peft" / "adapter_model.safetensors"), \
        load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(theirs) == sorted(ours) and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    # our own injection with PEFT's config draws the same masks
    fresh = mlp()
    lorakit.inject(fresh, shira(random_seed=5))
    assert torch.equal(fresh.fc1.adapters["default"].shira_indices, theirs["base_model.model.fc1.shira_indices"])


@pytest.mark.parametrize("mask_type", ["random", "weight_magnitude"])
def test_ours_loads_in_peft_with_equal_outputs(tmp_path, mask_type):
    model = injected(shira(random_seed=7, mask_type=mask_type))
    lorakit.save_adapter(model, tmp_path)
    pm = PeftModel.from_pretrained(mlp(), str(tmp_path)).eval()  # PEFT takes the indices from the file
    with torch.no_grad():
        assert close(run(model, X), pm(X))
    if mask_type == "random":  # the config PEFT itself writes for this adapter is ours
        pm.save_pretrained(tmp_path / "peft")
        assert config_meaning(tmp_path / "peft", "base_model_name_or_path") == \
            config_meaning(tmp_path, "base_model_name_or_path")


# ---- errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("options,match", [({"density": 1.0}, "density"), ({"density": 0}, "density"),
                                           ({"density": 1.5}, "density"), ({"density": True}, "density"),
                                           ({"mask_type": "rows"}, "mask_type"),
                                           ({"random_seed": "x"}, "random_seed"), ({"sparsity": 0.1}, "sparsity")])
def test_invalid_options_name_the_option(options, match):
    with pytest.raises(ConfigError, match=match):
        shira(**options)


def test_r_too_large_for_the_layer_is_refused_at_inject():
    model = convnet()
    with pytest.raises(ConfigError, match="r=3"):
        lorakit.inject(model, shira(r=3, targets=["conv2d"]))  # 3·(4 + 9) = 39 > 4·9 weights
    assert not any(isinstance(m, lorakit.layers.AdaptedLayer) for m in model.modules())


def test_corrupt_indices_and_custom_peft_masks_are_refused(tmp_path):
    model = injected()
    model.fc1.adapters["default"].shira_indices[0, 0] = 64  # out of range
    lorakit.save_adapter(model, tmp_path)
    with pytest.raises(StateDictError, match="outside"):
        run(lorakit.load_adapter(mlp(), tmp_path), X)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["mask_type"] = "my_custom_mask"
    with pytest.raises(UnsupportedFeatureError, match="mask_type"):
        lorakit.AdapterConfig.from_dict(data)


# ---- vision -------------------------------------------------------------------------------------------
def test_vit_and_convnet_merge_cycle_and_save_load(tmp_path):
    targets = ["q_proj", "v_proj", "fc1", "fc2"]
    model = injected(shira(r=2, targets=targets, mask_type="struct"), model=vit())
    pixels = inputs("vit", batch=3)
    check_merge_cycle(model, pixels)
    check_save_load_save(model, vit(), pixels, tmp_path / "vit")
    model = injected(shira(r=2, targets=["emb", "conv", "conv2d", "head"]), model=convnet())
    ids = inputs("convnet", batch=3)
    check_merge_cycle(model, ids)
    check_save_load_save(model, convnet(), ids, tmp_path / "convnet")
