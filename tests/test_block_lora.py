"""Block-LoRA: shared down-projection blocks, ΔW = s·B·A₀·[I … I] (or s·(Σ B_i)·A₀ with split="rank")."""
import pytest
import torch

import lorakit
from lorakit.errors import ConfigError

from contract import check_merge_cycle, check_mixed_batch, check_save_load_save, close, injected, mlp, planted_task, run
from models import convnet, inputs, vit

X = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))


def block(r=4, targets=("fc1", "fc2"), **options):
    return lorakit.AdapterConfig(r=r, lora_alpha=2 * r, variant="block_lora", target_modules=list(targets),
                                 options=options)


def test_trainable_count_is_m_r_plus_r_n_over_k():
    m, n, r = 64, 64, 4
    for k in (1, 2, 4, 8):
        model = mlp()
        lorakit.inject(model, block(r=r, blocks=k))
        assert lorakit.count_parameters(model)[0] == 2 * (m * r + r * n // k)
    model = mlp()
    lorakit.inject(model, block(r=8, blocks=4, split="rank"))  # B: m·r, shared A₀: (r/k)·n
    assert lorakit.count_parameters(model)[0] == 2 * (m * 8 + 8 // 4 * n)


def test_init_is_zero_delta_with_a_random_shared_block():
    model = mlp()
    lorakit.inject(model, block(blocks=4))
    v = model.fc1.adapters["default"]
    assert v.block_lora_A.shape == (4, 16) and v.block_lora_A.abs().min() > 0
    assert torch.equal(v.delta_weight(), torch.zeros(64, 64))
    with lorakit.disabled(model):
        base = run(model, X)
    assert torch.equal(run(model, X), base)


@pytest.mark.parametrize("split", ["input", "rank"])
def test_delta_weight_and_forward_follow_the_written_out_formula(split):
    model = injected(block(blocks=2, split=split))
    v = model.fc1.adapters["default"]
    a0, b, s = v.block_lora_A.detach(), v.block_lora_B.detach(), 2.0
    expected = s * b @ torch.cat([a0, a0], 1) if split == "input" else s * (b[:, :2] + b[:, 2:]) @ a0
    assert close(v.delta_weight().detach(), expected)
    if split == "input":  # every input block sees the same A₀: ΔW's column blocks repeat
        assert torch.equal(v.delta_weight()[:, :32], v.delta_weight()[:, 32:])
    with lorakit.disabled(model):
        h = model.fc1(X)
    with torch.no_grad():
        ref = h + X @ expected.T
        assert close(model.fc1(X), ref)  # in-place inference path
    assert close(model.fc1(X).detach(), ref)  # autograd path


def test_merge_cycle_and_save_load_save(tmp_path):
    config = block(blocks=4)
    model = injected(config)
    check_merge_cycle(model, X)
    check_save_load_save(injected(config), mlp(), X, tmp_path)


def test_mixed_batch_rows_equal_single_runs():
    model = injected(block(blocks=4), "a", seed=1)
    injected(block(r=8, blocks=2, split="rank"), "b", seed=2, model=model)
    check_mixed_batch(model, X)


def test_planted_task():
    # input split: ΔW = B·A₀·[I I] can only hold the block average of a generic ΔW (~1/k of it for k blocks):
    # with k = 2 about half the planted change is learnable, hence k = 2 here.
    before, after, n = planted_task(block(r=4, targets=["fc1"], blocks=2), steps=150)
    assert after <= 0.5 * before and n == 64 * 4 + 4 * 32
    # rank split with r = 8, k = 2: a rank-4 LoRA in effect, fits the planted rank-4 ΔW
    before, after, n = planted_task(block(r=8, targets=["fc1"], blocks=2, split="rank"), steps=100)
    assert after <= 0.5 * before and n == 64 * 8 + 4 * 64


def test_vision_vit_and_conv(tmp_path):
    pixels = inputs("vit", batch=3)
    config = block(targets=["q_proj", "v_proj", "fc1", "fc2"], blocks=8)  # hidden 32, intermediate 64
    check_merge_cycle(injected(config, model=vit()), pixels)
    check_save_load_save(injected(config, model=vit()), vit(), pixels, tmp_path / "vit")
    # Conv is supported through the factored form: n = in_channels·kernel (48 and 9), head n = 96
    ids = inputs("convnet", batch=3)["input_ids"]
    conv = block(targets=["conv", "conv2d", "head"], blocks=3)
    check_merge_cycle(injected(conv, model=convnet()), ids)
    check_save_load_save(injected(conv, model=convnet()), convnet(), ids, tmp_path / "conv")


def test_invalid_options_raise_config_errors_naming_them():
    with pytest.raises(ConfigError, match="blocks"):
        block(blocks=0)
    with pytest.raises(ConfigError, match="split"):
        block(split="rows")
    with pytest.raises(ConfigError, match="blocks=5 must divide the input size n=64 of layer 'fc1'"):
        lorakit.inject(mlp(), block(blocks=5))
    with pytest.raises(ConfigError, match="blocks=3 must divide the rank r=4"):
        lorakit.inject(mlp(), block(blocks=3, split="rank"))
    with pytest.raises(ConfigError, match="sizes"):
        block(sizes=2)


def fit(config, delta, steps=300, lr=1e-2):
    """(test MSE before, after) of training `config` on fc1 of the MLP to a teacher whose fc1 differs by `delta`."""
    g = torch.Generator().manual_seed(3)
    x, x_test = torch.randn(2000, 64, generator=g), torch.randn(500, 64, generator=g)
    teacher = mlp()
    with torch.no_grad():
        teacher.fc1.weight.add_(delta)
        y, y_test = teacher(x), teacher(x_test)
    model = mlp()
    torch.manual_seed(0)
    lorakit.inject(model, config)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    mse = torch.nn.functional.mse_loss
    with torch.no_grad():
        before = mse(model(x_test), y_test).item()
    for step in range(steps):
        i = (step * 200) % 2000
        opt.zero_grad()
        mse(model(x[i:i + 200]), y[i:i + 200]).backward()
        opt.step()
    with torch.no_grad():
        return before, mse(model(x_test), y_test).item(), model


def test_input_split_fits_its_own_class_exactly():
    """The default reading is a block matrix ΔW = [B_i·A₀]_{i,j}: any ΔW with k equal column blocks of rank r is
    reachable, and training finds it (a generic ΔW is not: only its block average is, see test_planted_task)."""
    g = torch.Generator().manual_seed(1)
    delta = (torch.randn(64, 4, generator=g) @ torch.randn(4, 8, generator=g)).repeat(1, 8) * 0.05
    before, after, _ = fit(block(r=4, targets=["fc1"], blocks=8), delta)
    assert after <= 1e-3 * before, (before, after)


def test_rank_split_arms_never_part_from_zero_init():
    """Why `split="rank"` is not the default: with B = 0 at init every arm B_i gets the same gradient s·G·A₀ᵀ, so the
    arms stay equal through training and (Σ B_i)·A₀ is a rank-r/k LoRA whose B learns k× faster."""
    delta = torch.randn(64, 64, generator=torch.Generator().manual_seed(2)) * 0.02
    _, _, model = fit(block(r=8, targets=["fc1"], blocks=4, split="rank"), delta, steps=40)
    arms = model.fc1.adapters["default"].block_lora_B.detach().view(64, 4, 2)
    assert arms.abs().max() > 0.01
    for i in range(1, 4):
        assert torch.allclose(arms[:, i], arms[:, 0], atol=1e-6)
