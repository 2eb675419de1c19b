"""LoRA-Pro (lorakit/optim/lorapro.py): the issue's acceptance math on random matrices, module pairing with real
scales, one explicit optimizer step, a short planted-task run, options errors."""
import pytest
import torch
from torch import nn

import lorakit
from lorakit.errors import ConfigError, UnsupportedFeatureError
from lorakit.layers import AdaptedLayer
from lorakit.optim import make_optimizer
from lorakit.optim import trained_adapters
from lorakit.optim.lorapro import LoRAPro, adjusted_gradients, solve_sylvester
from lorakit.train.args import TrainingArguments
from tests.contract import mlp, perturb, planted_teacher

pytestmark = pytest.mark.usefixtures("one_thread_module")


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def projectors(a, b):
    a, b = a.double(), b.double()
    p_b = b @ torch.linalg.inv(b.T @ b) @ b.T
    p_a = a.T @ torch.linalg.inv(a @ a.T) @ a
    return p_a, p_b


def kron_sylvester(p, q, c):
    """X with P·X + X·Q = C by the vec trick (independent of the eigen solver)."""
    r = p.shape[0]
    eye = torch.eye(r, dtype=torch.float64)
    k = torch.kron(eye, p.double()) + torch.kron(q.double().T.contiguous(), eye)
    return torch.linalg.solve(k, c.double().T.reshape(-1)).reshape(r, r).T


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("m,n,r,s", [(24, 16, 4, 2.0), (40, 56, 8, 16 / 8 ** 0.5)])
def test_equivalent_gradient_and_sylvester(dtype, m, n, r, s):
    g = torch.Generator().manual_seed(m + n + r)
    a, b, full = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((r, n), (m, r), (m, n)))
    a, b, full = a.to(dtype), b.to(dtype), full.to(dtype)
    g_a, g_b = s * b.T @ full, s * full @ a.T
    p_a, p_b = projectors(a, b)
    target = p_b @ full.double() + (torch.eye(m, dtype=torch.float64) - p_b) @ full.double() @ p_a
    ga0, gb0, x0 = adjusted_gradients(a, b, g_a, g_b, s, sylvester=False)
    ga1, gb1, x = adjusted_gradients(a, b, g_a, g_b, s)
    assert x0.abs().max() == 0
    for ga_star, gb_star in ((ga0, gb0), (ga1, gb1)):  # X does not change the equivalent gradient
        equiv = s * (b.double() @ ga_star.double() + gb_star.double() @ a.double())
        assert rel(equiv, target) <= 1e-5
    # X solves (BᵀB)X + X(AAᵀ) = −(BᵀB)⁻¹ g_A Aᵀ / s²
    btb, aat = b.double().T @ b.double(), a.double() @ a.double().T
    rhs = -torch.linalg.inv(btb) @ g_a.double() @ a.double().T / s ** 2
    assert rel(btb @ x.double() + x.double() @ aat, rhs) <= 1e-5
    assert rel(x.double(), kron_sylvester(btb, aat, rhs)) <= 1e-4
    # and X keeps the adjusted gradients closest to the raw ones: perturbing it only increases the distance
    def dist(xx):
        return ((ga0.double() + xx @ a.double() - g_a.double()).norm() ** 2
                + (gb0.double() - b.double() @ xx - g_b.double()).norm() ** 2).item()
    best = dist(x.double())
    for k in range(3):
        d = torch.randn(r, r, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        assert dist(x.double() + 1e-3 * d) >= best * (1 - 1e-9)


def test_sylvester_solver_semidefinite():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(5, 3, generator=g, dtype=torch.float64)
    p, q = u @ u.T, torch.eye(5, dtype=torch.float64) * 0.5  # p singular, q definite
    c = torch.randn(5, 5, generator=g, dtype=torch.float64)
    x = solve_sylvester(p, q, c)
    assert rel(p @ x + x @ q, c) <= 1e-10


def test_zero_b_is_the_reference_first_step():
    g = torch.Generator().manual_seed(1)
    a, full = torch.randn(4, 12, generator=g), torch.randn(10, 12, generator=g)
    b, s = torch.zeros(10, 4), 2.0
    g_a, g_b = s * b.T @ full, s * full @ a.T
    ga, gb, x = adjusted_gradients(a, b, g_a, g_b, s)
    assert ga.abs().max() == 0 and x.abs().max() == 0
    assert rel(gb, g_b @ torch.linalg.inv(a @ a.T) / s ** 2) <= 1e-5


class Interleaved(nn.Module):
    """Layers registered out of forward order, non-square, with a trainable gate between their adapters: the
    trainable parameters come as [gate, second.A, second.B, first.A, first.B] (pairing by position would mix them)."""

    def __init__(self):
        super().__init__()
        self.second = nn.Linear(32, 24)
        self.gate = nn.Parameter(torch.ones(24))
        self.first = nn.Linear(16, 32)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x))) * self.gate


def interleaved_model():
    torch.manual_seed(0)
    model = Interleaved()
    lorakit.inject(model, lorakit.AdapterConfig(r=4, lora_alpha=8, target_modules=["first", "second"],
                                                rank_pattern={"second": 2}, alpha_pattern={"second": 6},
                                                use_rslora=True, init_lora_weights=False))
    model.gate.requires_grad_(True)
    return model


def test_pairs_by_module_with_real_scale():
    model = interleaved_model()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names[0] == "gate" and "second" in names[1] and "first" in names[3]
    pairs = [(v, path) for path, v in trained_adapters(model, "lorapro")]
    assert len(pairs) == 2
    for v, path in pairs:
        layer = model.get_submodule(path.split("/")[0])
        assert isinstance(layer, AdaptedLayer) and layer.adapters["default"] is v
        assert v.lora_A.shape[0] == v.lora_B.shape[1] == v.r
    scales = {path: v.scale for v, path in pairs}
    assert scales["first/default"] == pytest.approx(8 / 4 ** 0.5) and scales["second/default"] == pytest.approx(6 / 2 ** 0.5)


def test_one_step_matches_explicit_full_gradient():
    """Step 1 from the full weight gradient G of each layer: U = g̃/(|g̃|+ε) with g̃ = P_B G + (I−P_B) G P_A,
    then p ← p − lr·g*(s BᵀU, s U Aᵀ) with the Sylvester X (solved here by the vec trick)."""
    model = interleaved_model()
    lr, eps = 1e-2, 1e-8
    opt = make_optimizer("lorapro", model, TrainingArguments(output_dir="unused", learning_rate=lr))
    assert isinstance(opt, LoRAPro)
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(3))
    inputs, grads_out = {}, {}

    def capture(name):
        def hook(module, inp, out):
            inputs[name] = inp[0].detach()
            out.register_hook(lambda g: grads_out.__setitem__(name, g))
        return hook
    hooks = [getattr(model, name).register_forward_hook(capture(name)) for name in ("first", "second")]
    loss = model(x).pow(2).mean()
    loss.backward()
    for h in hooks:
        h.remove()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    expected = {}
    for name in ("first", "second"):
        v = getattr(model, name).adapters["default"]
        a, b, s = v.lora_A.detach().double(), v.lora_B.detach().double(), v.scale
        full = grads_out[name].double().T @ inputs[name].double()  # ∂L/∂W (out × in)
        assert rel(v.lora_A.grad.double(), s * b.T @ full) <= 1e-5  # sanity: the raw LoRA gradients
        p_a, p_b = projectors(a, b)
        equiv = p_b @ full + (torch.eye(b.shape[0], dtype=torch.float64) - p_b) @ full @ p_a
        u = equiv / (equiv.abs() + eps)
        g_a, g_b = s * b.T @ u, s * u @ a.T
        btb_inv, aat_inv = torch.linalg.inv(b.T @ b), torch.linalg.inv(a @ a.T)
        xx = kron_sylvester(b.T @ b, a @ a.T, -btb_inv @ g_a @ a.T / s ** 2)
        new_a = btb_inv @ g_a / s ** 2 + xx @ a
        new_b = (torch.eye(b.shape[0], dtype=torch.float64) - p_b) @ g_b @ aat_inv / s ** 2 - b @ xx
        expected[f"{name}.adapters.default.lora_A"] = a - lr * new_a
        expected[f"{name}.adapters.default.lora_B"] = b - lr * new_b
    gate_grad = model.gate.grad.clone()
    opt.step()
    params = dict(model.named_parameters())
    for n, want in expected.items():
        moved = (want - before[n].double())
        assert rel(params[n].detach().double() - before[n].double(), moved) <= 1e-4, n
    # the unpaired gate gets plain Adam: step 1 is −lr·sign(g) (up to ε)
    assert torch.allclose(params["gate"].detach() - before["gate"], -lr * gate_grad / (gate_grad.abs() + eps),
                          atol=1e-7)
    st = opt.state[model.first.adapters["default"].lora_A]
    assert st["exp_avg"].shape == (32, 16) and st["exp_avg_sq"].shape == (32, 16)  # full-space m×n Adam


def test_state_dict_reloads_weights_only(tmp_path):
    model = interleaved_model()
    opt = make_optimizer("lorapro", model, TrainingArguments(output_dir="unused", learning_rate=1e-2))
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    fresh = make_optimizer("lorapro", model, TrainingArguments(output_dir="unused", learning_rate=1e-2))
    fresh.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    a = model.first.adapters["default"].lora_A
    assert torch.equal(fresh.state[a]["exp_avg"], opt.state[a]["exp_avg"])


def test_planted_task_loss_drops():
    g = torch.Generator().manual_seed(7)
    x, x_test = torch.randn(2000, 64, generator=g), torch.randn(500, 64, generator=g)
    teacher = planted_teacher()
    with torch.no_grad():
        y, y_test = teacher(x), teacher(x_test)
    model = mlp()
    torch.manual_seed(0)
    lorakit.inject(model, lorakit.AdapterConfig(r=4, lora_alpha=8, target_modules=["fc1"]))
    opt = make_optimizer("lorapro", model, TrainingArguments(output_dir="unused", learning_rate=1e-2))

    def mse(inp, target):
        return torch.nn.functional.mse_loss(model(inp), target)
    with torch.no_grad():
        before = mse(x_test, y_test).item()
    for step in range(150):
        i = (step * 200) % len(x)
        loss = mse(x[i:i + 200], y[i:i + 200])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = mse(x_test, y_test).item()
    print(f"lorapro planted task: test MSE {before:.4g} -> {after:.4g}")
    assert after < 0.1 * before


def test_options_errors():
    model = interleaved_model()
    args = TrainingArguments(output_dir="unused")
    with pytest.raises(ConfigError, match="bogus"):
        make_optimizer("lorapro", model, args, bogus=1)
    with pytest.raises(ConfigError, match="weight_decay"):
        make_optimizer("lorapro", model, args, weight_decay=-1.0)
    opt = make_optimizer("lorapro", model, args, weight_decay=0.1)
    assert opt.param_groups[0]["weight_decay"] == 0.1


def test_runs_in_the_trainer(tmp_path):
    from lorakit.train.tasks import make_task
    from lorakit.train.trainer import Trainer
    from tests.test_trainer import TOKENIZER, build, data, targs
    model = build()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tr = Trainer(model, make_task("classification", TOKENIZER, 32, 2),
                 targs(tmp_path, max_steps=3, optim="lorapro", learning_rate=1e-3), data())
    tr.train()
    assert isinstance(tr.optimizer, LoRAPro) and len(tr.optimizer.adapters) > 0
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.isfinite(p).all() and not torch.equal(before[n], p), n


# ---- which adapters: every variant whose step moves ΔW = const + s·B·diag(w)·A, refusal elsewhere ----------------
X16 = torch.randn(20, 16, generator=torch.Generator().manual_seed(11))


class One(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(16, 24)

    def forward(self, x):
        return self.layer(x)


def one_layer(config, seed=0):
    torch.manual_seed(seed)
    model = One()
    lorakit.inject(model, lorakit.AdapterConfig(target_modules=["layer"], **config))
    perturb(model, seed=seed)  # A, B away from their init: B ≠ 0, A ≠ A₀
    return model.train()


def lorapro_step(model, lr=1e-2, **options):
    opt = make_optimizer("lorapro", model, TrainingArguments(output_dir="unused", learning_rate=lr), **options)
    model(X16).sin().sum().backward()
    opt.step()
    return opt


def twin(w_eff, bias, a, b, s):
    """A plain LoRA (A, B, s) on a Linear of weight `w_eff`: it computes what the variant's training forward does,
    so LoRA-Pro must move it exactly as it moves the variant's trained pair."""
    model = One()
    with torch.no_grad():
        model.layer.weight.copy_(w_eff)
        model.layer.bias.copy_(bias)
    lorakit.inject(model, lorakit.AdapterConfig(r=a.shape[0], lora_alpha=s * a.shape[0], target_modules=["layer"]))
    v = model.layer.adapters["default"]
    with torch.no_grad():
        v.lora_A.copy_(a)
        v.lora_B.copy_(b)
    return model.train(), v


def check_against_twin(model, ranks, scale, weights=None):
    layer = model.layer
    v = layer.adapters["default"]
    a_all, b_all = v.lora_A.detach().clone(), v.lora_B.detach().clone()
    a, b = a_all[ranks], b_all[:, ranks]
    w = torch.ones(a.shape[0]) if weights is None else weights
    trained = scale * b @ (w[:, None] * a)
    with torch.no_grad():
        w_eff = layer.base_layer.weight + layer(torch.eye(16)).T - layer.base_layer(torch.eye(16)).T - trained
    t_model, t = twin(w_eff, layer.base_layer.bias.detach(), w[:, None] * a, b, scale)
    assert rel(t_model(X16).detach(), model(X16).detach()) <= 1e-5  # the twin computes the same function
    lorapro_step(model)
    lorapro_step(t_model)
    new_a, new_b = v.lora_A.detach(), v.lora_B.detach()
    assert rel(w[:, None] * new_a[ranks] - w[:, None] * a, t.lora_A.detach() - w[:, None] * a) <= 1e-4
    assert rel(new_b[:, ranks] - b, t.lora_B.detach() - b) <= 1e-4
    keep = torch.ones(a_all.shape[0], dtype=torch.bool)
    keep[ranks] = False
    assert torch.equal(new_a[keep], a_all[keep]) and torch.equal(new_b[:, keep], b_all[:, keep])  # the rest stays


@pytest.mark.parametrize("variant", ["lora", "pissa", "olora", "lora_ga"])
def test_residual_variants_get_the_closed_form_on_their_trainable_pair(variant):
    """PiSSA, OLoRA, LoRA-GA: ΔW = s·(B·A − B₀·A₀), the offset constant, so LoRA-Pro applies to (A, B)
    (before the fix they got plain AdamW: the twin check fails)."""
    model = one_layer(dict(variant=variant, r=4, lora_alpha=8))
    v = model.layer.adapters["default"]
    if variant == "lora_ga":  # give it a non-zero offset, as its data init would
        with torch.no_grad():
            v.lora_A0.normal_()
            v.lora_B0.normal_()
    check_against_twin(model, slice(0, 4), 2.0)


@pytest.mark.parametrize("frozen", [True, False])
def test_dylora_gets_the_truncation_it_trains_at_its_scale(frozen):
    """DyLoRA trains A[:b], B[:, :b] at scale s·r/b (frozen mode: component b alone): the closed form must use that
    pair and scale, and leave the other components alone."""
    from lorakit.variants import dylora
    model = one_layer(dict(variant="dylora", r=6, lora_alpha=12, options=dict(frozen=frozen, ranks=[3])))
    assert dylora.train_rank(model) == 3
    check_against_twin(model, slice(2, 3) if frozen else slice(0, 3), 12 / 3)


def test_matryoshka_works_on_a_scaled_by_its_fixed_diagonal():
    """ΔW = s·B·diag(P)·A: LoRA-Pro on A' = diag(P)·A, mapped back through diag(P)⁻¹."""
    model = one_layer(dict(variant="matryoshka_lora", r=4, lora_alpha=8))
    p = model.layer.adapters["default"].lora_P.clone()
    assert len(set(p.tolist())) > 1
    check_against_twin(model, slice(0, 4), 2.0, weights=p)


def test_mm_lora_branches_are_paired():
    torch.manual_seed(0)
    model = mlp()
    lorakit.inject(model, lorakit.AdapterConfig(r=4, lora_alpha=8, variant="mm_lora", target_modules=["fc1"],
                                                options=dict(unmasked="text")))
    perturb(model)
    opt = make_optimizer("lorapro", model, TrainingArguments(output_dir="unused", learning_rate=1e-2))
    v = model.fc1.adapters["default"]
    assert {id(p) for p in (v.lora_A_vision, v.lora_B_vision, v.lora_A_text, v.lora_B_text)} <= opt._paired
    before = v.lora_A_vision.detach().clone(), v.lora_A_text.detach().clone()
    model(torch.randn(8, 64)).pow(2).mean().backward()  # all text: the vision branch has zero gradient
    opt.step()
    assert torch.equal(v.lora_A_vision.detach(), before[0]) and not torch.equal(v.lora_A_text.detach(), before[1])
    assert opt.state[v.lora_A_text]["exp_avg"].shape == (v.lora_B_text.shape[0], v.lora_A_text.shape[1])


@pytest.mark.parametrize("variant,why", [("dora", "magnitude"), ("sora", "gate"), ("vera", "scaling vectors"),
                                         ("hypelora", "hypernetwork"), ("tied_lora", "shared"),
                                         ("lamda", "core")])
def test_refuses_variants_outside_its_math(variant, why):
    torch.manual_seed(0)
    model = mlp()
    lorakit.inject(model, lorakit.AdapterConfig(r=4, lora_alpha=8, variant=variant, target_modules=["fc1"]), "mine")
    with pytest.raises(UnsupportedFeatureError, match=rf"'mine' on 'fc1'.*{why}"):
        make_optimizer("lorapro", model, TrainingArguments(output_dir="unused"))


def test_weight_decay_shrinks_each_factor_by_its_square_root():
    """Decoupled decay of ΔW by (1 − lr·wd): each factor × √(1 − lr·wd), then the step."""
    lr, wd = 0.1, 0.5
    plain, decayed = one_layer(dict(r=4, lora_alpha=8)), one_layer(dict(r=4, lora_alpha=8))
    v0, v1 = plain.layer.adapters["default"], decayed.layer.adapters["default"]
    a0 = v0.lora_A.detach().clone()
    lorapro_step(plain, lr=lr)
    lorapro_step(decayed, lr=lr, weight_decay=wd)
    shrink = (1 - lr * wd) ** 0.5
    assert rel(v1.lora_A.detach() - v0.lora_A.detach(), (shrink - 1) * a0) <= 1e-5
