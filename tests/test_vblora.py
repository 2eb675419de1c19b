"""VB-LoRA: parameter count, init, merge, files, mixed batches, planted task, PEFT parity (full and top-k-only
files), invalid options, a ViT and convolutions."""
import pytest
import torch
from peft import PeftModel, VBLoRAConfig, get_peft_model
from safetensors.torch import load_file

import lorakit
from lorakit.errors import ConfigError, UnsupportedFeatureError
from lorakit.variants.vblora import save_topk

from contract import (check_merge_cycle, check_mixed_batch, check_peft_files_both_ways, check_save_load_save, close,
                      config_meaning, injected, mlp, peft_trained, perturb, planted_task, run)
from models import convnet, gpt2, inputs, vit

X = torch.randn(6, 64, generator=torch.Generator().manual_seed(5))
SMALL = {"num_vectors": 32, "vector_length": 16}
VIT_TARGETS = ["q_proj", "v_proj", "fc1", "fc2", "projection"]  # projection: the Conv2d patch embedding


def vb(r=4, targets=("fc1", "fc2"), **options):
    return lorakit.AdapterConfig(r=r, variant="vblora", target_modules=list(targets), options={**SMALL, **options})


def test_trainable_count_is_bank_plus_logits():
    model = vit()
    sizes = {}
    for path, m in model.named_modules():
        if path.split(".")[-1] in VIT_TARGETS:
            sizes[path] = (m.weight.shape[0], m.weight[0].numel())  # (m, n); the conv's n is C·kh·kw = 48
    torch.manual_seed(0)
    lorakit.inject(model, vb(r=4, targets=VIT_TARGETS))
    h, b, r = 32, 16, 4
    assert len(sizes) == 9 and {n for _, n in sizes.values()} == {32, 48, 64}
    assert lorakit.count_parameters(model)[0] == h * b + sum((r * n // b + m // b * r) * h for m, n in sizes.values())


def test_init_gives_a_tiny_nonzero_change_of_every_layer():
    model = mlp()
    torch.manual_seed(0)
    lorakit.inject(model, vb())
    for name in ("fc1", "fc2"):
        layer = getattr(model, name)
        dw, w = layer.adapters["default"].delta_weight(), layer.base_layer.weight
        assert 0 < dw.abs().max() < 0.01 * w.abs().max()
    bank = model.lorakit_shared["default"].vblora_vector_bank
    assert bank.requires_grad and 0 < bank.abs().max() <= 0.02
    with lorakit.disabled(model):
        base = run(model, X)
    assert not torch.equal(run(model, X), base) and close(run(model, X), base, tol=1e-2)


def test_composition_is_the_softmax_mix_of_the_top_k_bank_vectors():
    """A[k, t·b:(t+1)·b] and B[t·b:(t+1)·b, k] written out for one piece each, against factors()."""
    model = injected(vb(topk=3))
    v = model.fc1.adapters["default"]
    bank = model.lorakit_shared["default"].vblora_vector_bank
    a, b, s = v.factors()
    assert s == 1.0 and a.shape == (4, 64) and b.shape == (64, 4)
    for logits, piece in ((v.vblora_logits_A[2, 1], a[2, 16:32]), (v.vblora_logits_B[3, 1], b[48:64, 1])):
        order = logits.argsort(descending=True)[:3]
        w = torch.exp(logits[order] - logits[order].max())
        expected = sum(w[j] / w.sum() * bank[order[j]] for j in range(3))
        assert close(piece, expected, tol=1e-6)


def test_merge_cycle():
    check_merge_cycle(injected(vb()), X)


def test_save_load_save(tmp_path):
    loaded = check_save_load_save(injected(vb()), mlp(), X, tmp_path)
    keys = set(load_file(tmp_path / "first" / "adapter_model.safetensors"))
    assert keys == {"base_model.vblora_vector_bank"} | {f"base_model.model.{m}.vblora_logits_{p}"
                                                        for m in ("fc1", "fc2") for p in "AB"}
    assert not any(p.requires_grad for p in loaded.parameters())


def test_mixed_batch():
    model = injected(vb(), seed=1)
    torch.manual_seed(2)
    lorakit.inject(model, vb(r=2, num_vectors=16, vector_length=32, topk=3), "b")
    perturb(model, "b", seed=2)
    lorakit.set_active(model, ["default"])
    check_mixed_batch(model, X, names=("default", "b"))


def test_planted_task():
    before, after, n = planted_task(vb(targets=["fc1"]), steps=100, lr=2e-2)
    assert n == 32 * 16 + (4 * 64 // 16 + 64 // 16 * 4) * 32
    assert after <= 0.5 * before, (before, after)  # measured 0.0104 → 0.0013


# ---- PEFT ---------------------------------------------------------------------------------------------
CASES = {"mlp": (mlp, X, ["fc1", "fc2"]), "gpt2": (gpt2, inputs("gpt2"), ["c_attn", "c_proj", "c_fc"])}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_files_load_with_equal_outputs_both_ways(tmp_path, case):
    build, x, targets = CASES[case]
    peft_model = peft_trained(build(), VBLoRAConfig(r=4, target_modules=targets, **SMALL, vblora_dropout=0.1))
    check_peft_files_both_ways(peft_model, build, x, tmp_path)


def test_a_config_written_by_lorakit_equals_peft_s(tmp_path):
    model = injected(lorakit.AdapterConfig(r=2, variant="vblora", target_modules=["fc1"], lora_dropout=0.05,
                                           options={**SMALL, "topk": 3, "init_logits_std": 0.2}))
    lorakit.save_adapter(model, tmp_path / "ours")
    peft_model = get_peft_model(mlp(), VBLoRAConfig(r=2, target_modules=["fc1"], topk=3, init_logits_std=0.2,
                                                     vblora_dropout=0.05, **SMALL))
    peft_model.save_pretrained(tmp_path / "peft")
    assert config_meaning(tmp_path / "ours") == config_meaning(tmp_path / "peft")


def test_top_k_only_files_load_and_are_written_as_peft_does(tmp_path):
    """PEFT's compact files (top-k indices + k−1 weights) load with PEFT's outputs; `save_topk` writes the same
    tensors; the compact form loses nothing but rounding (only the top-k logits ever mattered)."""
    peft_model = peft_trained(mlp(), VBLoRAConfig(r=4, target_modules=["fc1", "fc2"], **SMALL, topk=3))
    full = run(peft_model, X)
    peft_model.save_pretrained(tmp_path / "full")
    peft_model.peft_config["default"].save_only_topk_weights = True
    peft_model.save_pretrained(tmp_path / "topk")
    ref = run(PeftModel.from_pretrained(mlp(), str(tmp_path / "topk")), X)

    compact = lorakit.load_adapter(mlp(), tmp_path / "topk")
    assert close(run(compact, X), ref) and close(run(compact, X), full)
    assert lorakit.count_parameters(lorakit.load_adapter(mlp(), tmp_path / "topk", trainable=True))[0] == 32 * 16
    check_merge_cycle(compact, X)
    check_save_load_save(compact, mlp(), X, tmp_path / "again")

    save_topk(lorakit.load_adapter(mlp(), tmp_path / "full"), tmp_path / "ours")
    theirs, mine = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("topk", "ours"))
    assert {k: (t.dtype, t.shape) for k, t in mine.items()} == {k: (t.dtype, t.shape) for k, t in theirs.items()}
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert theirs["base_model.model.fc1.vblora_logits_A_topk_indices"].dtype == torch.uint8
    assert config_meaning(tmp_path / "ours") == config_meaning(tmp_path / "topk")
    assert close(run(PeftModel.from_pretrained(mlp(), str(tmp_path / "ours")), X), ref)


def test_a_top_k_only_adapter_cannot_be_created_for_training():
    model = mlp()
    with pytest.raises(ConfigError, match="save_only_topk_weights.*save_topk"):
        lorakit.inject(model, vb(save_only_topk_weights=True))
    assert lorakit.adapter_names(model) == []


# ---- errors ---------------------------------------------------------------------------------------------
def test_sizes_not_divisible_by_the_vector_length_are_refused_at_inject():
    model = vit()
    with pytest.raises(ConfigError, match=r"vector_length=24.*vit\.layers\.0\.attention\.q_proj.*in=32, out=32"):
        lorakit.inject(model, vb(targets=["q_proj"], vector_length=24))
    assert lorakit.adapter_names(model) == []


@pytest.mark.parametrize("options,name", [({"topk": 0}, "topk"), ({"topk": 33}, "topk"),
                                          ({"num_vectors": 0}, "num_vectors"),
                                          ({"vector_length": 2.0}, "vector_length"),
                                          ({"init_vector_bank_bound": 0.0}, "init_vector_bank_bound"),
                                          ({"init_logits_std": -1}, "init_logits_std"),
                                          ({"save_only_topk_weights": "yes"}, "save_only_topk_weights"),
                                          ({"num_vector": 3}, "num_vector")])
def test_invalid_options_name_the_option(options, name):
    with pytest.raises(ConfigError, match=name):
        vb(**options)


def test_what_the_peft_format_cannot_hold_is_refused():
    with pytest.raises(UnsupportedFeatureError, match="rank_pattern"):
        lorakit.inject(mlp(), lorakit.AdapterConfig(r=4, variant="vblora", target_modules=["fc1"], options=SMALL,
                                                    rank_pattern={"fc1": 2}))
    with pytest.raises(UnsupportedFeatureError, match="bias"):
        lorakit.AdapterConfig.from_dict({"peft_type": "VBLORA", "target_modules": ["fc1"], "bias": "all"})
    with pytest.raises(ConfigError, match="vblora_dropot"):
        lorakit.AdapterConfig.from_dict({"peft_type": "VBLORA", "target_modules": ["fc1"], "vblora_dropot": 0.1})
    minimal = lorakit.AdapterConfig.from_dict({"peft_type": "VBLORA", "target_modules": ["fc1"]})
    assert minimal.r == 4 and minimal.variant == "vblora" and minimal.options["num_vectors"] == 256


# ---- vision and convolutions -------------------------------------------------------------------------------
def test_vit(tmp_path):
    """Attention, MLP and the Conv2d patch embedding of a ViT: merge cycle and save → load → save."""
    config = vb(targets=VIT_TARGETS)
    x = inputs("vit")
    check_merge_cycle(injected(config, model=vit()), x)
    check_save_load_save(injected(config, model=vit()), vit(), x, tmp_path)


def test_conv1d_and_embedding(tmp_path):
    """An Embedding (50 ids → 16: A is r × 50) and a Conv1d (16→24, kernel 3: A is r × 48, the flattened kernel)
    work (PEFT's VB-LoRA has neither): the count follows the formula, merge cycle and save → load → save hold."""
    config = vb(targets=["emb", "conv"], vector_length=2)
    model = injected(config, model=convnet())
    h, b, r = 32, 2, 4
    assert lorakit.count_parameters(model)[0] == h * b + sum((r * n // b + m // b * r) * h
                                                             for m, n in ((16, 50), (24, 48)))
    assert model.conv.adapters["default"].delta_weight().shape == (24, 48)
    ids = inputs("convnet")["input_ids"]
    check_merge_cycle(model, ids)
    check_save_load_save(model, convnet(), ids, tmp_path)
