"""Intruder dimensions (issue 21): a planted intruder is found, a ΔW inside the base's top singular subspace has
none, the cached base SVD, the power-law fit, and the mitigation's exact arithmetic and re-projection error."""
import math

import pytest
import torch
from peft import PeftModel

import lorakit
from lorakit.analysis.intruders import (adapter_intruders, base_svd, layer_intruders, powerlaw_alpha,
                                        reduce_intruders, weight_intruders)
from lorakit.errors import ConfigError

from contract import close, mlp, run

pytestmark = pytest.mark.usefixtures("one_thread_module")


def base_matrix(m=64, n=48, seed=0):
    """A weight with a decaying spectrum (σ_i = 1/(1 + i/4))."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = 1 / (1 + torch.arange(n, dtype=torch.float64) / 4)
    return (u * s) @ v.T


def test_a_planted_intruder_is_found_and_an_aligned_update_has_none():
    w0 = base_matrix()
    u0, s0, vh0 = torch.linalg.svd(w0, full_matrices=False)
    g = torch.Generator().manual_seed(1)
    direction = torch.randn(64, generator=g, dtype=torch.float64)
    direction -= u0 @ (u0.T @ direction)  # outside the base's column space: |cos| with every u0_i is 0
    direction /= direction.norm()
    planted = 3.0 * torch.outer(direction, vh0[-1])  # σ 3 > σ₁ = 1: the new top direction
    result = layer_intruders(base_svd(w0), w0 + planted)
    # the top direction is (3·direction + σ_min·u0_last)/‖·‖: its best |cos| with the base is σ_min/3 ≈ 0.026
    assert result["intruders"] == 1 and result["indices"] == [0] and result["cos"][0] < 0.03
    assert result["sweep"][0.1] == 1 and result["sweep"][0.9] >= 1
    aligned = (u0[:, :4] * torch.tensor([0.5, 0.3, 0.2, 0.1], dtype=torch.float64)) @ vh0[:4]
    clean = layer_intruders(base_svd(w0), w0 + aligned)
    assert clean["intruders"] == 0 and min(clean["cos"]) > 0.99
    assert clean["stable_rank_base"] == pytest.approx(float((s0 ** 2).sum() / s0[0] ** 2))


def test_base_svd_cache_round_trip(tmp_path):
    w0 = base_matrix().float()
    u, s = base_svd(w0, tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    u2, s2 = base_svd(w0, tmp_path)  # read back (U in fp16)
    assert torch.equal(s, s2) and (u - u2).abs().max() < 1e-3
    base_svd(w0 + 1e-3, tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # another weight, another entry


def test_powerlaw_alpha_recovers_a_pareto_exponent():
    g = torch.Generator().manual_seed(0)
    for alpha in (2.0, 3.5):
        eig = (1 - torch.rand(3000, generator=g, dtype=torch.float64)).pow(-1 / (alpha - 1))  # density ∝ λ^-α
        fit = powerlaw_alpha(eig.sqrt())
        assert fit["alpha"] == pytest.approx(alpha, abs=0.15) and fit["ks"] < 0.05
    assert math.isnan(powerlaw_alpha(torch.ones(5))["alpha"])


def planted_lora(seed=0):
    """The test MLP with a rank-4 LoRA on fc1 whose top direction is outside fc1's weight's leading subspace."""
    model = mlp()
    lorakit.inject(model, lorakit.AdapterConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"],
                                                init_lora_weights=False))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for path in ("fc1", "fc2"):
            v = model.get_submodule(path).adapters["default"]
            v.lora_A.copy_(torch.randn(4, 64, generator=g) / 8)
            v.lora_B.copy_(torch.randn(64, 4, generator=g) * (4.0 if path == "fc1" else 0.02))
    return model


def test_adapter_intruders_match_the_layer_function():
    model = planted_lora()
    found = adapter_intruders(model, progress=False)
    assert set(found) == {"fc1", "fc2"}
    w0 = mlp().fc1.weight.detach()
    dw = model.fc1.adapters["default"].delta_weight().detach()
    assert found["fc1"] == layer_intruders(base_svd(w0), w0 + dw)
    assert found["fc1"]["intruders"] >= 1 and found["fc2"]["intruders"] == 0  # fc2's update is tiny
    tuned = mlp()
    with torch.no_grad():
        tuned.fc1.weight.add_(dw)
    assert weight_intruders(mlp(), tuned, ["fc1"], progress=False)["fc1"] == found["fc1"]
    with pytest.raises(ConfigError, match="missing"):
        weight_intruders(mlp(), tuned, ["fc3"], progress=False)


def expected_mitigated(model, path, lam, k=10, eps=0.5):
    w0 = mlp().get_submodule(path).weight.detach().double()
    dw = model.get_submodule(path).adapters["default"].delta_weight().detach().double()
    u, s, vh = torch.linalg.svd(w0 + dw, full_matrices=False)
    u0, _, _ = torch.linalg.svd(w0, full_matrices=False)
    idx = [j for j in range(k) if (u[:, j] @ u0).abs().max() < eps]
    return dw - (1 - lam) * (u[:, idx] * s[idx]) @ vh[idx], len(idx)


def test_reduce_intruders_exact_and_reprojected(tmp_path):
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    model = planted_lora()
    target, n = expected_mitigated(model, "fc1", 0.75)
    assert n >= 1
    report = reduce_intruders(model, lam=0.75, keep_rank=False, new_name="exact", progress=False)
    assert report["fc1"]["intruders"] == n and report["fc1"]["rank"] == 4 + n
    assert report["fc1"]["reprojection_error"] < 1e-6 and report["fc2"]["intruders"] == 0
    assert lorakit.active_adapters(model) == ["exact"] and "default" in lorakit.adapter_names(model)
    got = model.fc1.adapters["exact"].delta_weight().detach().double()
    assert (got - target).norm() / target.norm() < 1e-5
    report = reduce_intruders(model, "default", new_name="same_rank", lam=0.75, progress=False)
    sigma = torch.linalg.svdvals(target)
    expected = float(sigma[4:].pow(2).sum().sqrt() / sigma.pow(2).sum().sqrt())
    assert report["fc1"]["rank"] == 4 and report["fc1"]["reprojection_error"] == pytest.approx(expected, rel=1e-4)
    assert expected > 0  # the intruder directions are not all inside ΔW's span: rank r loses a little
    lorakit.save_adapter(model, tmp_path / "reduced", "same_rank")
    peft = PeftModel.from_pretrained(mlp(), str(tmp_path / "reduced")).eval()
    assert close(run(peft, x), run(model, x), tol=1e-4)
    unchanged = reduce_intruders(model, "default", new_name="kept", lam=1.0, keep_rank=False, progress=False)
    assert unchanged["fc1"]["reprojection_error"] < 1e-6
    dw = model.fc1.adapters["default"].delta_weight().detach()
    assert torch.allclose(model.fc1.adapters["kept"].delta_weight().detach(), dw, atol=1e-5)
    with pytest.raises(ConfigError, match="lam"):
        reduce_intruders(model, "default", new_name="bad", lam=1.5, progress=False)
