"""ALLoRA (optimizer "allora"): the paper's default rule (∂L/∂ΔW rows scaled by 1/√(‖ΔW_i,:‖ + 1/η²) inside the
backward, input gradient untouched, AdamW after it); the per-factor rates 1/√(‖θ_k‖² + 1/η²) per row / column /
tensor, before or after AdamW; adapters with dropout or s ≠ 1 are refused unless strict=false; options errors; resume
through a weights-only state dict; a short real loop reduces the loss."""
from __future__ import annotations

import copy
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

BETAS, EPS = (0.9, 0.99), 1e-8


def args(lr=1e-2, wd=0.01):
    return SimpleNamespace(learning_rate=lr, weight_decay=wd, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
                           adam_epsilon=EPS)


def model_with_lora(alpha=4, dropout=0.0, targets=("fc1",)):
    model = mlp(0)
    torch.manual_seed(0)
    lorakit.inject(model, lorakit.AdapterConfig(r=4, lora_alpha=alpha, lora_dropout=dropout,
                                                target_modules=list(targets)))
    return model


def randomize(model, zero_b_rows=()):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, v in lora_pairs(model):
            v.lora_A.copy_(torch.randn(v.lora_A.shape, generator=g))
            v.lora_B.copy_(torch.randn(v.lora_B.shape, generator=g) * 0.3)
            v.lora_B[list(zero_b_rows)] = 0


def explicit_rate(x, granularity, eta):
    x = x.double()
    c = torch.empty_like(x)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            piece = {"row": x[i], "column": x[:, j], "tensor": x}[granularity]
            c[i, j] = 1.0 / torch.sqrt((piece ** 2).sum() + 1.0 / eta ** 2)
    return c


@pytest.mark.parametrize("granularity", ["row", "column", "tensor"])
def test_rate_equals_formula(granularity):
    model = model_with_lora()
    randomize(model, zero_b_rows=(3, 7))
    opt = make_optimizer("allora", model, args(), granularity=granularity, eta=2.5)
    (_, v), = lora_pairs(model)
    for p in (v.lora_A, v.lora_B):
        want = explicit_rate(p.detach(), granularity, 2.5)
        got = opt.rate(p).double()
        assert ((got - want).norm() / want.norm()).item() < 1e-6
    if granularity == "row":  # zero rows of B get exactly the cap η
        assert torch.allclose(opt.rate(v.lora_B)[[3, 7]], torch.full((2, 4), 2.5))


@pytest.mark.parametrize("before", [True, False])
@pytest.mark.parametrize("granularity", ["row", "column", "tensor"])
def test_step_matches_adamw_with_rate(granularity, before):
    model = model_with_lora(targets=("fc1", "fc2"))
    randomize(model)
    model.fc2.base_layer.bias.requires_grad_(True)  # a non-LoRA parameter: plain AdamW
    ref = copy.deepcopy(model)
    opt = make_optimizer("allora", model, args(), granularity=granularity, eta=0.7, apply_before_optimizer=before)
    train = [p for p in model.parameters() if p.requires_grad]
    ref_train = [p for p in ref.parameters() if p.requires_grad]
    ref_opt = torch.optim.AdamW(ref_train, lr=1e-2, betas=BETAS, eps=EPS, weight_decay=0.01)
    factors = {id(p) for _, v in lora_pairs(model) for p in (v.lora_A, v.lora_B)}
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
        rates = [explicit_rate(p.detach().reshape(p.shape[0], -1), granularity, 0.7).reshape(p.shape).float()
                 if id(p) in factors else None for p in train]
        old = [q.detach().clone() for q in ref_train]
        if before:
            for q, c in zip(ref_train, rates):
                if c is not None:
                    q.grad.mul_(c)
        opt.step()
        ref_opt.step()
        if not before:
            with torch.no_grad():
                for q, q0, c in zip(ref_train, old, rates):
                    if c is not None:
                        q.copy_(q0 + c * (q - q0))
        for p, q in zip(train, ref_train):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
    assert not torch.equal(model.fc2.base_layer.bias, mlp(0).fc2.bias)  # the bias trained too


def test_refuses_dropout_and_scaling_unless_not_strict():
    with pytest.raises(ConfigError, match="scale 2"):
        make_optimizer("allora", model_with_lora(alpha=8), args())
    with pytest.raises(ConfigError, match="dropout 0.1"):
        make_optimizer("allora", model_with_lora(dropout=0.1), args())
    opt = make_optimizer("allora", model_with_lora(alpha=8, dropout=0.1), args(), strict=False)
    assert opt.param_groups[0]["allora"]
    rs = lorakit.AdapterConfig(r=4, lora_alpha=2, use_rslora=True, target_modules=["fc1"])  # 2/√4 = 1
    model = mlp(0)
    lorakit.inject(model, rs)
    make_optimizer("allora", model, args())


def test_options_errors():
    model = model_with_lora()
    for bad, match in [({"bogus": 1}, "bogus"), ({"granularity": "block"}, "granularity"), ({"eta": 0}, "eta"),
                       ({"eta": -1.0}, "eta"), ({"eta": "big"}, "eta"), ({"apply_before_optimizer": 1}, "apply_before"),
                       ({"strict": "no"}, "strict")]:
        with pytest.raises(ConfigError, match=match):
            make_optimizer("allora", model, args(), **bad)
    with pytest.raises(TrainingError, match="lora_A"):
        make_optimizer("allora", mlp(), args())


def test_resume_from_weights_only_state_dict():
    def run(steps, resume_after=None):
        model = model_with_lora()
        randomize(model)
        opt = make_optimizer("allora", model, args(), apply_before_optimizer=False, granularity="column")
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
        for i in range(steps):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            if i + 1 == resume_after:
                buf = io.BytesIO()
                torch.save(opt.state_dict(), buf)
                buf.seek(0)
                opt = make_optimizer("allora", model, args())  # groups' options come back from the state dict
                opt.load_state_dict(torch.load(buf, weights_only=True))
                assert opt.param_groups[0]["granularity"] == "column"
        return [p.detach().clone() for p in model.parameters() if p.requires_grad]

    for x, y in zip(run(4), run(4, resume_after=2)):
        assert torch.allclose(x, y, atol=1e-7)


@pytest.mark.parametrize("granularity,before", [("output_row", True), ("row", True), ("row", False)])
def test_planted_task_loss_drops(granularity, before):
    model = model_with_lora(alpha=4)  # s = 1
    opt = make_optimizer("allora", model, args(lr=1e-2, wd=0.0), granularity=granularity,
                         apply_before_optimizer=before)
    before_loss, after = planted_loss_drop(model, opt)
    assert after < 0.25 * before_loss


def test_trainer_runs_it(tmp_path):
    from test_trainer import trainable, trainer_for  # the trainer tests' tiny Llama classifier (s = 2: not strict)
    tr = trainer_for(tmp_path, optim="allora", optim_args={"strict": False, "granularity": "tensor"}, max_steps=3)
    before = trainable(tr.model)
    tr.train()
    after = trainable(tr.model)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert all(not torch.equal(before[n], after[n]) for n in after)


# ---- the paper's rule (default): ∂L/∂ΔW rows scaled by f_i = 1/√(‖ΔW_i,:‖ + 1/η²), input gradient untouched ----
def full_gradient_and_input_grad(model, x):
    """(∂L/∂W of fc1 from its input and output gradient, ∂L/∂x) for loss = sin(model(x)).sum()."""
    seen = {}

    def hook(module, inputs, out):
        seen["x"] = inputs[0].detach()
        out.register_hook(lambda g: seen.__setitem__("g", g))
    h = model.fc1.register_forward_hook(hook)
    x = x.clone().requires_grad_()
    model(x).sin().sum().backward()
    h.remove()
    return seen["g"].T @ seen["x"], x.grad


def test_default_gradients_are_the_papers_row_adapted_ones():
    model = model_with_lora()
    randomize(model, zero_b_rows=(3,))
    v = model.fc1.adapters["default"]
    x = torch.randn(12, 64, generator=torch.Generator().manual_seed(3))
    g_full, x_grad_plain = full_gradient_and_input_grad(model, x)
    model.zero_grad()
    opt = make_optimizer("allora", model, args(), eta=1.5)
    assert v.grad_row_scale is not None
    _, x_grad = full_gradient_and_input_grad(model, x)
    a, b = v.lora_A.detach().double(), v.lora_B.detach().double()
    f = 1 / torch.sqrt((b @ a).norm(dim=1) + 1 / 1.5 ** 2)  # s = 1; the norm itself under the root
    assert f[3] == pytest.approx(1.5)  # a zero row of ΔW gets the cap η
    g = f[:, None] * g_full.double()
    def rel(got, want):
        return ((got.double() - want).norm() / want.norm()).item()
    assert rel(v.lora_B.grad, g @ a.T) < 1e-5 and rel(v.lora_A.grad, b.T @ g) < 1e-5
    assert rel(v.lora_A.grad, b.T @ g_full.double()) > 0.1  # and not the plain gradient
    assert torch.equal(x_grad, x_grad_plain)  # the input gradient is the plain one
    del opt
    import gc
    gc.collect()
    assert v.grad_row_scale is None  # the rate lives as long as its optimizer


def test_default_is_not_adamw_after_b_leaves_zero():
    """Step 1 (B = 0: f = η on every row, ∂A = 0) equals AdamW's; after that the trajectories part."""
    def train(optim, steps):
        model = model_with_lora()
        x = torch.randn(100, 64, generator=torch.Generator().manual_seed(5))
        train_p = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(train_p, lr=1e-2, betas=BETAS, eps=EPS, weight_decay=0.01) if optim == "adamw" \
            else make_optimizer("allora", model, args(), eta=2.0)
        for _ in range(steps):
            opt.zero_grad()
            model(x).sin().sum().backward()
            opt.step()
        return model.fc1.adapters["default"].delta_weight().detach()
    assert torch.allclose(train("allora", 1), train("adamw", 1), atol=1e-7)
    ours, plain = train("allora", 30), train("adamw", 30)
    assert ((ours - plain).norm() / plain.norm()).item() > 1e-3


def test_paper_rule_needs_plain_lora_on_linear_layers():
    model = mlp(0)
    lorakit.inject(model, lorakit.AdapterConfig(r=4, lora_alpha=4, variant="dora", target_modules=["fc1"]))
    with pytest.raises(UnsupportedFeatureError, match="plain LoRA"):
        make_optimizer("allora", model, args())
    make_optimizer("allora", model, args(), granularity="row")
    with pytest.raises(ConfigError, match="output_row"):
        make_optimizer("allora", model_with_lora(), args(), apply_before_optimizer=False)
