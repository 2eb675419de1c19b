"""MAAT unlearning on adapter weights (lorakit.compose.unlearn): the projection is orthogonal to the reference
gradient, a projected ascent step leaves the retain loss unchanged to first order, only adapter tensors get
gradients, SVD pruning reproduces ΔW exactly / equals the SVD truncation without the masked directions and scores
directions by input energy, negation is ΔW − λΔW_f exactly, repair lowers the KL to the reference, and the pipeline
forgets a planted pattern while keeping the other; bad input raises a typed error and changes nothing."""
from __future__ import annotations

import math

import pytest
import torch
from contract import perturb
from models import llama
from torch import nn

import lorakit
from lorakit.compose import unlearn as U
from lorakit.errors import AdapterNameError, ConfigError, MergeError
from lorakit.layers import AdaptedLayer
from lorakit.model import wrappers
from lorakit.rank.squeeze import factor_svd

TARGETS = ["q_proj", "v_proj", "down_proj"]


def batch(seed, rows=2, seq=8):
    ids = torch.randint(0, 128, (rows, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


FORGET, RETAIN = [batch(1), batch(2)], [batch(3), batch(4)]


def adapted(dtype=torch.float64, seed=0, name="orig", **config):
    model = llama().to(dtype)
    torch.manual_seed(seed)
    lorakit.inject(model, lorakit.AdapterConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, **config}),
                   name)
    perturb(model, name, scale=1.0, seed=seed)  # B ≠ 0: the adapter changes the model
    return model


def deltas(model, name):
    """{path: s·B·A} of a LoRA adapter, float64."""
    out = {}
    for path, w in wrappers(model):
        if isinstance(w, AdaptedLayer) and name in w.adapters:
            a, b, s = w.adapters[name].factors()
            out[path] = (b.detach().double() * s) @ a.detach().double()
    return out


def rel(a, b):
    return float((a - b).norm() / b.norm())


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def flat(model, name):
    return {k: t.detach().clone() for k, t in lorakit.adapter_parameters(model, name).items()}


def base_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".adapters." not in n}


# ---- project_out -------------------------------------------------------------------------------------------------
def test_projection_is_orthogonal_to_the_reference_and_keeps_orthogonal_gradients():
    g = torch.Generator().manual_seed(0)
    x, ref = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    p = U.project_out(x, ref)
    assert abs(float((p * ref).sum())) <= 1e-12 * float(x.norm() * ref.norm())
    c = float((x * ref).sum() / ref.pow(2).sum())
    assert torch.allclose(p + c * ref, x, atol=1e-12)  # only the g_ref component is removed
    ortho = p.clone()
    assert torch.allclose(U.project_out(ortho, ref), ortho, atol=1e-12)
    assert torch.equal(U.project_out(x, torch.zeros_like(ref)), x)  # zero-norm reference: unchanged, no NaN
    agreeing = ref + 0.1 * ortho  # ⟨g, g_ref⟩ > 0: no conflict, PCGrad leaves it
    assert torch.equal(U.project_out(agreeing, ref, only_conflicts=True), agreeing)
    assert abs(float((U.project_out(-agreeing, ref, only_conflicts=True) * ref).sum())) <= 1e-10
    with pytest.raises(ConfigError):
        U.project_out(x, ref[:, :3])


# ---- phase 1 -----------------------------------------------------------------------------------------------------
def test_projected_step_is_first_order_neutral_on_retain_and_touches_only_the_new_adapter():
    model = adapted()
    base, orig = base_state(model), flat(model, "orig")
    lorakit.set_active(model, ["orig"])
    params = dict(lorakit.adapter_parameters(model, "orig"))
    keys = [k for k, t in params.items() if isinstance(t, nn.Parameter)]
    g_r = torch.autograd.grad(U.lm_loss(model, RETAIN[0]), [params[k] for k in keys])  # at the starting point

    def inner_with_retain(new):
        step = [lorakit.adapter_parameters(model, new)[k].detach() - orig[k] for k in keys]
        dot = sum(float((s * g).sum()) for s, g in zip(step, g_r))
        norm = math.sqrt(sum(float(s.pow(2).sum()) for s in step)) * math.sqrt(sum(float(g.pow(2).sum())
                                                                                   for g in g_r))
        return dot / norm

    report = U.projected_ascent(model, "orig", "proj", FORGET, RETAIN, steps=1, lr=1e-2)
    assert abs(report["cosine"][0]) > 1e-3  # g_f and g_r are not orthogonal already: the projection does work
    assert abs(inner_with_retain("proj")) <= 1e-10  # ⟨step, g_r⟩ = 0: retain loss unchanged to first order
    U.gradient_ascent(model, "orig", "plain", FORGET, steps=1, lr=1e-2)
    assert abs(inner_with_retain("plain")) > 1e-3  # the unprojected step is not (so the check above can fail)
    assert lorakit.active_adapters(model) == ["plain"]
    # only the new adapters moved; nothing else has a gradient or requires one
    assert all(torch.equal(t, orig[k]) for k, t in flat(model, "orig").items())
    assert all(torch.equal(p, base[n]) for n, p in base_state(model).items())
    assert all(p.grad is None for p in model.parameters())
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".adapters." not in n)
    assert any(not torch.equal(t, orig[k]) for k, t in flat(model, "proj").items())


def test_ascent_raises_the_forget_loss_and_stops_at_the_ceiling():
    model = adapted(torch.float32)
    report = U.projected_ascent(model, "orig", "up", FORGET, RETAIN, steps=3, lr=0.5)
    f = report["forget_loss"]
    assert report["steps"] == 3 and f[-1] > f[0]
    stop = U.gradient_ascent(model, "orig", "capped", FORGET, steps=50, lr=5.0, stop_at=f[0] + 0.01)
    assert stop["steps"] < 50 and stop["forget_loss"][-1] >= f[0] + 0.01


# ---- phase 2: pruning --------------------------------------------------------------------------------------------
def test_svd_prune_without_a_mask_is_exact_and_with_one_is_the_truncated_svd():
    model = adapted()
    want = deltas(model, "orig")
    report = U.svd_prune(model, "orig", "same", FORGET, RETAIN, mask_fn=lambda p, s: torch.zeros(len(s.sigma),
                                                                                              dtype=torch.bool))
    got = deltas(model, "same")
    assert sorted(got) == sorted(want) and all(rel(got[p], want[p]) <= 1e-6 for p in want)
    assert all(r["kept"] == 4 and not r["masked"] for r in report.values())
    masked = [0, 2]
    report = U.svd_prune(model, "orig", "cut", FORGET, RETAIN,
                         mask_fn=lambda p, s: torch.isin(torch.arange(len(s.sigma)), torch.tensor(masked)))
    got = deltas(model, "cut")
    for path, delta in want.items():
        u, s, vh = torch.linalg.svd(delta)  # dense reference, test only
        keep = [j for j in range(4) if j not in masked]
        truncated = (u[:, keep] * s[keep]) @ vh[keep]
        assert rel(got[path], truncated) <= 1e-6
        assert report[path]["kept"] == 2 and report[path]["masked"] == masked
    config = lorakit.get_config(model, "cut")
    assert config.r == 2 and not config.use_rslora and all(config.scale_for(p) == 1.0 for p in want)
    assert all(rel(d, want[p]) == 0 for p, d in deltas(model, "orig").items())  # the input adapter is untouched
    assert lorakit.active_adapters(model) == ["cut"]


class Lin(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 8)

    def forward(self, inputs_embeds):
        return self.lin(inputs_embeds)


def test_directions_are_scored_by_forget_and_retain_input_energy():
    model = Lin().double()
    lorakit.inject(model, lorakit.AdapterConfig(r=3, lora_alpha=3, target_modules=["lin"]), "orig")
    perturb(model, "orig", scale=1.0)
    a, b, s = model.lin.adapters["orig"].factors()
    svd = factor_svd(a, b, s)
    g = torch.Generator().manual_seed(0)
    coef = lambda n: torch.randn(4, n, generator=g, dtype=torch.float64)  # noqa: E731
    forget = {"inputs_embeds": coef(1) @ svd.v[:, :1].T}  # forget inputs lie along v_0 only
    retain = {"inputs_embeds": coef(2) @ svd.v[:, 1:].T}  # retain inputs along v_1, v_2
    report = U.svd_prune(model, "orig", "pruned", forget, retain, threshold=0.8)
    ratio = report["lin"]["ratio"]
    assert ratio[0] == pytest.approx(1.0, abs=1e-6) and max(ratio[1:]) <= 1e-6
    assert report["lin"]["masked"] == [0] and report["lin"]["kept"] == 2
    a2, b2, s2 = (t.detach() if torch.is_tensor(t) else t for t in model.lin.adapters["pruned"].factors())
    want = (svd.u[:, 1:] * svd.s[1:]) @ svd.v[:, 1:].T
    assert rel((b2 * s2) @ a2, want) <= 1e-6
    with torch.no_grad():  # the pruned adapter no longer acts on forget inputs, and acts as before on retain inputs
        assert model(**forget).sub(model.lin.base_layer(forget["inputs_embeds"])).abs().max() <= 1e-10
        lorakit.set_active(model, ["orig"])
        before = model(**retain)
        lorakit.set_active(model, ["pruned"])
        assert torch.allclose(model(**retain), before, atol=1e-10)
    everything = U.svd_prune(model, "orig", "none_left", forget, retain, fraction=1.0, split="left")
    assert everything["lin"]["masked"] == [0]  # fraction only takes forget-dominant (ratio > 0.5) directions


# ---- phase 2: negation -------------------------------------------------------------------------------------------
def test_negation_is_exact_in_delta_space():
    model = adapted()
    torch.manual_seed(7)
    lorakit.inject(model, lorakit.AdapterConfig(r=2, lora_alpha=5, use_rslora=True,
                                                target_modules=["q_proj", "o_proj"]), "forget")
    perturb(model, "forget", scale=1.0, seed=7)
    orig, forg = deltas(model, "orig"), deltas(model, "forget")
    U.negate(model, "orig", "forget", "negated", lam=0.7)
    got = deltas(model, "negated")
    assert sorted(got) == sorted(set(orig) | set(forg))
    for path, d in got.items():
        want = orig.get(path, 0) - 0.7 * forg.get(path, 0)
        assert rel(d, want) <= 1e-6
    assert lorakit.active_adapters(model) == ["negated"]
    assert all(rel(deltas(model, "orig")[p], orig[p]) == 0 for p in orig)
    U.negate(model, "negated", "forget", "negated", lam=-0.7)  # in place, explicitly: back to ΔW_orig
    assert all(rel(deltas(model, "negated")[p], orig[p]) <= 1e-6 for p in orig)


# ---- phase 3 -----------------------------------------------------------------------------------------------------
def test_repair_lowers_the_divergence_from_the_reference_on_retain_inputs():
    model = adapted(torch.float32)
    U.clone_adapter(model, "orig", "damaged")
    perturb(model, "damaged", scale=0.5, seed=5)  # planted damage away from the reference
    damaged = flat(model, "damaged")
    before = U.repair_divergence(model, "damaged", "orig", RETAIN)
    report = U.repair(model, "damaged", "repaired", "orig", RETAIN, steps=30, lr=1e-2)
    after = U.repair_divergence(model, "repaired", "orig", RETAIN)
    assert before["kl"] > 1e-3
    assert after["kl"] < 0.3 * before["kl"] and after["hidden"] < 0.5 * before["hidden"]
    assert report["loss"][-1] < report["loss"][0]
    assert all(torch.equal(t, damaged[k]) for k, t in flat(model, "damaged").items())
    kl0 = U.repair_divergence(model, "orig", "orig", RETAIN)
    assert kl0["kl"] <= 1e-6 and kl0["hidden"] <= 1e-10  # the reference against itself


# ---- the pipeline ------------------------------------------------------------------------------------------------
def pattern(marker, lo, step, seed, rows=8, seq=12, n=10):
    """Rows `marker, x, x+step, x+2·step, …` (mod n, offset lo); the loss skips the marker and the first token."""
    start = torch.randint(0, n, (rows, 1), generator=torch.Generator().manual_seed(seed))
    ids = torch.cat([torch.full((rows, 1), marker), lo + (start + step * torch.arange(seq - 1)) % n], 1)
    labels = ids.clone()
    labels[:, :2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_maat_forgets_a_planted_pattern_and_keeps_the_other():
    forget = [pattern(1, 10, 1, s) for s in range(4)]  # count up by 1 in tokens 10..19
    retain = [pattern(2, 60, 3, 100 + s) for s in range(4)]  # count up by 3 in tokens 60..69
    model = llama()
    torch.manual_seed(0)
    config = lorakit.AdapterConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "gate_proj", "up_proj", "down_proj", "lm_head"])
    U.fit_adapter(model, "both", config, [b for pair in zip(forget, retain) for b in pair], steps=80, lr=1e-2)
    f0, r0 = U.mean_loss(model, forget, adapter="both"), U.mean_loss(model, retain, adapter="both")
    assert f0 < 0.3 and r0 < 0.3  # the adapter learned both patterns
    base, both = base_state(model), flat(model, "both")
    ascent = {"steps": 30, "lr": 0.3, "max_norm": 0.2, "stop_at": 6.0}
    report = U.maat(model, "both", "unlearned", forget, retain, ascent=ascent, prune={"threshold": 0.7},
                    repair_options={"steps": 20, "lr": 1e-3})
    f1, r1 = report["forget_loss"]["after"], report["retain_loss"]["after"]
    assert report["forget_loss"]["before"] == pytest.approx(f0) and f1 == pytest.approx(
        U.mean_loss(model, forget, adapter="unlearned"))
    assert f1 > f0 + 1.0  # forgotten: the forget loss rises by more than a nat (from < 0.3)
    # kept: the retain pattern is still predicted (chance over its 10 tokens is 2.3 nats), and its loss rises by less
    # than a tenth of the forget loss's rise (0.18 vs 3.97 nats on an AVX2-only CPU, under 0.1 on an AVX-512 one)
    assert r1 < 0.5 and r1 - r0 < 0.1 * (f1 - f0)
    assert sum(report["pruned"].values()) > 0 and set(report["ranks"]) == set(report["pruned"])
    assert report["repair"]["kl"][-1] < report["repair"]["kl"][0]
    U.gradient_ascent(model, "both", "ascended", forget, **ascent)  # the baseline, same budget: retention suffers
    assert U.mean_loss(model, retain, adapter="ascended") > r1 + 0.1
    assert all(torch.equal(t, both[k]) for k, t in flat(model, "both").items())
    assert all(torch.equal(p, base[n]) for n, p in base_state(model).items())
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapters." not in n)
    assert lorakit.adapter_names(model) == ["both", "unlearned", "ascended"]


def test_maat_with_negation_fits_and_removes_the_forget_adapter():
    model = adapted(torch.float32)
    report = U.maat(model, "orig", "neg", FORGET, RETAIN,
                    negation={"config": lorakit.AdapterConfig(r=2, target_modules=["q_proj"]), "steps": 3,
                              "lam": 0.5})
    assert lorakit.adapter_names(model) == ["orig", "neg"] and len(report["fit"]["loss"]) == 3
    assert report["negate"]["model.layers.0.self_attn.q_proj"]["rank"] == 6  # cat: r + r_f


# ---- refusals ----------------------------------------------------------------------------------------------------
def test_bad_input_raises_a_typed_error_and_changes_nothing():
    model = adapted(torch.float32)
    U.clone_adapter(model, "orig", "other")
    state, names, active = snapshot(model), lorakit.adapter_names(model), lorakit.active_adapters(model)
    calls = [
        (AdapterNameError, lambda: U.projected_ascent(model, "orig", "other", FORGET, RETAIN)),
        (AdapterNameError, lambda: U.svd_prune(model, "missing", "x", FORGET, RETAIN)),
        (ConfigError, lambda: U.projected_ascent(model, "orig", "x", FORGET, RETAIN, steps=-1)),
        (ConfigError, lambda: U.projected_ascent(model, "orig", "x", FORGET, None)),
        (ConfigError, lambda: U.gradient_ascent(model, "orig", "x", [], steps=1)),
        (ConfigError, lambda: U.svd_prune(model, "orig", "x", FORGET, RETAIN, mask_fn=lambda p, s: torch.ones(2))),
        (ConfigError, lambda: U.svd_prune(model, "orig", "x", FORGET, RETAIN, threshold=1.5)),
        (ConfigError, lambda: U.negate(model, "orig", "other", "x", lam=float("nan"))),
        (ConfigError, lambda: U.negate(model, "orig", "orig", "x")),
        (ConfigError, lambda: U.repair(model, "orig", "orig", "orig", RETAIN)),
        (ConfigError, lambda: U.maat(model, "orig", "x", FORGET, RETAIN, ascent={"stepz": 3})),
        (ConfigError, lambda: U.maat(model, "orig", "x", FORGET, RETAIN, negation={"lam": 1.0})),
        (ConfigError, lambda: U.maat(model, "orig", "orig", FORGET, RETAIN, prune={})),
        (ConfigError, lambda: U.fit_adapter(model, "x", {"r": 2}, FORGET)),
    ]
    for error, call in calls:
        with pytest.raises(error):
            call()
        assert lorakit.adapter_names(model) == names and lorakit.active_adapters(model) == active
        now = snapshot(model)
        assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def test_dora_is_refused_by_pruning():
    model = adapted(torch.float32, use_dora=True)
    with pytest.raises(MergeError, match="DoRA"):
        U.svd_prune(model, "orig", "x", FORGET, RETAIN)
    assert lorakit.adapter_names(model) == ["orig"]
