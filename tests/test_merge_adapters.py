"""Exact delta-space merging (lorakit.compose.merge_folders, `lorakit merge-adapters`): one adapter at weight 1 is
itself, cat / linear equal Σ wᵢΔWᵢ (fp64, different ranks, rsLoRA, rank/alpha patterns, different target sets,
negative weights), truncation equals the optimal rank-k approximation, the output reloads in lorakit and PEFT,
refusals, inputs untouched."""
from __future__ import annotations

import pytest
import torch
from contract import close, perturb
from models import llama

import lorakit
from lorakit.cli import main
from lorakit.compose import merge_folders
from lorakit.errors import ConfigError, MergeError

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
TARGETS = tuple(f"model.layers.{i}.self_attn.{m}_proj" for i in (0, 1) for m in ("q", "v", "o"))


def saved(folder, seed, **config):
    model = llama()
    torch.manual_seed(seed)
    lorakit.inject(model, lorakit.AdapterConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                                   **config}))
    perturb(model, seed=seed, scale=1.0)
    lorakit.save_adapter(model, folder)
    return folder


def deltas(folder) -> dict[str, torch.Tensor]:
    """Each layer's ΔW = s·B·A in float64, from the file (the reference the merge is checked against)."""
    config, tensors = lorakit.read_adapter(folder)
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            path = key[: -len(".lora_A.weight")]
            out[path] = config.scale_for(path) * tensors[f"{path}.lora_B.weight"].double() @ a.double()
    return out


def weighted_sum(folders, weights):
    total = {}
    for folder, w in zip(folders, weights):
        for path, d in deltas(folder).items():
            total[path] = total.get(path, 0) + w * d
    return total


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def pool(tmp_path):
    """Three adapters: different ranks, rsLoRA with rank/alpha patterns, and a different target set (o_proj)."""
    return [saved(tmp_path / "a", 1),
            saved(tmp_path / "b", 2, r=8, lora_alpha=4, use_rslora=True, rank_pattern={"v_proj": 2},
                  alpha_pattern={"v_proj": 5.0}),
            saved(tmp_path / "c", 3, r=2, target_modules=["q_proj", "o_proj"])]


@pytest.mark.parametrize("method", ["cat", "linear"])
def test_one_adapter_at_weight_one_is_itself(pool, tmp_path, method):
    for i, folder in enumerate(pool):
        merge_folders([folder], [1.0], tmp_path / f"{method}{i}", method=method)
        want, got = deltas(folder), deltas(tmp_path / f"{method}{i}")
        assert sorted(got) == sorted(want)
        assert all(rel(got[p], want[p]) <= 1e-6 for p in want)


@pytest.mark.parametrize("method", ["cat", "linear"])
def test_exact_modes_equal_the_weighted_sum_with_a_negative_weight(pool, tmp_path, method):
    weights = [0.7, -1.3, 0.4]  # task negation included
    report = merge_folders(pool, weights, tmp_path / "m", method=method)
    want, got = weighted_sum(pool, weights), deltas(tmp_path / "m")
    assert sorted(got) == sorted(want) == sorted(TARGETS)  # the union of the target sets
    assert all(rel(got[p], want[p]) <= 1e-6 for p in want)
    config, _ = lorakit.read_adapter(tmp_path / "m")
    assert not config.use_rslora and all(config.scale_for(p) == 1.0 for p in TARGETS)
    ranks = {p: r["rank"] for p, r in report.items()}
    if method == "cat":  # rank Σrᵢ of the adapters that have the layer
        assert ranks["model.layers.0.self_attn.q_proj"] == 4 + 8 + 2 and ranks["model.layers.0.self_attn.v_proj"] == 4 + 2
    assert all(r["error"] <= 1e-6 for r in report.values())  # (linear: only numerical zeros dropped)


def test_truncation_is_the_optimal_rank_k_approximation(pool, tmp_path):
    weights = [1.0, 0.5, -0.25]
    report = merge_folders(pool, weights, tmp_path / "k3", target_rank=3)
    want, got = weighted_sum(pool, weights), deltas(tmp_path / "k3")
    for path, d in want.items():
        u, s, vh = torch.linalg.svd(d)
        k = min(3, int((s > 1e-9 * s[0]).sum()))
        assert s[k - 1] > s[k] * (1 + 1e-6)  # a unique best rank-k approximation
        best = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
        assert rel(got[path], best) <= 1e-6
        assert report[path]["error"] == pytest.approx(((d - best).norm() / d.norm()).item(), rel=1e-6)
    merge_folders(pool, weights, tmp_path / "e", energy=0.9)
    for path, d in want.items():
        assert rel(deltas(tmp_path / "e")[path], d) <= 0.32  # ≥ 90 % of the energy: error ≤ √0.1


def test_the_merged_folder_reloads_in_lorakit_and_peft(pool, tmp_path):
    from peft import PeftModel

    weights = [0.6, 0.3, -0.2]
    merge_folders(pool, weights, tmp_path / "m", target_rank=5)
    reference = llama()
    with torch.no_grad():  # the base with Σ wᵢΔWᵢ truncated, added to the weights directly
        for path, d in deltas(tmp_path / "m").items():
            reference.get_submodule(path).weight.add_(d.float())
        want = reference(input_ids=IDS).logits
    ours = lorakit.load_adapter(llama(), tmp_path / "m")
    peft = PeftModel.from_pretrained(llama(), str(tmp_path / "m")).eval()
    with torch.no_grad():
        assert close(ours(input_ids=IDS).logits, want) and close(peft(input_ids=IDS).logits, want)


def test_refusals_and_inputs_left_untouched(pool, tmp_path):
    before = [(f / "adapter_model.safetensors").read_bytes() for f in pool]
    dora = saved(tmp_path / "dora", 4, use_dora=True)
    with pytest.raises(MergeError, match="DoRA"):
        merge_folders([pool[0], dora], [1, 1], tmp_path / "x")
    with pytest.raises(ConfigError, match="weights"):
        merge_folders(pool, [1, 1], tmp_path / "x")
    with pytest.raises(ConfigError, match="cat"):
        merge_folders(pool, [1, 1, 1], tmp_path / "x", method="cat", target_rank=2)
    merge_folders(pool, [1, 1, 1], tmp_path / "m")
    with pytest.raises(ConfigError, match="not empty"):
        merge_folders(pool, [1, 1, 1], tmp_path / "m")
    assert [(f / "adapter_model.safetensors").read_bytes() for f in pool] == before


def test_cli_merge_adapters(pool, tmp_path, capsys):
    code = main(["merge-adapters", *map(str, pool), "--weights", "1", "0.5", "-1", "--method", "linear",
                 "--r", "4", "--output-dir", str(tmp_path / "out")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in printed and str(tmp_path / "out") in printed
    want, got = weighted_sum(pool, [1, 0.5, -1]), deltas(tmp_path / "out")
    assert all(torch.linalg.matrix_rank(got[p].float()) <= 4 for p in got)
    assert main(["merge-adapters", str(pool[0]), "--weights", "1", "2", "--output-dir", str(tmp_path / "bad")]) == 2
