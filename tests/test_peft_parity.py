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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

import lorakit  # noqa: E402
from lorakit.layers import AdaptedLayer  # noqa: E402
from models import build, forward  # noqa: E402

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
    """(model, variant) → (folder of a PEFT save of a perturbed adapter, PEFT's output on the inputs)."""
    cache = {}

    def get(model_name: str, variant: str):
        if (model_name, variant) not in cache:
            base, batch = build(model_name)
            pm = get_peft_model(base, peft_config(SPECS[model_name], variant, init_lora_weights=False)).eval()
            perturb(peft_adapter_tensors(pm), seed=1)
            folder = tmp_path_factory.mktemp(f"peft-{model_name}-{variant}")
            pm.save_pretrained(folder)
            cache[model_name, variant] = folder, forward(pm, batch)
        return cache[model_name, variant]

    return get


# ---- 1. outputs, both directions --------------------------------------------------------------------
@pytest.mark.parametrize("model_name,variant", CASES, ids=CASE_IDS)
def test_peft_to_lorakit(peft_saved, model_name, variant):
    folder, ref = peft_saved(model_name, variant)
    model, batch = build(model_name)
    base_out = forward(model, batch)
    lorakit.load_adapter(model, folder)
    check_nontrivial(model, ref, base_out, variant)
    assert_close(forward(model, batch), ref)


@pytest.mark.parametrize("model_name,variant", CASES, ids=CASE_IDS)
def test_lorakit_to_peft(tmp_path, model_name, variant):
    model, batch = build(model_name)
    base_out = forward(model, batch)
    lorakit.inject(model, lorakit_config(SPECS[model_name], variant, init_lora_weights=False))
    model.eval()
    perturb(lorakit.adapter_parameters(model, "default").values(), seed=2)
    ours = forward(model, batch)
    check_nontrivial(model, ours, base_out, variant)
    lorakit.save_adapter(model, tmp_path)
    pm = PeftModel.from_pretrained(build(model_name)[0], tmp_path).eval()
    # PEFT must have used our ranks and scales, not fallen back to its defaults
    assert adapted_by_peft(pm) == adapted_by_lorakit(model)
    assert_close(ours, forward(pm, batch))


# ---- 2. files ---------------------------------------------------------------------------------------
def file_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, WEIGHTS))


@pytest.mark.parametrize("model_name,variant", CASES, ids=CASE_IDS)
def test_files_match_peft(peft_saved, tmp_path, model_name, variant):
    """Same keys, shapes and metadata as PEFT; PEFT → ours is lossless; save → load → save is bit-exact."""
    peft_dir, _ = peft_saved(model_name, variant)
    model = build(model_name)[0]
    lorakit.load_adapter(model, peft_dir)
    ours_dir = lorakit.save_adapter(model, tmp_path / "ours")

    theirs, ours = file_tensors(peft_dir), file_tensors(ours_dir)
    assert all(k.startswith(PREFIX) for k in ours)
    assert {k: tuple(t.shape) for k, t in ours.items()} == {k: tuple(t.shape) for k, t in theirs.items()}
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in theirs)
    with safe_open(os.path.join(ours_dir, WEIGHTS), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    peft_json = json.loads((peft_dir / CONFIG).read_text())
    our_json = json.loads((ours_dir / CONFIG).read_text())
    assert set(our_json) == set(peft_json)
    assert our_json["peft_type"] == "LORA" and our_json["use_dora"] == ("dora" in variant)

    again = build(model_name)[0]
    lorakit.load_adapter(again, ours_dir)
    again_dir = lorakit.save_adapter(again, tmp_path / "again")
    twice = file_tensors(again_dir)
    assert set(twice) == set(ours)
    assert all(torch.equal(twice[k], ours[k]) for k in ours)
    assert json.loads((again_dir / CONFIG).read_text()) == our_json


# ---- 3. bf16 base, fp32 adapters --------------------------------------------------------------------
BF16_ULP = 2.0 ** -7  # spacing of bf16 numbers in [1, 2); relative precision of one rounding is half that


@pytest.mark.parametrize("variant", ["lora", "dora_rslora"])
def test_bf16_base_matches_peft(tmp_path, variant):
    """Both keep adapters fp32 on a bf16 Llama; logits agree to a few bf16 ulps of the logit scale.

    The two sides round the same bf16 activations the same way except where their fp32 adapter math
    differs in the last fp32 bits and a bf16 rounding boundary lies in between; such flips propagate
    through 2 layers, so allow 4 ulps at the logits' magnitude.
    """
    spec = SPECS["llama"]
    base, batch = build("llama")
    base = base.to(torch.bfloat16)
    pm = get_peft_model(base, peft_config(spec, variant, init_lora_weights=False)).eval()
    adapters = peft_adapter_tensors(pm)
    assert adapters and all(p.dtype == torch.float32 for p in adapters)
    perturb(adapters, seed=3)
    pm.save_pretrained(tmp_path)
    ref = forward(pm, batch)
    assert ref.dtype == torch.bfloat16

    model = build("llama")[0].to(torch.bfloat16)
    base_out = forward(model, batch)
    lorakit.load_adapter(model, tmp_path)
    params = lorakit.adapter_parameters(model, "default")
    assert all(t.dtype == torch.float32 for t in params.values())
    ours = forward(model, batch)
    assert ours.dtype == torch.bfloat16
    scale = max(1.0, ref.float().abs().max().item())
    assert (ref.float() - base_out.float()).abs().max() > 50 * BF16_ULP * scale
    err = (ours.float() - ref.float()).abs().max().item()
    assert err <= 4 * BF16_ULP * scale, f"bf16: max|ours - peft| = {err:.3g}, scale {scale:.3g}"

    lorakit.save_adapter(model, tmp_path / "ours")
    assert all(t.dtype == torch.float32 for t in file_tensors(tmp_path / "ours").values())


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
    for path, (r, scale) in theirs.items():
        want = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
        if scale != want:  # an alpha pattern applied: make sure the case exercises it
            assert cfg.get("alpha_pattern")
