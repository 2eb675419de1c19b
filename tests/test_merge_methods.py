"""Merging on a model (lorakit.compose.merge_adapters) for every mergeable variant, the element-wise methods
(TIES, DARE, DELLA, magnitude pruning, Breadcrumbs) against dense references written here, PEFT 0.21.2's own
add_weighted_adapter numbers (peft_* modes), the safe API (active result, collisions, nothing mutated), refusals,
and the CLI's options and provenance file."""
from __future__ import annotations

import json
import math

import pytest
import torch
from contract import mlp, perturb
from models import build, forward, llama
from test_squeeze import adapter_on_base, logits, on_base, tiny_base  # noqa: F401 (tiny_base: a fixture)

import lorakit
from lorakit.cli import main
from lorakit.compose import MergeOptions, merge_adapters, merge_folders
from lorakit.compose.layers import Part
from lorakit.compose.merge import merge_layer
from lorakit.compose.sparsify import merge_dense
from lorakit.errors import AdapterNameError, ConfigError, MergeError
from lorakit.layers import AdaptedLayer
from lorakit.variants import variant_names

NOT_ADDITIVE = {"dora": "renormalises each row", "mm_lora": "token-dependent", "reclora": "token-dependent"}
OPTIONS = {"vblora": {"vector_length": 16}, "reclora": {"user_dim": 16}}


def effective_delta(model, path, name):
    """The layer's change under adapter `name` alone, probed through the forward on the identity (out, in)."""
    layer = model.get_submodule(path)
    active = lorakit.active_adapters(model)
    lorakit.set_active(model, [name])
    x = torch.eye(layer.kind.in_features, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        with lorakit.disabled(model):
            y0 = layer(x)
    lorakit.set_active(model, active)
    return (y - y0).T


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def adapted(model, variant="lora", name="a", seed=1, **config):
    torch.manual_seed(seed)
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["fc1", "fc2"], "variant": variant,
              "options": OPTIONS.get(variant, {}), **config}
    lorakit.inject(model, lorakit.AdapterConfig(**config), name)
    perturb(model, name, seed=seed)
    return model


def paths(model):
    return [p for p, m in model.named_modules() if isinstance(m, AdaptedLayer)]


@pytest.mark.parametrize("variant", sorted(set(variant_names()) - set(NOT_ADDITIVE)))
def test_every_mergeable_variant_merged_alone_at_weight_one_is_itself(variant):
    model = adapted(mlp().double(), variant)
    merge_adapters(model, ["a"], [1.0], "m")
    assert lorakit.active_adapters(model) == ["m"]
    for path in paths(model):
        want = effective_delta(model, path, "a")
        assert want.norm() > 0
        assert rel(effective_delta(model, path, "m"), want) <= 1e-6


@pytest.mark.parametrize("variant,reason", sorted(NOT_ADDITIVE.items()))
def test_non_additive_variants_are_refused_with_the_reason(variant, reason):
    model = adapted(mlp().double(), variant)
    with pytest.raises(MergeError, match=reason):
        merge_adapters(model, ["a"], [1.0], "m")
    assert lorakit.adapter_names(model) == ["a"]


def mixed_pool():
    """LoRA (rsLoRA, r 4), VeRA (r 8) and PiSSA (r 2, only fc2) on one model: different ranks and target sets."""
    model = adapted(mlp().double(), "lora", "a", 1, use_rslora=True)
    adapted(model, "vera", "b", 2, r=8)
    adapted(model, "pissa", "c", 3, r=2, target_modules=["fc2"])
    return model


def test_exact_modes_on_a_model_equal_the_weighted_sum_and_truncation_is_optimal():
    model = mixed_pool()
    weights = {"a": 0.6, "b": -1.1, "c": 0.8}
    want = {p: sum(w * effective_delta(model, p, n) for n, w in weights.items()
                   if n in model.get_submodule(p).adapters) for p in paths(model)}
    for method in ("cat", "linear"):
        report = merge_adapters(model, list(weights), list(weights.values()), method, method=method)
        for p in want:
            assert rel(effective_delta(model, p, method), want[p]) <= 1e-6
            assert report[p]["from_sum"] <= 1e-6 and report[p]["error"] == 0.0
    assert report["fc1"]["rank"] == 4 + 8 and report["fc2"]["rank"] == 4 + 8 + 2 * 2  # PiSSA: trained − offset pair
    report = merge_adapters(model, list(weights), list(weights.values()), "k3", method="linear", target_rank=3)
    for p in want:
        u, s, vh = torch.linalg.svd(want[p])
        assert s[2] > s[3] * (1 + 1e-3)  # a unique optimum
        best = (u[:, :3] * s[:3]) @ vh[:3]
        assert rel(effective_delta(model, p, "k3"), best) <= 1e-6
        assert report[p]["error"] == pytest.approx(float(s[3:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt()),
                                                   rel=1e-6)


@pytest.mark.parametrize("arch,targets", [("convnet", ["emb", "conv", "conv2d"]), ("gpt2", ["c_attn", "c_proj"])])
def test_conv_embedding_and_conv1d_layers_merge_exactly(tmp_path, arch, targets):
    """Conv1d / Conv2d / Embedding / transformers Conv1D (fan_in_fan_out): the merged adapter's output equals both
    sources active at once (their deltas add), on the model and through the folders."""
    model, batch = build(arch)
    model = model.double()
    for name, seed, r in (("a", 1, 4), ("b", 2, 2)):
        adapted(model, "lora", name, seed, r=r, target_modules=targets)
        lorakit.save_adapter(model, tmp_path / name, name=name)
    lorakit.set_active(model, ["a", "b"])
    want = forward(model, batch)
    merge_adapters(model, ["a", "b"], [1.0, 1.0], "m", method="linear")
    assert torch.allclose(forward(model, batch), want, atol=1e-9)
    merge_folders([tmp_path / "a", tmp_path / "b"], [1.0, 1.0], tmp_path / "m", method="cat")
    fresh = build(arch)[0].double()
    lorakit.load_adapter(fresh, tmp_path / "m")
    assert torch.allclose(forward(fresh, batch), want.to(forward(fresh, batch)), atol=1e-5)


def test_the_merge_is_safe_sources_untouched_collisions_raise_and_the_result_is_a_plain_lora():
    model = mixed_pool()
    before = {n: {k: t.detach().clone() for k, t in lorakit.adapter_parameters(model, n).items()} for n in "abc"}
    merge_adapters(model, ["a", "b"], [1.0, 1.0], "m", method="ties", density=0.5, target_rank=4)
    for n in "abc":
        assert all(torch.equal(t, before[n][k]) for k, t in lorakit.adapter_parameters(model, n).items())
    config = lorakit.get_config(model, "m")
    assert config.variant == "lora" and not config.use_rslora and config.r == 4 and config.lora_alpha == 4
    assert not any(t.requires_grad for t in lorakit.adapter_parameters(model, "m").values())
    names = lorakit.adapter_names(model)
    for bad in ("m", "a"):
        with pytest.raises(AdapterNameError, match="already exists"):
            merge_adapters(model, ["a", "b"], [1.0, 1.0], bad)
    with pytest.raises(AdapterNameError, match="no adapter named .zzz."):
        merge_adapters(model, ["a", "zzz"], [1.0, 1.0], "n")
    assert lorakit.adapter_names(model) == names and lorakit.active_adapters(model) == ["m"]
    with pytest.raises(ConfigError, match="2 weights"):
        merge_adapters(model, ["a", "b"], [1.0], "n")
    with pytest.raises(ConfigError, match="listed twice"):
        merge_adapters(model, ["a", "a"], [1.0, 1.0], "n")
    lorakit.merge(model, ["a"])
    with pytest.raises(MergeError, match="unmerge it"):
        merge_adapters(model, ["a", "b"], [1.0, 1.0], "n")
    assert lorakit.adapter_names(model) == names


@pytest.mark.parametrize("options,match", [
    (dict(method="ties", target_rank=4), "needs a density"),
    (dict(method="dare_ties", density=0.5), "give a target rank"),
    (dict(method="linear", density=0.5), "does not use a density"),
    (dict(method="della", density=0.05, epsilon=0.1, target_rank=2), "density ± epsilon"),
    (dict(method="breadcrumbs", density=0.995, gamma=0.01, target_rank=2), "gamma"),
    (dict(method="ties", density=1.5, target_rank=2), r"density must be in \(0, 1\]"),
    (dict(method="ties", density=0.5, target_rank=2, sign="both"), "sign must be one of"),
    (dict(method="peft_linear", target_rank=2), "keeps the sources' rank"),
    (dict(method="nope"), "method must be one of"),
    (dict(method="linear", colour="red"), "unknown merge option"),
])
def test_bad_options_raise_before_anything_changes(options, match):
    model = mixed_pool()
    with pytest.raises(ConfigError, match=match):
        merge_adapters(model, ["a", "b"], [1.0, 1.0], "m", **options)
    assert lorakit.adapter_names(model) == ["a", "b", "c"]


# ---- element-wise methods against dense references written here -------------------------------------------

def reference_trim(t, density):
    """Top ⌊density·n⌋ entries by magnitude, by a full sort."""
    k = int(density * t.numel())
    order = sorted(range(t.numel()), key=lambda i: -abs(t.flatten()[i].item()))
    mask = torch.zeros(t.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return t * mask.view(t.shape)


def reference_ties(deltas, weights, density, weighted_vote=True, frequency=False, divide="count"):
    """TIES written entry by entry: trim, elect, disjoint mean over agreeing non-zero entries."""
    trimmed = [reference_trim(t, density) for t in deltas]
    out = torch.zeros_like(deltas[0])
    for idx in range(out.numel()):
        vals = [float(t.flatten()[idx]) for t in trimmed]
        votes = [w * v if weighted_vote else v for w, v in zip(weights, vals)]
        mass = sum(math.copysign(1, v) if v else 0 for v in votes) if frequency else sum(votes)
        elected = 1.0 if mass >= 0 else -1.0
        agree = [i for i, v in enumerate(votes) if v != 0 and math.copysign(1, v) == elected]
        total = sum(weights[i] * vals[i] for i in agree)
        norm = {"count": len(agree), "weight_sum": sum(abs(weights[i]) for i in agree), "none": 1}[divide]
        out.view(-1)[idx] = total / norm if agree and norm else 0.0
    return out


def random_deltas(n=3, shape=(6, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


@pytest.mark.parametrize("vote,frequency,divide", [(True, False, "count"), (False, False, "count"),
                                                   (True, True, "weight_sum"), (False, True, "none")])
def test_ties_equals_the_reference(vote, frequency, divide):
    deltas, weights = random_deltas(), [0.7, -1.2, 0.5]
    got, info = merge_dense("ties", deltas, weights, 0.4, sign="weighted" if vote else "unweighted",
                            sign_method="frequency" if frequency else "total", divide=divide)
    want = reference_ties(deltas, weights, 0.4, vote, frequency, divide)
    assert torch.allclose(got, want, atol=1e-12)
    assert info["kept"] == [pytest.approx(int(0.4 * 54) / 54)] * 3


def test_magnitude_prune_breadcrumbs_and_lam_equal_their_references():
    deltas, weights = random_deltas(seed=1), [1.0, 0.5, -0.3]
    got, _ = merge_dense("magnitude_prune", deltas, weights, 0.3, lam=2.0)
    want = 2.0 * sum(w * reference_trim(t, 0.3) for w, t in zip(weights, deltas))
    assert torch.allclose(got, want, atol=1e-12)
    got, info = merge_dense("breadcrumbs", deltas, weights, 0.5, gamma=0.1)
    n = deltas[0].numel()
    want = sum(w * (reference_trim(t, 0.5 + int(0.1 * n) / n) - reference_trim(t, int(0.1 * n) / n))
               for w, t in zip(weights, deltas))
    assert torch.allclose(got, want, atol=1e-12)
    assert info["kept"] == [pytest.approx(int(0.5 * n) / n)] * 3


def test_dare_draws_rescales_and_elects_as_written():
    deltas, weights = random_deltas(seed=2, shape=(40, 50)), [0.6, 0.9, -0.4]
    g = torch.Generator().manual_seed(5)
    masks = [torch.rand(d.shape, generator=g, dtype=torch.float64) < 0.3 for d in deltas]  # the draws, in order
    dropped = [d * m / 0.3 for d, m in zip(deltas, masks)]
    got, info = merge_dense("dare_linear", deltas, weights, 0.3, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(got, sum(w * d for w, d in zip(weights, dropped)), atol=1e-12)
    assert info["kept"] == [pytest.approx(float(m.double().mean())) for m in masks]
    assert all(abs(k - 0.3) < 0.03 for k in info["kept"])
    got, _ = merge_dense("dare_ties", deltas, weights, 0.3, generator=torch.Generator().manual_seed(5))
    want = reference_ties(dropped, weights, 1.0)
    assert torch.allclose(got, want, atol=1e-12)


def test_dare_and_della_are_unbiased():
    delta = random_deltas(1, (30, 40), seed=3)
    for method, extra in (("dare_linear", {}), ("della", {"epsilon": 0.15})):
        g = torch.Generator().manual_seed(0)
        mean = sum(merge_dense(method, delta, [1.0], 0.3, generator=g, **extra)[0] for _ in range(1500)) / 1500
        assert rel(mean, delta[0]) < 0.08, method


def test_della_keeps_large_entries_more_often():
    delta = random_deltas(1, (50, 200), seed=4)[0]
    kept = torch.zeros_like(delta)
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        kept += merge_dense("della", [delta], [1.0], 0.4, generator=g, epsilon=0.2)[0] != 0
    rank = delta.abs().argsort(1).argsort(1)
    assert kept[rank < 20].mean() / 200 == pytest.approx(0.2 + 0.4 * 10 / 199, abs=0.02)  # density − ε at the bottom
    assert kept[rank >= 180].mean() / 200 == pytest.approx(0.6 - 0.4 * 10 / 199, abs=0.02)


def test_element_wise_merges_are_truncated_to_the_optimal_rank_of_the_dense_result():
    g = torch.Generator().manual_seed(0)
    parts = [Part(torch.randn(r, 20, generator=g, dtype=torch.float64), torch.randn(16, r, generator=g,
                  dtype=torch.float64), s, w) for r, s, w in ((4, 0.5, 1.0), (3, 2.0, -0.7))]
    opts = MergeOptions(method="ties", density=0.3, target_rank=5)
    a, b, info = merge_layer(parts, opts, "x")
    dense, _ = merge_dense("ties", [p.delta() for p in parts], [p.weight for p in parts], 0.3)
    u, s, vh = torch.linalg.svd(dense)
    assert rel(b @ a, (u[:, :5] * s[:5]) @ vh[:5]) <= 1e-10
    assert info["error"] == pytest.approx(float(s[5:].norm() / s.norm()), rel=1e-9)


def test_aligned_methods_through_the_merge_api():
    """knots with task arithmetic inside is lossless (Σ wᵢΔWᵢ); lego gives k units; both come back as adapters."""
    model = mixed_pool()
    weights = {"a": 0.6, "b": -1.1, "c": 0.8}
    want = {p: sum(w * effective_delta(model, p, n) for n, w in weights.items()
                   if n in model.get_submodule(p).adapters) for p in paths(model)}
    report = merge_adapters(model, list(weights), list(weights.values()), "kn", method="knots", knots_inner="ta")
    assert all(rel(effective_delta(model, p, "kn"), want[p]) <= 1e-6 for p in want)
    assert all(row["inner"] == "ta" for row in report.values())
    report = merge_adapters(model, list(weights), list(weights.values()), "lego", method="lego", k=3)
    assert all(row["rank"] == 3 and row["from_sum"] > 0 for row in report.values())
    report = merge_adapters(model, list(weights), list(weights.values()), "kt", method="knots", density=0.5)
    assert all(0 < row["from_sum"] < 1 for row in report.values())


# ---- PEFT 0.21.2's own numbers -------------------------------------------------------------------------

def peft_pair(tmp_path, r=4, use_rslora=False):
    from peft import LoraConfig, get_peft_model

    base = llama()
    targets = ["q_proj", "v_proj"]
    peft_model = get_peft_model(base, LoraConfig(r=r, lora_alpha=8, target_modules=targets, use_rslora=use_rslora),
                                adapter_name="x")
    peft_model.add_adapter("y", LoraConfig(r=r, lora_alpha=3, target_modules=targets))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # both adapters, B included (PEFT trains only the active one; B starts at 0)
        for key, p in peft_model.named_parameters():
            if "lora_" in key:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
                assert p.abs().min() > 0
    for name in ("x", "y"):
        peft_model.save_pretrained(tmp_path / "saved", selected_adapters=[name])
    return peft_model, [tmp_path / "saved" / n for n in ("x", "y")]


@pytest.mark.parametrize("ours,theirs,extra", [
    ("peft_linear", "linear", {}), ("peft_ties", "ties", {"density": 0.5}),
    ("peft_magnitude_prune", "magnitude_prune", {"density": 0.4}), ("peft_svd", "svd", {}),
])
def test_peft_modes_reproduce_peft_add_weighted_adapter(tmp_path, ours, theirs, extra):
    peft_model, folders = peft_pair(tmp_path)
    weights = [0.8, -0.6] if theirs != "ties" else [0.8, 0.6]
    peft_model.add_weighted_adapter(["x", "y"], weights, "merged", combination_type=theirs, **extra)
    merge_folders(folders, weights, tmp_path / "ours", method=ours, **extra)
    _, tensors = lorakit.read_adapter(tmp_path / "ours")
    theirs_state = {k: v for k, v in peft_model.state_dict().items() if ".merged." in k or k.endswith(".merged")}
    assert theirs_state
    for key, value in theirs_state.items():
        ours_key = key.replace("base_model.model.", "").replace(".merged", "")
        assert torch.allclose(tensors[ours_key].double(), value.double(), rtol=1e-5, atol=1e-6), key


def test_peft_linear_is_not_the_weighted_sum_but_linear_is(tmp_path):
    """The point of the exact default: PEFT's factor-level linear holds cross terms BᵢAⱼ."""
    _, folders = peft_pair(tmp_path)
    for method in ("peft_linear", "linear"):
        report = merge_folders(folders, [0.5, 0.5], tmp_path / method, method=method)
        worst = max(row["from_sum"] for row in report.values())
        assert (worst > 0.1) if method == "peft_linear" else (worst < 1e-6)


# ---- CLI -------------------------------------------------------------------------------------------------

def test_cli_ties_records_every_choice(tmp_path, capsys):
    _, folders = peft_pair(tmp_path)
    main(["merge-adapters", *map(str, folders), "--weights", "1", "0.5", "--method", "dare_ties", "--density",
          "0.3", "--seed", "7", "--sign", "unweighted", "--r", "3", "--output-dir", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "kept" in printed and "truncation error" in printed
    record = json.loads((tmp_path / "out" / "lorakit_merge.json").read_text())
    assert record["options"] == {"method": "dare_ties", "target_rank": 3, "energy": None, "density": 0.3,
                                 "lam": 1.0, "seed": 7, "sign": "unweighted", "sign_method": "total",
                                 "divide": "count"}
    assert record["weights"] == [1.0, 0.5] and len(record["layers"]) == 4
    config, tensors = lorakit.read_adapter(tmp_path / "out")
    assert config.r == 3 and all(t.shape[0] == 3 or t.shape[1] == 3 for t in tensors.values())
    main(["merge-adapters", *map(str, folders), "--weights", "1", "0.5", "--method", "dare_ties", "--density",
          "0.3", "--seed", "7", "--sign", "unweighted", "--r", "3", "--output-dir", str(tmp_path / "again")])
    assert lorakit.read_adapter(tmp_path / "again")[1].keys() == tensors.keys()
    again = lorakit.read_adapter(tmp_path / "again")[1]
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)  # the seed fixes the draws


def test_cli_merges_other_variants_on_their_base(tiny_base, tmp_path, capsys):
    """A VeRA and a PiSSA folder: merged through the base the first names; the output (a plain LoRA) on the base
    gives the logits of both sources active together."""
    base = tiny_base
    adapter_on_base(base, "vera", tmp_path / "vera")
    adapter_on_base(base, "pissa", tmp_path / "pissa", r=2)
    assert main(["merge-adapters", str(tmp_path / "vera"), str(tmp_path / "pissa"), "--weights", "1", "1",
                 "--method", "cat", "--output-dir", str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out
    config, _ = lorakit.read_adapter(tmp_path / "out")
    assert (config.variant, config.r) == ("lora", 4 + 2 * 2)
    both = on_base(base, tmp_path / "vera")
    lorakit.load_adapter(both, tmp_path / "pissa", name="p")
    lorakit.set_active(both, ["default", "p"])
    assert torch.allclose(logits(on_base(base, tmp_path / "out")), logits(both), atol=1e-5)
    record = json.loads((tmp_path / "out" / "lorakit_merge.json").read_text())
    assert record["options"]["method"] == "cat" and len(record["sources"]) == 2
