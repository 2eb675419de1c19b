"""Parity with PEFT 0.21.2 (test-only reference): outputs both ways, file format, bf16 bases, targeting.

Adapters are non-trivial: built with `init_lora_weights=False` (B ≠ 0) and then every adapter tensor,
DoRA magnitudes and `modules_to_save` copies included, is randomly rescaled so m ≠ ‖W + sBA‖.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from models import build, forward  # sets HF_HUB_OFFLINE
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

import lorakit
from lorakit.layers import AdaptedLayer

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
PREFIX = "base_model.model."

VARIANTS = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "dora_rslora": {"use_dora": True, "use_rslora": True},
}
# One adapter config per model: alpha != r everywhere, rank/alpha patterns on several of them.
SPECS = {
    "llama": dict(r=4, lora_alpha=12, task_type="CAUSAL_LM",
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                  rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6}, alpha_pattern={"o_proj": 5}),
    "minilm": dict(r=4, lora_alpha=10, task_type="SEQ_CLS", target_modules=["query", "value", "dense"],
                   modules_to_save=["classifier"], rank_pattern={"intermediate.dense": 3}),
    "gpt2": dict(r=4, lora_alpha=6, task_type="CAUSAL_LM", target_modules=["c_attn", "c_proj", "c_fc"],
                 fan_in_fan_out=True, alpha_pattern={r"h\.1\.mlp\.c_fc": 2}),
    "convnet": dict(r=3, lora_alpha=7, target_modules=["emb", "conv", "conv2d", "head"],
                    rank_pattern={"conv2d": 2}),
}
CASES = [(m, v) for m in SPECS for v in VARIANTS]
CASE_IDS = [f"{m}-{v}" for m, v in CASES]


def tol(ref: torch.Tensor, rel: float = 1e-5) -> float:
    return rel * max(1.0, ref.abs().max().item())


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> float:
    err = (ours.float() - ref.float()).abs().max().item()
    assert err <= tol(ref, rel), f"max|ours - peft| = {err:.3g} > {tol(ref, rel):.3g}"
    return err


def perturb(tensors, seed: int = 0) -> None:
    """Rescale each tensor elementwise by U(0.5, 1.5) and add small noise: m drifts from ‖W + sBA‖."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            if t.is_floating_point():
                t.mul_(0.5 + torch.rand(t.shape, generator=g, dtype=t.dtype))
                t.add_(0.05 * t.abs().mean() * torch.randn(t.shape, generator=g, dtype=t.dtype))


def peft_adapter_tensors(model):
    return [p for n, p in model.named_parameters() if "lora_" in n or ".modules_to_save." in n]


def lorakit_config(spec: dict, variant: str, **extra) -> lorakit.AdapterConfig:
    return lorakit.AdapterConfig(**spec, **VARIANTS[variant], **extra)


def peft_config(spec: dict, variant: str, **extra) -> LoraConfig:
    return LoraConfig(**spec, **VARIANTS[variant], **extra)


def check_nontrivial(model, ref_out: torch.Tensor, base_out: torch.Tensor, variant: str) -> None:
    """The adapter visibly changes outputs, and DoRA magnitudes are not the init value ‖W + sBA‖."""
    assert (ref_out - base_out).abs().max() > 100 * tol(ref_out), "adapter has (almost) no effect"
    if "dora" in variant:
        dora = [v for m in model.modules() if isinstance(m, AdaptedLayer) for v in m.adapters.values()]
        assert dora
        for v in dora:
            m, norm = v.lora_magnitude_vector.detach().flatten(), v.weight_norm()
            assert ((m - norm).abs() / norm).max() > 0.05


# ---- PEFT saves, shared by the output and file tests ----------------------------------------------
@pytest.fixture(scope="module")
def peft_saved(tmp_path_factory):
    """(model, variant) → (folder of a PEFT save of a perturbed adapter, PEFT's output, PEFT's ranks/scales)."""
    cache = {}

    def get(model_name: str, variant: str):
        if (model_name, variant) not in cache:
            base, batch = build(model_name)
            pm = get_peft_model(base, peft_config(SPECS[model_name], variant, init_lora_weights=False)).eval()
            perturb(peft_adapter_tensors(pm), seed=1)
            folder = tmp_path_factory.mktemp(f"peft-{model_name}-{variant}")
            pm.save_pretrained(folder)
            cache[model_name, variant] = folder, forward(pm, batch), adapted_by_peft(pm)
        return cache[model_name, variant]

    return get


# ---- 1. outputs, both directions --------------------------------------------------------------------
@pytest.mark.parametrize("model_name,variant", CASES, ids=CASE_IDS)
def test_peft_to_lorakit(peft_saved, model_name, variant):
    folder, ref, peft_layers = peft_saved(model_name, variant)
    model, batch = build(model_name)
    base_out = forward(model, batch)
    lorakit.load_adapter(model, folder)
    assert adapted_by_lorakit(model) == peft_layers
    check_nontrivial(model, ref, base_out, variant)
    assert_close(forward(model, batch), ref)


@pytest.mark.parametrize("model_name,variant", CASES, ids=CASE_IDS)
def test_lorakit_to_peft(peft_saved, tmp_path, model_name, variant):
    model, batch = build(model_name)
    base_out = forward(model, batch)
    lorakit.inject(model, lorakit_config(SPECS[model_name], variant, init_lora_weights=False))
    model.eval()
    perturb(lorakit.adapter_parameters(model, "default").values(), seed=2)
    ours = forward(model, batch)
    check_nontrivial(model, ours, base_out, variant)
    lorakit.save_adapter(model, tmp_path)
    peft_dir = peft_saved(model_name, variant)[0]  # PEFT's save of the same config
    assert shapes(file_tensors(tmp_path)) == shapes(file_tensors(peft_dir))
    assert config_meaning(tmp_path) == config_meaning(peft_dir)
    pm = PeftModel.from_pretrained(build(model_name)[0], tmp_path).eval()
    # PEFT must have used our ranks and scales, not fallen back to its defaults
    assert adapted_by_peft(pm) == adapted_by_lorakit(model)
    assert_close(ours, forward(pm, batch))


# ---- 2. files ---------------------------------------------------------------------------------------
def file_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, WEIGHTS))


def shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}


def config_meaning(folder) -> dict:
    """adapter_config.json without provenance keys, name lists as sets (PEFT writes sets in any order)."""
    data = json.loads((folder / CONFIG).read_text())
    for key in ("auto_mapping", "base_model_name_or_path"):  # provenance only; PEFT fills them from the model
        data.pop(key)
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(data[key], list):
            data[key] = set(data[key])
    return data


@pytest.mark.parametrize("model_name,variant", CASES, ids=CASE_IDS)
def test_files_match_peft(peft_saved, tmp_path, model_name, variant):
    """Same keys, shapes and metadata as PEFT; PEFT → ours is lossless; save → load → save is bit-exact."""
    peft_dir = peft_saved(model_name, variant)[0]
    model = build(model_name)[0]
    lorakit.load_adapter(model, peft_dir)
    ours_dir = lorakit.save_adapter(model, tmp_path / "ours")

    theirs, ours = file_tensors(peft_dir), file_tensors(ours_dir)
    assert all(k.startswith(PREFIX) for k in ours)
    assert shapes(ours) == shapes(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    with safe_open(os.path.join(ours_dir, WEIGHTS), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    peft_json = json.loads((peft_dir / CONFIG).read_text())
    our_json = json.loads((ours_dir / CONFIG).read_text())
    assert set(our_json) == set(peft_json)
    assert config_meaning(ours_dir) == config_meaning(peft_dir)
    assert our_json["peft_type"] == "LORA" and our_json["use_dora"] == ("dora" in variant)

    again = build(model_name)[0]
    lorakit.load_adapter(again, ours_dir)
    again_dir = lorakit.save_adapter(again, tmp_path / "again")
    twice = file_tensors(again_dir)
    assert set(twice) == set(ours)
    assert all(torch.equal(twice[k], ours[k]) for k in ours)
    assert json.loads((again_dir / CONFIG).read_text()) == our_json


# ---- 3. bf16 base, fp32 adapters --------------------------------------------------------------------
BF16_ULP = 2.0 ** -7  # spacing of bf16 numbers in [1, 2)


def assert_bf16_close(ours: torch.Tensor, ref: torch.Tensor, base_out: torch.Tensor) -> None:
    """Logits agree within 8 bf16 ulps of their scale, while the adapter moves them ≥ 50 ulps (measured: effect
    98-137 ulps, difference 1.5-4.9 ulps; a wrong scale or factor would differ by tens of ulps).

    Both keep fp32 adapter weights on the bf16 base; PEFT runs the adapter matmuls in fp32, lorakit in bf16
    (autocast, as mixed-precision training does; fp32 adapter math adds 58-342 % to a bf16 layer). Rounding x, A and B to bf16
    (relative 2^-8 each) moves the adapter's output by a few bf16 ulps, which 2 layers carry to the logits.
    """
    assert ours.dtype == ref.dtype == torch.bfloat16
    scale = max(1.0, ref.float().abs().max().item())
    assert (ref.float() - base_out.float()).abs().max() > 50 * BF16_ULP * scale, "adapter has no effect"
    err = (ours.float() - ref.float()).abs().max().item()
    assert err <= 8 * BF16_ULP * scale, f"bf16: max|ours - peft| = {err:.3g}, scale {scale:.3g}"


def bf16_llama():
    model, batch = build("llama")
    return model.to(torch.bfloat16), batch


@pytest.mark.parametrize("variant", ["lora", "dora_rslora"])
def test_bf16_base_peft_to_lorakit(tmp_path, variant):
    """PEFT and lorakit both keep adapters fp32 on a bf16 Llama (in memory and in the file)."""
    base, batch = bf16_llama()
    pm = get_peft_model(base, peft_config(SPECS["llama"], variant, init_lora_weights=False)).eval()
    adapters = peft_adapter_tensors(pm)
    assert adapters and all(p.dtype == torch.float32 for p in adapters)
    perturb(adapters, seed=3)
    pm.save_pretrained(tmp_path)
    ref = forward(pm, batch)

    model = bf16_llama()[0]
    base_out = forward(model, batch)
    lorakit.load_adapter(model, tmp_path)
    assert all(t.dtype == torch.float32 for t in lorakit.adapter_parameters(model, "default").values())
    assert_bf16_close(forward(model, batch), ref, base_out)
    lorakit.save_adapter(model, tmp_path / "ours")
    assert all(t.dtype == torch.float32 for t in file_tensors(tmp_path / "ours").values())


@pytest.mark.parametrize("variant", ["lora", "dora_rslora"])
def test_bf16_base_lorakit_to_peft(tmp_path, variant):
    model, batch = bf16_llama()
    base_out = forward(model, batch)
    lorakit.inject(model, lorakit_config(SPECS["llama"], variant, init_lora_weights=False))
    params = lorakit.adapter_parameters(model, "default")
    assert all(t.dtype == torch.float32 for t in params.values())
    perturb(params.values(), seed=4)
    lorakit.save_adapter(model, tmp_path)
    pm = PeftModel.from_pretrained(bf16_llama()[0], tmp_path).eval()
    assert all(p.dtype == torch.float32 for p in peft_adapter_tensors(pm))
    assert_bf16_close(forward(model.eval(), batch), forward(pm, batch), base_out)


# ---- 4. targeting -----------------------------------------------------------------------------------
def adapted_by_peft(peft_model) -> dict[str, tuple[int, float]]:
    out = {}
    for path, m in peft_model.named_modules():
        if isinstance(m, LoraLayer) and "default" in m.r:
            out[path.removeprefix(PREFIX)] = (m.r["default"], float(m.scaling["default"]))
    return out


def adapted_by_lorakit(model) -> dict[str, tuple[int, float]]:
    return {path: (m.adapters["default"].r, float(m.adapters["default"].scale))
            for path, m in model.named_modules() if isinstance(m, AdaptedLayer) and "default" in m.adapters}


TARGETING = {
    "suffix-list": ("llama", dict(target_modules=["q_proj", "v_proj"])),
    "dotted-suffix": ("llama", dict(target_modules=["self_attn.q_proj", "layers.1.mlp.up_proj"])),
    "regex": ("llama", dict(target_modules=r".*\.(q|k)_proj")),
    "regex-layer": ("llama", dict(target_modules=r"model\.layers\.1\..*_proj")),
    "default-targets": ("llama", dict(target_modules=None)),
    "all-linear-llama": ("llama", dict(target_modules="all-linear", task_type="CAUSAL_LM")),
    "all-linear-gpt2": ("gpt2", dict(target_modules="all-linear", task_type="CAUSAL_LM")),
    "all-linear-minilm-seqcls": ("minilm", dict(target_modules="all-linear", task_type="SEQ_CLS")),
    "exclude-list": ("llama", dict(target_modules="all-linear", exclude_modules=["o_proj", "layers.0.mlp.up_proj"])),
    "exclude-regex": ("llama", dict(target_modules=["q_proj", "down_proj"], exclude_modules=r".*layers\.1\..*")),
    "layers-int": ("llama", dict(target_modules=["q_proj", "gate_proj"], layers_to_transform=1)),
    "layers-list": ("llama", dict(target_modules=["k_proj", "up_proj"], layers_to_transform=[0])),
    "layers-pattern": ("llama", dict(target_modules=["v_proj"], layers_to_transform=[1], layers_pattern="layers")),
    "layers-pattern-list": ("llama", dict(target_modules=["v_proj", "o_proj"], layers_to_transform=0,
                                          layers_pattern=["layers"])),
    "layers-gpt2": ("gpt2", dict(target_modules=["c_attn", "c_fc"], layers_to_transform=[1], layers_pattern="h")),
    "layers-minilm": ("minilm", dict(target_modules=["query", "dense"], layers_to_transform=[0, 5],
                                     layers_pattern="layer")),
    "rank-alpha-patterns": ("llama", dict(
        target_modules="all-linear", use_rslora=True,
        rank_pattern={r"layers\.0\.self_attn\.(q|k)_proj": 2, "v_proj": 6, r"mlp\.up_proj": 5},
        alpha_pattern={r".*\.mlp\..*": 3, "q_proj": 7, r"model\.layers\.1\.self_attn\.k_proj": 11})),
    "pattern-first-key-wins": ("llama", dict(
        target_modules=["q_proj", "k_proj"], rank_pattern={"q_proj": 2, r"layers\.0\.self_attn\.q_proj": 6},
        alpha_pattern={r"layers\.1\..*": 9, "k_proj": 1})),
    "convnet": ("convnet", dict(target_modules=["emb", "conv", "head"], rank_pattern={"emb": 5})),
    # PEFT skips the layer filter for a target given as its exact module path
    "exact-path-skips-layers": ("llama", dict(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"],
                                              layers_to_transform=[1])),
    # no layers_pattern: the first numbered segment after at least two names (root-level `blocks.N` never counts)
    "nested-first-number": ("nested", dict(target_modules=["proj", "mlp.2"], layers_to_transform=[1])),
    "nested-pattern-root": ("nested", dict(target_modules=["proj", "mlp.0"], layers_to_transform=0,
                                           layers_pattern="blocks")),
    "nested-pattern-list": ("nested", dict(target_modules=["proj", "mlp.2"], layers_to_transform=[1, 2],
                                           layers_pattern=["blocks", "layers"])),
    "nested-regex-patterns": ("nested", dict(target_modules=r".*mlp\.(0|2)",
                                             rank_pattern={r"blocks\.\d\.mlp\.0": 2},
                                             alpha_pattern={r"tower\..*\.2": 3})),
}


@pytest.mark.parametrize("case", list(TARGETING))
def test_targeting_matches_peft(case):
    """Same adapted module paths, and the same rank and scale on each, as PEFT for the same config."""
    model_name, cfg = TARGETING[case]
    cfg = {"r": 4, "lora_alpha": 8, **cfg}
    theirs = adapted_by_peft(get_peft_model(build(model_name)[0], LoraConfig(**cfg)))
    ours = adapted_by_lorakit(lorakit.inject(build(model_name)[0], lorakit.AdapterConfig(**cfg)))
    assert theirs, "case selects nothing in PEFT"
    assert ours == theirs
    if cfg.get("rank_pattern"):  # the patterns are exercised, not silently matching nothing
        assert any(r != cfg["r"] for r, _ in theirs.values())
    if cfg.get("alpha_pattern"):
        assert any(s != cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
                   for r, s in theirs.values())


@pytest.mark.parametrize("case", [c for c in TARGETING if TARGETING[c][1].get("target_modules") in (None, "all-linear")])
def test_saved_targets_match_peft(case, tmp_path):
    """For "all-linear" and model defaults the file records the same module names as PEFT's."""
    model_name, cfg = TARGETING[case]
    peft_model = get_peft_model(build(model_name)[0], LoraConfig(r=4, **cfg))
    peft_model.save_pretrained(tmp_path / "peft")
    ours = lorakit.inject(build(model_name)[0], lorakit.AdapterConfig(r=4, **cfg))
    lorakit.save_adapter(ours, tmp_path / "ours")
    saved = [json.loads((tmp_path / d / "adapter_config.json").read_text())["target_modules"] for d in ("peft", "ours")]
    assert sorted(saved[0]) == sorted(saved[1])


REFUSED = {
    "nothing-matches": ("llama", dict(target_modules=["nope"])),
    "regex-with-layers": ("llama", dict(target_modules=r".*q_proj", layers_to_transform=[0])),
    "all-linear-with-layers": ("llama", dict(target_modules="all-linear", layers_to_transform=0)),
    "layers-select-nothing": ("llama", dict(target_modules=["q_proj"], layers_to_transform=[5])),
    "root-list-without-pattern": ("nested", dict(target_modules=["mlp.0", "proj"], layers_to_transform=[0],
                                                 exclude_modules=r"tower\..*")),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_targeting_refused_like_peft(case):
    """Configs PEFT refuses (bad combination, or nothing selected) raise a lorakit error too."""
    model_name, cfg = REFUSED[case]
    with pytest.raises(ValueError):
        get_peft_model(build(model_name)[0], LoraConfig(r=4, **cfg))
    with pytest.raises(lorakit.errors.LorakitError):
        lorakit.inject(build(model_name)[0], lorakit.AdapterConfig(r=4, **cfg))
