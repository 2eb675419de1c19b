"""The flat adapter representation (`lorakit.compose.flat`): layout, standardisation and an exact round trip."""
import dataclasses
import json
import math

import pytest
import torch

import lorakit
from lorakit.compose.flat import Layout, Standardiser, flatten, read, stack, unflatten
from lorakit.errors import ConfigError

from contract import perturb
from models import llama


def saved(tmp_path, name, seed=0, dtype=None, r=4, **config):
    """A LoRA on q/v of the tests' Llama (rank 2 on v, rsLoRA), every tensor perturbed, then some tensors scaled by
    1e-6 and 1e4 so the values span many binades; saved to tmp_path/name."""
    model = llama()
    cfg = lorakit.AdapterConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True,
                                rank_pattern={"v_proj": 2}, **config)
    lorakit.inject(model, cfg)
    perturb(model, seed=seed, scale=1.0)
    with torch.no_grad():
        params = list(lorakit.adapter_parameters(model, "default").values())
        params[0].mul_(1e-6)
        params[1].mul_(1e4)
        if dtype is not None:
            for p in params:
                p.data = p.data.to(dtype)
    return lorakit.save_adapter(model, tmp_path / name)


def test_round_trip_is_bit_exact(tmp_path):
    folder = saved(tmp_path, "a")
    flat = flatten(folder)
    assert flat.vector.dtype == torch.float64 and flat.vector.numel() == flat.layout.size
    out = unflatten(flat, tmp_path / "back")
    config, tensors = lorakit.read_adapter(folder)
    config2, tensors2 = lorakit.read_adapter(out)
    assert set(tensors) == set(tensors2) and all(torch.equal(tensors[k], tensors2[k]) for k in tensors)
    assert all(tensors[k].dtype == tensors2[k].dtype for k in tensors)
    assert config2.to_dict() == config.to_dict()
    assert not all(torch.equal(tensors[k], torch.zeros_like(tensors[k])) for k in tensors)
    # standardised per tensor: mean 0, std 1 within each tensor
    segments = flat.layout.segments()
    for i in range(len(flat.layout.keys)):
        part = flat.vector[segments == i]
        assert abs(part.mean().item()) < 1e-9 and abs(part.std(correction=0).item() - 1) < 1e-9


def test_bf16_and_zero_tensors_round_trip(tmp_path):
    folder = saved(tmp_path, "bf16", dtype=torch.bfloat16)
    _, tensors = lorakit.read_adapter(unflatten(flatten(folder), tmp_path / "back"))
    _, want = lorakit.read_adapter(folder)
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, want[k]) for k, t in tensors.items())
    model = lorakit.inject(llama(), lorakit.AdapterConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    fresh = lorakit.save_adapter(model, tmp_path / "fresh")  # B = 0: a std of 0
    flat = flatten(fresh)
    assert torch.isfinite(flat.vector).all()
    _, back = lorakit.read_adapter(unflatten(flat, tmp_path / "fresh-back"))
    _, want = lorakit.read_adapter(fresh)
    assert all(torch.equal(back[k], want[k]) for k in want)


def test_layout_keeps_ranks_and_scales(tmp_path):
    layout, raw = read(saved(tmp_path, "a"))
    q = [p for p in layout.ranks if p.endswith("q_proj")]
    v = [p for p in layout.ranks if p.endswith("v_proj")]
    assert len(q) == len(v) == 2
    assert all(layout.ranks[p] == 4 and layout.scales[p] == pytest.approx(8 / math.sqrt(4)) for p in q)
    assert all(layout.ranks[p] == 2 and layout.scales[p] == pytest.approx(8 / math.sqrt(2)) for p in v)
    sizes = {k: math.prod(s) for k, s in zip(layout.keys, layout.shapes)}
    assert layout.size == sum(sizes.values()) == raw.numel()
    assert list(layout.keys) == sorted(layout.keys)


def test_pooled_statistics_and_a_generated_vector_loads_with_the_layouts_shapes_and_scales(tmp_path):
    folders = [saved(tmp_path, f"s{i}", seed=i) for i in range(3)]
    layout, raws = stack(folders)
    std = Standardiser.pooled(layout, raws)
    z = std.standardise(raws)
    segments = layout.segments()
    for i in range(len(layout.keys)):
        part = z[:, segments == i]
        assert abs(part.mean().item()) < 1e-9 and abs(part.std(correction=0).item() - 1) < 1e-9
    for k in range(3):  # exact with pooled statistics too
        flat = flatten(folders[k], std)
        back = lorakit.read_adapter(unflatten(flat, tmp_path / f"back{k}"))[1]
        want = lorakit.read_adapter(folders[k])[1]
        assert all(torch.equal(back[key], want[key]) for key in want)
    generated = dataclasses.replace(flat, vector=z.mean(0) + 0.1 * torch.randn(layout.size, dtype=torch.float64))
    out = unflatten(generated, tmp_path / "generated")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["rank_pattern"] == {"v_proj": 2} and config["lora_alpha"] == 8
    model = lorakit.load_adapter(llama(), out)
    for path, layer in lorakit.model.wrappers(model):
        v = layer.adapters["default"]
        assert v.r == layout.ranks[path] and v.scale == pytest.approx(layout.scales[path])


def test_layout_mismatches_are_refused(tmp_path):
    a = saved(tmp_path, "a")
    b = saved(tmp_path, "b", r=8)
    with pytest.raises(ConfigError, match="differ"):
        stack([a, b])
    layout, raws = stack([a])
    with pytest.raises(ConfigError, match="differ"):
        flatten(b, Standardiser.pooled(layout, raws))
    with pytest.raises(ConfigError, match="values"):
        layout.tensors(torch.zeros(layout.size + 1))
    with pytest.raises(ConfigError, match="missing"):
        layout.raw({})
    assert Layout.of(*lorakit.read_adapter(a)).matches(layout)
