"""Interference between adapters (issue 21): principal angles, the factored ΔW cosine, sign conflicts by hand, and
the pairwise report of adapter folders."""
import math

import pytest
import torch

import lorakit
from lorakit.analysis.interference import interference, layer_interference, principal_angles, sign_conflict
from lorakit.errors import ConfigError

from contract import injected

pytestmark = pytest.mark.usefixtures("one_thread_module")


def test_principal_angles_known_cases():
    e = torch.eye(4, dtype=torch.float64)
    assert torch.allclose(principal_angles(e[:, :2], e[:, :2]), torch.zeros(2, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(principal_angles(e[:, :2], e[:, 2:]), torch.full((2,), 90.0, dtype=torch.float64))
    tilted = torch.stack([torch.tensor([math.cos(math.radians(30)), 0, math.sin(math.radians(30)), 0]),
                          torch.tensor([0, 1.0, 0, 0])], 1).double()
    assert torch.allclose(principal_angles(e[:, :2], tilted), torch.tensor([0.0, 30.0], dtype=torch.float64),
                          atol=1e-5)


def test_sign_conflict_by_hand():
    d1 = torch.tensor([[1.0, -2.0, 0.0], [4.0, 0.5, -3.0]])
    d2 = torch.tensor([[2.0, 1.0, 5.0], [-1.0, 0.0, -0.1]])
    # both non-zero at (0,0) +/+, (0,1) -/+, (1,0) +/-, (1,2) -/-: 2 conflicts of 4
    # top third by magnitude: d1 keeps 4, -3 (2 of 6); d2 keeps 5, 2; no entry kept by both → 0
    assert sign_conflict(d1, d2, density=1 / 3) == (0.5, 0.0)
    # top half: d1 keeps 4, -3, -2; d2 keeps 5, 2, 1 (ties at 1: >= keeps (0,1) and (1,0)) → both keep (0,1), (1,0)
    share, top = sign_conflict(d1, d2, density=0.5)
    assert share == 0.5 and top == 1.0


def test_layer_numbers_equal_dense_computations():
    g = torch.Generator().manual_seed(0)
    a1, b1 = torch.randn(3, 20, generator=g), torch.randn(16, 3, generator=g)
    a2, b2 = torch.randn(5, 20, generator=g), torch.randn(16, 5, generator=g)
    row = layer_interference((a1, b1, 0.5), (a2, b2, 2.0))
    d1, d2 = 0.5 * b1 @ a1, 2.0 * b2 @ a2
    assert row["cosine"] == pytest.approx(float((d1 * d2).sum() / (d1.norm() * d2.norm())), rel=1e-5)
    q1, _ = torch.linalg.qr(b1.double())
    q2, _ = torch.linalg.qr(b2.double())
    cos = torch.linalg.svdvals(q1.T @ q2).clamp(max=1)
    assert row["out_angles"] == pytest.approx(torch.rad2deg(torch.arccos(cos)).tolist(), abs=1e-4)
    assert row["out_overlap"] == pytest.approx(float(cos.pow(2).mean()), rel=1e-6)
    same = layer_interference((a1, b1, 1.0), (a1, b1, 3.0))
    assert same["cosine"] == pytest.approx(1.0) and same["sign_conflict"] == 0.0
    assert same["out_overlap"] == pytest.approx(1.0) and same["in_overlap"] == pytest.approx(1.0)
    flipped = layer_interference((a1, b1, 1.0), (a1, -b1, 1.0))
    assert flipped["cosine"] == pytest.approx(-1.0) and flipped["sign_conflict"] == 1.0


def test_folder_pairs(tmp_path):
    folders = {}
    for name, seed, targets in (("a", 1, ["fc1", "fc2"]), ("b", 2, ["fc1"]), ("c", 3, ["fc1", "fc2"])):
        model = injected(lorakit.AdapterConfig(r=4, target_modules=targets, init_lora_weights=False), seed=seed)
        lorakit.save_adapter(model, tmp_path / name)
        folders[name] = tmp_path / name
    report = interference(folders)
    assert [(p["first"], p["second"]) for p in report["pairs"]] == [("a", "b"), ("a", "c"), ("b", "c")]
    assert list(report["pairs"][0]["layers"]) == ["fc1"] and report["pairs"][1]["summary"]["layers"] == 2
    assert -1 <= report["pairs"][1]["summary"]["cosine"] <= 1
    with pytest.raises(ConfigError, match="at least two"):
        interference({"a": folders["a"]})
    dora = injected(lorakit.AdapterConfig(r=4, use_dora=True, target_modules=["fc1"]), seed=4)
    lorakit.save_adapter(dora, tmp_path / "d")
    with pytest.raises(ConfigError, match="plain LoRA"):
        interference({"a": folders["a"], "d": tmp_path / "d"})
