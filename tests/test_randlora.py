"""RandLoRA: full-rank sums of shared random bases, the memory-light backward, PEFT's RANDLORA format both ways."""
import json
import warnings

import pytest
import torch
from peft import PeftModel, RandLoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit.errors import ConfigError, StateDictError, TargetError, UnsupportedFeatureError
from lorakit.variants import randlora
from lorakit.variants.randlora import _ScaledBasis

from contract import (check_export_loads_in_peft, check_merge_cycle, check_mixed_batch, check_save_load_save, close,
                      config_meaning, injected, mlp, perturb, perturb_peft, planted_task, run)
from models import convnet, gpt2, inputs

X = torch.randn(6, 64, generator=torch.Generator().manual_seed(5))


class Uneven(nn.Module):
    """64 → 24 (out < in: the transposed orientation) → 40 (in < out)."""

    def __init__(self):
        super().__init__()
        self.down, self.up = nn.Linear(64, 24), nn.Linear(24, 40)

    def forward(self, x):
        return self.up(torch.relu(self.down(x)))


def uneven():
    torch.manual_seed(0)
    return Uneven().eval()


def config(r=5, alpha=12, targets=("down", "up"), **options):
    return lorakit.AdapterConfig(r=r, lora_alpha=alpha, variant="randlora", target_modules=list(targets),
                                 options=options)


def adapted(cfg=None, name="default", seed=0, base=uneven):
    return injected(cfg or config(), name, seed, base(), seed_torch=False)


def peft_perturbed(model, seed=0):
    return perturb_peft(model, seed, floor=0.1)  # λ starts at 0: the floor moves it too


def test_trainable_count_is_n_times_r_plus_min_dim_per_layer():
    model = uneven()
    lorakit.inject(model, config(r=5))
    # N = ceil(min(m, n) / r) bases per layer, N·(r + min(m, n)) parameters: both layers have min 24 → N = 5
    assert lorakit.count_parameters(model)[0] == 2 * 5 * (5 + 24)
    model = mlp()
    lorakit.inject(model, config(r=8, targets=["fc1", "fc2"]))
    assert lorakit.count_parameters(model)[0] == 2 * 8 * (8 + 64)
    a, b = model.lorakit_shared["default"].randlora_A, model.lorakit_shared["default"].randlora_B
    assert tuple(a.shape) == (8, 1, 64) and tuple(b.shape) == (64, 8, 8)


def test_init_is_identity_and_equals_peft_bit_for_bit():
    model = uneven()
    lorakit.inject(model, config(projection_prng_key=3))
    with lorakit.disabled(model):
        base = run(model, X)
    assert torch.equal(run(model, X), base)
    ref = get_peft_model(uneven(), RandLoraConfig(r=5, randlora_alpha=12, target_modules=["down", "up"],
                                                  projection_prng_key=3))
    shared = model.lorakit_shared["default"]
    assert torch.equal(shared.randlora_A, ref.base_model.randlora_A["default"])
    assert torch.equal(shared.randlora_B, ref.base_model.randlora_B["default"])
    for name in ("down", "up"):
        ours, theirs = getattr(model, name).adapters["default"], getattr(ref.base_model.model, name)
        assert torch.equal(ours.randlora_lambda, theirs.randlora_lambda["default"])
        assert torch.equal(ours.randlora_gamma, theirs.randlora_gamma["default"])
    assert (ours.randlora_lambda == 0).all() and (ours.randlora_gamma == 1 / 24).all()


def test_delta_is_the_sum_of_scaled_basis_products_and_full_rank():
    model = adapted(config(r=5, targets=["up"]))
    v, sh = model.up.adapters["default"], model.lorakit_shared["default"]
    lam, gamma, n = v.randlora_lambda, v.randlora_gamma, v.num_bases
    a, b = sh.randlora_A[:, 0, :24], sh.randlora_B[:40, :n].flatten(1)
    # term i: column i of the flattened B stack with λ[k, j]·A[k]⊙γ[j] for i = k·N + j (PEFT's pairing)
    dense = sum(torch.outer(b[:, i], lam[i // n, i % n] * a[i // n] * gamma[i % n]) for i in range(5 * n))
    assert close(v.delta_weight(), dense * 12 / 5, tol=1e-6)
    assert torch.linalg.matrix_rank(v.delta_weight()) == 24  # full rank: min(m, n)
    a_f, b_f, s = v.factors()
    assert a_f.shape == (25, 24) and b_f.shape == (40, 25) and s == 12 / 5


def test_scaled_basis_backward_is_exact_and_keeps_no_scaled_copy():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 10, generator=g, dtype=torch.double)
    lam = torch.randn(4, 3, generator=g, dtype=torch.double, requires_grad=True)
    gamma = torch.randn(3, 10, generator=g, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(_ScaledBasis.apply, (a, lam, gamma))
    plain = (lam[:, :, None] * a[:, None, :] * gamma[None]).flatten(0, 1)
    assert torch.equal(_ScaledBasis.apply(a, lam, gamma), plain)

    def saved_sizes(fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            fn()
        return sizes
    full = 4 * 3 * 10
    assert max(saved_sizes(lambda: (lam[:, :, None] * a[:, None, :] * gamma[None]).flatten(0, 1))) == full
    assert max(saved_sizes(lambda: _ScaledBasis.apply(a, lam, gamma))) < full


def test_merge_cycle_save_load_and_mixed_batch(tmp_path):
    check_merge_cycle(adapted(), X)
    for save in (True, False):
        model = adapted(config(save_projection=save))
        check_save_load_save(model, uneven(), X, tmp_path / str(save))
        keys = set(load_file(tmp_path / str(save) / "first" / "adapter_model.safetensors"))
        assert ("base_model.randlora_A" in keys) == save and ("base_model.randlora_B" in keys) == save
        assert not any(k.startswith("base_model.model.") and "randlora_A" in k for k in keys)  # bases written once
    model = adapted(config(projection_prng_key=1), "a")
    lorakit.inject(model, config(r=3, alpha=6, projection_prng_key=2, sparse=True), "b")
    perturb(model, "b", seed=1)
    check_mixed_batch(model, X)


def test_planted_task_and_full_rank_against_lora_at_equal_parameter_count(one_thread):
    before, after, n = planted_task(config(r=2, alpha=2, targets=["fc1"]), lr=3e-3)
    print(f"randlora r=2 planted rank-4: MSE {before:.5f} -> {after:.5f} ({n} params)")
    assert n == 32 * (2 + 64) and after <= 0.5 * before
    results = {}
    for label, cfg, lr in (("randlora r=2", config(r=2, alpha=2, targets=["fc1"]), 3e-3),
                           ("lora r=16", lorakit.AdapterConfig(r=16, lora_alpha=16, target_modules=["fc1"]), 1e-2),
                           ("randlora r=64", config(r=64, alpha=64, targets=["fc1"]), 3e-3),
                           ("lora r=1", lorakit.AdapterConfig(r=1, lora_alpha=1, target_modules=["fc1"]), 1e-2)):
        results[label] = planted_task(cfg, lr=lr, full_rank=True)
    for label, (b, a, k) in results.items():
        print(f"planted full-rank, {label}: MSE {b:.5f} -> {a:.5f} ({k} params)")
    assert results["randlora r=64"][2] == results["lora r=1"][2] == 128  # equal counts
    assert abs(results["randlora r=2"][2] - results["lora r=16"][2]) <= 0.05 * 2048  # 2112 vs 2048
    b, a, _ = results["randlora r=2"]
    assert a <= 0.5 * b


def peft_config(save=True, **kw):
    return RandLoraConfig(r=5, randlora_alpha=12, target_modules=["down", "up"], projection_prng_key=9,
                          save_projection=save, **kw)


@pytest.mark.parametrize("kw", [{}, {"save": False}, {"sparse": True}, {"very_sparse": True, "save": False}],
                         ids=["saved", "seeded", "sparse", "very_sparse"])
def test_peft_saved_adapter_loads_with_equal_outputs(tmp_path, kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about save_projection=False
        ref = peft_perturbed(get_peft_model(uneven(), peft_config(**kw)))
    ref.save_pretrained(tmp_path)
    ours = lorakit.load_adapter(uneven(), tmp_path)
    with torch.no_grad():
        expected = ref(X)
    assert close(run(ours, X), expected)
    opts = lorakit.get_config(ours).options
    assert opts["projection_prng_key"] == 9 and opts["sparse"] == kw.get("sparse", False)


def test_pefts_per_layer_copies_of_the_bases_are_checked(tmp_path):
    ref = peft_perturbed(get_peft_model(uneven(), peft_config()))
    ref.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    assert "base_model.model.up.randlora_B" in tensors  # PEFT repeats the bases under every layer
    tensors["base_model.model.up.randlora_B"] = tensors["base_model.model.up.randlora_B"] * 1.01
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(StateDictError, match="up.randlora_B"):
        lorakit.load_adapter(uneven(), tmp_path)


@pytest.mark.parametrize("save", [True, False])
def test_lorakit_saved_adapter_loads_in_peft_and_config_equals_pefts(tmp_path, save):
    cfg = lorakit.AdapterConfig(r=5, lora_alpha=12, variant="randlora", target_modules=["down", "up"],
                                lora_dropout=0.05, options={"projection_prng_key": 9, "save_projection": save})
    model = adapted(cfg)
    lorakit.save_adapter(model, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about our checksum key, missing per-layer copies, no bases
        theirs = PeftModel.from_pretrained(uneven(), str(tmp_path / "ours"))
        with torch.no_grad():
            assert close(theirs(X), run(model, X))
        get_peft_model(uneven(), peft_config(save, randlora_dropout=0.05)).save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["auto_mapping"] is None  # PEFT: class
    ours_json, peft_json = config_meaning(tmp_path / "ours"), config_meaning(tmp_path / "p")
    assert (ours_json.pop("lorakit_projection_checksum", None) is not None) == (not save)
    assert ours_json == peft_json
    back = lorakit.AdapterConfig.from_dict(peft_json)
    assert back.variant == "randlora" and back.lora_alpha == 12 and back.lora_dropout == 0.05


def test_seeded_bases_fail_loudly_when_the_stream_changes(tmp_path, monkeypatch):
    model = adapted(config(save_projection=False, very_sparse=True))
    lorakit.save_adapter(model, tmp_path)
    real = randlora.randlora_bases
    monkeypatch.setattr(randlora, "randlora_bases", lambda *a: tuple(t.flip(-1) for t in real(*a)))
    with pytest.raises(StateDictError, match="projection_checksum"):
        lorakit.load_adapter(uneven(), tmp_path)


def test_export_as_plain_lora_of_rank_n_times_r_loads_in_peft(tmp_path):
    check_export_loads_in_peft(adapted(), uneven(), X, tmp_path, r=25)


def test_invalid_options_and_unsupported_settings_raise_typed_errors():
    for options, name in (({"sparse": "yes"}, "sparse"), ({"very_sparse": 1}, "very_sparse"),
                          ({"projection_prng_key": "0"}, "projection_prng_key"),
                          ({"save_projection": None}, "save_projection"), ({"d_initial": 0.1}, "d_initial")):
        with pytest.raises(ConfigError, match=name):
            config(**options)
    with pytest.raises(TargetError, match="conv"):
        lorakit.inject(convnet(), lorakit.AdapterConfig(r=2, variant="randlora", target_modules=["conv"]))
    with pytest.raises(UnsupportedFeatureError, match="rank_pattern"):
        lorakit.inject(uneven(), lorakit.AdapterConfig(r=4, variant="randlora", target_modules=["down", "up"],
                                                       rank_pattern={"up": 2}))


def test_gpt2_conv1d_layers_both_ways(tmp_path):
    ids = inputs("gpt2")
    targets = ["c_attn", "c_proj", "c_fc"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "fan_in_fan_out is set to False but the target module is Conv1D"
        ref = peft_perturbed(get_peft_model(gpt2(), RandLoraConfig(r=4, randlora_alpha=10, target_modules=targets)))
    ref.save_pretrained(tmp_path / "p")
    ours = lorakit.load_adapter(gpt2(), tmp_path / "p")
    with torch.no_grad():
        assert close(run(ours, ids), ref(**ids).logits)
    lorakit.save_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: no per-layer copies of the bases in our file
        theirs = PeftModel.from_pretrained(gpt2(), str(tmp_path / "ours"))
    with torch.no_grad():
        assert close(theirs(**ids).logits, run(ours, ids))


def test_random_init_is_pefts_pre_reset_values():
    model = uneven()
    lorakit.inject(model, lorakit.AdapterConfig(r=5, variant="randlora", target_modules=["down", "up"],
                                                init_lora_weights=False))
    v = model.down.adapters["default"]
    assert v.randlora_lambda.std() > 0.5 and (v.randlora_gamma == 1 / 64).all()
    check_merge_cycle(model, X)  # asserts the adapter changes the output
