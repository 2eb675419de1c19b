"""AltLoRA / AltLoRA+ (optimizers "altlora", "altlora+"): steps match the card's formulas (preconditioned gradients,
momentum transport, bias correction, decoupled decay) computed explicitly in float64 on random matrices, in both the
sequential and the alternating mode; pairing by module; resume through a weights-only state dict; options errors;
a short real loop on the planted task reduces the loss.
The plain (first-moment) AltLoRA step is a preconditioned SGD step: ΔW ≈ −lr·s²·(projected G), so its lr is O(1)
on this task, unlike Adam-style lrs."""
from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
from contract import mlp, planted_loss_drop

import lorakit
from lorakit.errors import ConfigError, TrainingError, UnsupportedFeatureError
from lorakit.optim import make_optimizer
from lorakit.optim import lora_pairs

pytestmark = pytest.mark.usefixtures("one_thread_module")

LR, WD, BETAS, EPS, REG = 0.05, 0.01, (0.9, 0.99), 1e-3, 1e-5


def args(lr=LR, wd=WD):
    return SimpleNamespace(learning_rate=lr, weight_decay=wd, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
                           adam_epsilon=EPS)


def model_with_lora(targets=("fc1",), seed=0):
    model = mlp(seed)
    torch.manual_seed(seed)
    lorakit.inject(model, lorakit.AdapterConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    return model


def randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, v in lora_pairs(model):
            v.lora_A.copy_(torch.randn(v.lora_A.shape, generator=g))
            v.lora_B.copy_(torch.randn(v.lora_B.shape, generator=g))


def explicit(a, b, grads, schedule, plus):
    """The card's recursion in float64. grads: [(gA, gB)] per step; schedule: per step, the factors updated."""
    a, b = a.double(), b.double()
    b1, b2 = BETAS
    eye = torch.eye(a.shape[0], dtype=torch.float64)
    ma, mb = torch.zeros_like(a), torch.zeros_like(b)
    va, vb = torch.zeros_like(a), torch.zeros_like(b)
    b_prev, a_prev, ta, tb = b.clone(), a.clone(), 0, 0
    for (ga, gb), which in zip(grads, schedule):
        if "A" in which:
            pre = torch.linalg.inv(b.T @ b + REG * eye)
            gh = pre @ ga.double()
            ma = BETAS[0] * pre @ b.T @ b_prev @ ma + (1 - b1) * gh
            va = b2 * va + (1 - b2) * gh ** 2
            b_prev, ta = b.clone(), ta + 1
            d = ma / (1 - b1 ** ta)
            a = a - LR * (d / (va.sqrt() + EPS) if plus else d)
            a = a - LR * WD * a
        if "B" in which:
            pre = torch.linalg.inv(a @ a.T + REG * eye)
            gh = gb.double() @ pre
            mb = b1 * mb @ a_prev @ a.T @ pre + (1 - b1) * gh
            vb = b2 * vb + (1 - b2) * gh ** 2
            a_prev, tb = a.clone(), tb + 1
            d = mb / (1 - b1 ** tb)
            b = b - LR * (d / (vb.sqrt() + EPS) if plus else d)
            b = b - LR * WD * b
    return a, b


def rel(x, y):
    return ((x.double() - y.double()).norm() / y.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("mode", ["sequential", "alternating"])
def test_steps_match_card_formulas(mode, plus, dtype):
    model = model_with_lora().to(dtype)
    randomize(model)
    (_, v), = lora_pairs(model)
    a0, b0 = v.lora_A.detach().clone(), v.lora_B.detach().clone()
    opt = make_optimizer("altlora+" if plus else "altlora", model, args(), reg=REG, mode=mode, alter_freq=2)
    g = torch.Generator().manual_seed(5)
    steps = 6
    grads = [(torch.randn(a0.shape, generator=g, dtype=dtype), torch.randn(b0.shape, generator=g, dtype=dtype))
             for _ in range(steps)]
    for ga, gb in grads:
        v.lora_A.grad, v.lora_B.grad = ga.clone(), gb.clone()
        opt.step()
    schedule = ["AB"] * steps if mode == "sequential" else ["A", "A", "B", "B", "A", "A"]
    a_ref, b_ref = explicit(a0, b0, grads, schedule, plus)
    # fp64: the total displacements (stricter than the parameters); fp32: the parameters (storage rounding of
    # ~1e-7·‖θ‖ per step is a sizable fraction of a small displacement)
    if dtype == torch.float64:
        assert rel(v.lora_A.detach() - a0, a_ref - a0) < 1e-9
        assert rel(v.lora_B.detach() - b0, b_ref - b0) < 1e-9
    else:
        assert rel(v.lora_A.detach(), a_ref) < 1e-5 and rel(v.lora_B.detach(), b_ref) < 1e-5
    assert (v.lora_A.detach() - a0).norm() > 1e-2 and (v.lora_B.detach() - b0).norm() > 1e-2
    # low-rank state only: momentum (and v) shaped like the factor, plus the other factor's previous copy
    for p, other in ((v.lora_A, v.lora_B), (v.lora_B, v.lora_A)):
        st = opt.state[p]
        assert st["exp_avg"].shape == p.shape and st["prev_other"].shape == other.shape
        assert ("exp_avg_sq" in st) == plus


def test_alternating_leaves_idle_factor_untouched():
    model = model_with_lora()
    randomize(model)
    (_, v), = lora_pairs(model)
    opt = make_optimizer("altlora", model, args(), mode="alternating", alter_freq=3)
    phases = []
    for _ in range(7):
        a, b = v.lora_A.detach().clone(), v.lora_B.detach().clone()
        v.lora_A.grad, v.lora_B.grad = torch.randn_like(a), torch.randn_like(b)
        phases.append(opt.phase())
        opt.step()
        assert torch.equal(b, v.lora_B) if phases[-1] == "A" else torch.equal(a, v.lora_A)
    assert phases == ["A", "A", "A", "B", "B", "B", "A"]
    opt = make_optimizer("altlora", model, args(), mode="alternating", alter_freq=2, start="B")
    phases = []
    for step in range(5):
        opt.param_groups[0]["global_step"] = step
        phases.append(opt.phase())
    assert phases == ["B", "B", "A", "A", "B"]


def test_pairs_by_module_and_others_get_adamw():
    model = model_with_lora(("fc2", "fc1"))
    model.fc1.base_layer.bias.requires_grad_(True)
    opt = make_optimizer("altlora", model, args())
    pairs = [v for _, v in lora_pairs(model)]
    assert len(pairs) == 2
    ps = opt.param_groups[0]["params"]
    for i, v in enumerate(pairs):
        assert ps[2 * i] is v.lora_A and ps[2 * i + 1] is v.lora_B
    assert opt.param_groups[1]["params"] == [model.fc1.base_layer.bias]
    # a real step moves all of them
    x = torch.randn(8, 64)
    before = {id(p): p.detach().clone() for g in opt.param_groups for p in g["params"]}
    model(x).pow(2).mean().backward()
    opt.step()
    moved = [not torch.equal(before[id(p)], p) for g in opt.param_groups for p in g["params"]]
    assert moved.count(True) >= 4  # A's are unmoved at B = 0 (ĝ_A = 0); B's and the bias move


def test_resume_from_weights_only_state_dict():
    def run(steps, resume_after=None):
        model = model_with_lora()
        randomize(model)
        opt = make_optimizer("altlora+", model, args(), mode="alternating", alter_freq=2)
        g = torch.Generator().manual_seed(3)
        for i in range(steps):
            for _, v in lora_pairs(model):
                v.lora_A.grad = torch.randn(v.lora_A.shape, generator=g)
                v.lora_B.grad = torch.randn(v.lora_B.shape, generator=g)
            opt.step()
            if i + 1 == resume_after:
                buf = io.BytesIO()
                torch.save(opt.state_dict(), buf)
                buf.seek(0)
                fresh = make_optimizer("altlora+", model, args(), mode="alternating", alter_freq=2)
                fresh.load_state_dict(torch.load(buf, weights_only=True))
                opt = fresh
        return [p.detach().clone() for p in model.parameters() if p.requires_grad]

    for x, y in zip(run(5), run(5, resume_after=3)):
        assert torch.allclose(x, y, atol=1e-6)


@pytest.mark.parametrize("name,opts,lr", [("altlora", {}, 2.0), ("altlora", {"mode": "alternating"}, 2.0),
                                          ("altlora+", {}, 1e-2)])
def test_planted_task_loss_drops(name, opts, lr):
    model = model_with_lora()
    opt = make_optimizer(name, model, args(lr=lr, wd=0.0), **opts)
    before, after = planted_loss_drop(model, opt)
    # measured: altlora 0.016×, alternating 0.14×, altlora+ 0.0025× of the initial loss after 80 steps
    assert after < 0.25 * before


def test_options_errors():
    model = model_with_lora()
    with pytest.raises(ConfigError, match="bogus"):
        make_optimizer("altlora", model, args(), bogus=1)
    with pytest.raises(ConfigError, match="mode"):
        make_optimizer("altlora+", model, args(), mode="jacobi")
    with pytest.raises(ConfigError, match="alter_freq"):
        make_optimizer("altlora", model, args(), alter_freq=0)
    with pytest.raises(ConfigError, match="start"):
        make_optimizer("altlora", model, args(), mode="alternating", start="C")
    with pytest.raises(ConfigError, match="reg"):
        make_optimizer("altlora", model, args(), reg=-1.0)
    with pytest.raises(TrainingError, match="lora_A"):
        make_optimizer("altlora", mlp(), args())


@pytest.mark.parametrize("name", ["altlora", "altlora+"])
def test_trainer_runs_it(tmp_path, name):
    from test_trainer import trainable, trainer_for  # the trainer tests' tiny Llama classifier
    tr = trainer_for(tmp_path, optim=name, optim_args={"mode": "alternating", "alter_freq": 2}, max_steps=4,
                     learning_rate=1e-3)
    before = trainable(tr.model)
    tr.train()
    after = trainable(tr.model)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert all(not torch.equal(before[n], after[n]) for n in after if "lora_" in n)


@pytest.mark.parametrize("variant", ["dora", "sora", "dylora", "matryoshka_lora", "vera"])
def test_refuses_adapters_without_one_whole_pair(variant):
    """AltLoRA's preconditioners are built from the pair the step moves; variants outside ΔW = const + s·B·A are
    refused by name instead of silently preconditioned with the wrong factors."""
    torch.manual_seed(0)
    model = mlp()
    lorakit.inject(model, lorakit.AdapterConfig(r=4, lora_alpha=8, variant=variant, target_modules=["fc1"]))
    with pytest.raises(UnsupportedFeatureError, match=f"{variant}|'default' on 'fc1'"):
        make_optimizer("altlora", model, args())
