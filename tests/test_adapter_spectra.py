"""Per-layer spectra of adapters (issue 21): factored spectra equal the dense SVD, the statistics by hand, roll-ups
and the warnings a folder can earn."""
import json
import math

import pytest
import torch

import lorakit
from lorakit.analysis.spectra import block_of, folder_spectra, model_spectra, rollup, spectrum_stats

from contract import injected, mlp
from models import llama

pytestmark = pytest.mark.usefixtures("one_thread_module")


def dense_delta(model, path, name="default"):
    layer = model.get_submodule(path)
    v = layer.adapters[name]
    with torch.no_grad():
        dw = v.delta_weight().double()
        row = v.row_scale(layer.kind.weight())
        if row is not None:
            w = layer.kind.weight().double()
            dw = row.double().reshape(-1, 1) * (w + dw) - w
    return dw


def test_factored_spectra_equal_the_dense_svd(tmp_path):
    config = lorakit.AdapterConfig(r=6, lora_alpha=5, use_rslora=True, target_modules=["fc1", "fc2"],
                                   rank_pattern={"fc2": 3}, init_lora_weights=False)
    model = injected(config, seed=4)
    lorakit.save_adapter(model, tmp_path / "a")
    _, layers, _ = folder_spectra(tmp_path / "a")
    for path, r in (("fc1", 6), ("fc2", 3)):
        dense = torch.linalg.svdvals(dense_delta(model, path))
        row = layers[path]
        assert row["rank"] == r and row["scale"] == pytest.approx(5 / math.sqrt(r))
        assert torch.allclose(torch.tensor(row["singular_values"], dtype=torch.float64), dense[:r], rtol=1e-5, atol=1e-7)
        assert dense[r:].abs().max() < 1e-5 * dense[0]  # rank r: nothing beyond
        assert row["frobenius_norm"] == pytest.approx(float(dense.pow(2).sum().sqrt()), rel=1e-6)
        assert row["spectral_norm"] == pytest.approx(float(dense[0]), rel=1e-6)
    assert model_spectra(model)["fc1"]["singular_values"] == pytest.approx(layers["fc1"]["singular_values"], rel=1e-5)


def test_dora_on_the_model_is_its_effective_change():
    model = injected(lorakit.AdapterConfig(r=4, use_dora=True, target_modules=["fc1"], init_lora_weights=False), seed=2)
    row = model_spectra(model)["fc1"]
    dense = torch.linalg.svdvals(dense_delta(model, "fc1"))
    assert row["source"] == "dense" and len(row["singular_values"]) == 64  # the magnitude makes it full rank
    assert torch.allclose(torch.tensor(row["singular_values"], dtype=torch.float64), dense, rtol=1e-4, atol=1e-6)


def test_statistics_by_hand():
    stats = spectrum_stats(torch.tensor([2.0, 1.0]))
    p = torch.tensor([2 / 3, 1 / 3], dtype=torch.float64)
    assert stats["effective_rank"] == pytest.approx(math.exp(float(-(p * p.log()).sum())))
    assert stats["stable_rank"] == pytest.approx(5 / 4)
    assert stats["energy"] == {1: pytest.approx(4 / 5), 2: pytest.approx(1.0)}
    assert stats["frobenius_norm"] == pytest.approx(math.sqrt(5)) and stats["spectral_norm"] == 2
    flat = spectrum_stats(torch.ones(8))
    assert flat["effective_rank"] == pytest.approx(8) and flat["stable_rank"] == pytest.approx(8)
    assert spectrum_stats(torch.zeros(4))["effective_rank"] == 0.0


def test_rollups_by_block_and_module_type():
    model = llama()
    lorakit.inject(model, lorakit.AdapterConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    layers = model_spectra(model)
    assert block_of("model.layers.1.self_attn.q_proj") == "layers.1" and block_of("lm_head") == "other"
    groups = rollup(layers)
    assert list(groups["blocks"]) == ["layers.0", "layers.1"] and list(groups["modules"]) == ["q_proj", "v_proj"]
    q = [r for p, r in layers.items() if p.endswith("q_proj")]
    assert groups["modules"]["q_proj"]["layers"] == 2
    assert groups["modules"]["q_proj"]["frobenius_norm"] == pytest.approx(
        math.sqrt(sum(r["frobenius_norm"] ** 2 for r in q)))
    assert groups["modules"]["q_proj"]["spectral_norm"] == max(r["spectral_norm"] for r in q)


def test_warnings(tmp_path):
    model = mlp()
    lorakit.inject(model, lorakit.AdapterConfig(r=4, target_modules=["fc1", "fc2"], rank_pattern={"fc2": 2,
                                                                                                  "nowhere": 8}))
    lorakit.save_adapter(model, tmp_path / "a")  # B = 0: untrained
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    del raw["lora_alpha"]
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(raw))
    _, layers, warnings = folder_spectra(tmp_path / "a")
    text = "\n".join(warnings)
    assert "no lora_alpha" in text and "mixed ranks: 1 layers at r=2, 1 layers at r=4" in text
    assert "rank_pattern key 'nowhere'" in text and "2 of 2 layers have ΔW = 0" in text
    assert layers["fc1"]["effective_rank"] == 0.0
    clean = injected(lorakit.AdapterConfig(r=4, target_modules=["fc1", "fc2"]), seed=1)
    lorakit.save_adapter(clean, tmp_path / "b")
    assert folder_spectra(tmp_path / "b")[2] == []
