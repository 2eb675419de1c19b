"""LoRA-SB: LoRA-XS's architecture with s = 1, initialized from ΔW₁ = −η·sign(Σ∂L/∂W) by `lorakit.initialize`."""
import json

import pytest
import torch

import lorakit
from lorakit.errors import ConfigError
from lorakit.init import InitRun, passes
from lorakit.layers import AdaptedLayer

from contract import (check_merge_cycle, check_mixed_batch, check_save_load_save, close, mlp, mse_loss, perturb,
                      planted_task, planted_teacher, run)

G = torch.Generator().manual_seed(11)
XS = torch.randn(96, 64, generator=G)
with torch.no_grad():
    YS = planted_teacher()(XS)
BATCHES = [(XS[i:i + 32], YS[i:i + 32]) for i in range(0, 96, 32)]
X = XS[:6]
ETA = 1e-2


def sb(r=8, **kw):
    return lorakit.AdapterConfig(r=r, variant="lora_sb", target_modules=kw.pop("target_modules", ["fc1", "fc2"]),
                                 **kw)


def layers(model):
    return {p: m for p, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def sb_init(model, name="default", **kw):
    return lorakit.initialize(model, "lora-sb", BATCHES, name, loss_fn=mse_loss, progress=False,
                              **(kw or {"eta": ETA}))


def sb_mlp(names=("default",)):
    """Adapters initialized from data, then perturbed (the second one on a different rank)."""
    model = mlp()
    for i, n in enumerate(names):
        lorakit.inject(model, sb(r=8 - 2 * i), n)
        sb_init(model, n)
        perturb(model, n, seed=i)
    return model


def explicit_gradients():
    """Σ over BATCHES of ∂L/∂W for fc1 and fc2 of the plain base, by torch.autograd.grad."""
    model = mlp()
    weights = [model.fc1.weight, model.fc2.weight]
    total = [torch.zeros_like(w) for w in weights]
    for batch in BATCHES:
        for t, g in zip(total, torch.autograd.grad(mse_loss(model, batch), weights)):
            t += g
    return dict(zip(["fc1", "fc2"], total))


def best_rank(m, r):
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r], s


def test_trainable_count_is_r_squared_per_layer_and_scale_is_one():
    for r in (3, 6):
        model = mlp()
        lorakit.inject(model, sb(r=r, lora_alpha=64, use_rslora=True))
        assert lorakit.count_parameters(model)[0] == 2 * r * r
        assert all(m.adapters["default"].scale == 1.0 for m in layers(model).values())  # α ignored (α = r)


def test_before_the_data_init_the_adapter_is_an_orthonormal_svd_frame_with_zero_core():
    model = mlp()
    w = model.fc1.weight.detach().clone()
    lorakit.inject(model, sb(r=6))
    v = layers(model)["fc1"].adapters["default"]
    assert close(v.lora_B.T @ v.lora_B, torch.eye(6)) and close(v.lora_A @ v.lora_A.T, torch.eye(6))
    best, _ = best_rank(w, 6)
    assert close((v.lora_B @ torch.diag(torch.linalg.svdvals(w)[:6]) @ v.lora_A).double(), best)  # U_r, V_rᵀ of W
    assert torch.count_nonzero(v.lora_R) == 0
    with lorakit.disabled(model):
        base = run(model, X)
    assert torch.equal(run(model, X), base)  # ΔW = 0 until lorakit.initialize(model, "lora-sb", ...)


def test_gradient_pass_equals_explicit_autograd_gradients():
    model = mlp()
    lorakit.inject(model, sb())
    grads = passes.weight_gradients(InitRun(model, "default", BATCHES, mse_loss, progress=False))
    expected = explicit_gradients()
    for path in ("fc1", "fc2"):
        assert close(grads[path], expected[path], tol=1e-6), path


def test_data_init_is_the_best_rank_r_approximation_of_the_sign_step():
    r = 8
    model = mlp()
    lorakit.inject(model, sb(r=r))
    with lorakit.disabled(model):
        base = run(model, X)
    sb_init(model)
    expected = explicit_gradients()
    for path, layer in layers(model).items():
        v = layer.adapters["default"]
        update = -ETA * torch.sign(expected[path])
        best, s = best_rank(update, r)
        got = v.delta_weight().double()
        assert (got - best).norm() <= 1e-5 * best.norm(), path                   # Eckart–Young, exact SVD
        assert abs((update - got).norm() ** 2 - s[r:].pow(2).sum()) <= 1e-5 * s.pow(2).sum(), path
        assert close(v.lora_B.T @ v.lora_B, torch.eye(r)) and close(v.lora_A @ v.lora_A.T, torch.eye(r))
        assert close(v.lora_R, torch.diag(s[:r]).float())                        # R = S_r (diagonal at init)
        assert not v.lora_A.requires_grad and not v.lora_B.requires_grad and v.lora_R.requires_grad
    assert not close(run(model, X), base)  # ΔW ≠ 0 on purpose: training starts one step in
    w = model.fc1.base_layer.weight
    assert w.grad is None and not w.requires_grad  # the pass leaves the base frozen and clean


def test_eta_from_lr_warmup_and_total_steps():
    """η = lr / (warmup_ratio · total_steps), the first warm-up learning rate, as the reference."""
    a, b = mlp(), mlp()
    lorakit.inject(a, sb())
    lorakit.inject(b, sb())
    sb_init(a, eta=3e-4 / (0.05 * 200))
    sb_init(b, lr=3e-4, warmup_ratio=0.05, total_steps=200)
    for (p, la), (_, lb) in zip(layers(a).items(), layers(b).items()):
        assert close(la.adapters["default"].delta_weight(), lb.adapters["default"].delta_weight(), tol=1e-6), p


def test_lowrank_svd_option_is_near_optimal():
    torch.manual_seed(0)
    model = mlp()
    lorakit.inject(model, sb(r=8))
    sb_init(model, eta=ETA, svd="lowrank", niter=10)
    update = -ETA * torch.sign(explicit_gradients()["fc1"])
    best, _ = best_rank(update, 8)
    got = layers(model)["fc1"].adapters["default"].delta_weight().double()
    sv = torch.linalg.svdvals(got)
    assert sv[8:].max() <= 1e-5 * sv[0]  # rank 8
    assert (update - got).norm() <= 1.05 * (update - best).norm()


def test_merge_cycle_and_save_load_save(tmp_path):
    check_merge_cycle(sb_mlp(), X)
    check_save_load_save(sb_mlp(), mlp(), X, tmp_path)  # data-derived factors travel in the file
    assert json.loads((tmp_path / "first" / "adapter_config.json").read_text())["peft_type"] == "LORAKIT_LORA_SB"


def test_mixed_batch():
    check_mixed_batch(sb_mlp(("a", "b")), X)


def test_planted_task_with_data_init():
    init = lambda model, loader: lorakit.initialize(model, "lora-sb", loader, loss_fn=mse_loss, eta=ETA,  # noqa
                                                    progress=False)
    before, after, n = planted_task(sb(r=32, target_modules=["fc1"]), init=init)
    assert n == 32 * 32
    assert after <= 0.5 * before, (before, after)


def test_errors():
    model = mlp()
    lorakit.inject(model, sb())
    with pytest.raises(ConfigError, match="eta=.*lr=.*total_steps"):
        sb_init(model, lr=1e-3)
    with pytest.raises(ConfigError, match="eta"):
        sb_init(model, eta=-1.0)
    with pytest.raises(ConfigError, match="svd"):
        sb_init(model, eta=1.0, svd="random")
    with pytest.raises(ConfigError, match="dataloader"):
        lorakit.initialize(model, "lora-sb", None, eta=1.0)
    with pytest.raises(ConfigError, match="takes no options"):
        sb(options={"eta": 1.0})
    other = mlp()
    lorakit.inject(other, lorakit.AdapterConfig(r=4, target_modules=["fc1"]))
    with pytest.raises(ConfigError, match="lora_sb"):
        lorakit.initialize(other, "lora-sb", BATCHES, loss_fn=mse_loss, eta=1.0, progress=False)
    with pytest.raises(ConfigError, match="r=65"):
        lorakit.inject(mlp(), sb(r=65))


def test_a_run_starts_from_the_data_init(tmp_path, monkeypatch):
    """`lorakit train` with variant lora_sb runs the lora-sb init before training, with η = the run's first
    warm-up learning rate (lr / warm-up steps)."""
    from lorakit.train import RunConfig
    from lorakit.train import run as run_module
    from test_cli import write_sentiment

    seen = {}
    real = run_module.initialize

    def spy(model, method, **kw):
        seen.update(method=method, **kw)
        return real(model, method, **kw)
    monkeypatch.setattr(run_module, "initialize", spy)
    data = write_sentiment(tmp_path / "data.jsonl", n=40)
    config = RunConfig.from_flat({"model": "tiny-llama", "data": data, "variant": "lora_sb", "r": 2,
                                  "learning_rate": 1e-3, "warmup_steps": 2, "init_batches": 1, "max_steps": 4,
                                  "per_device_train_batch_size": 4, "disable_tqdm": True,
                                  "output_dir": str(tmp_path / "run")})
    run_module.train(config)
    assert seen["method"] == "lora-sb" and seen["lr"] == 1e-3 and seen["total_steps"] == 4
    assert seen["warmup_ratio"] * 4 == pytest.approx(2)
