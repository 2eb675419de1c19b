"""MM-LoRA: a vision and a language LoRA per layer, chosen per token by a modality mask carried by the routing."""
import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.errors import ConfigError, MergeError, RoutingError, TargetError

from contract import check_save_load_save, close, injected, mlp, perturb, planted_task, run
from models import convnet, llama

G = torch.Generator().manual_seed(0)
X = torch.randn(4, 5, 64, generator=G)  # (batch, seq, features)
MASK = torch.rand(4, 5, generator=G) < 0.4  # True = image token
MASK[1] = False  # an all-text row
MASK[2] = True  # an all-image row


def mm(r=4, targets=("fc1", "fc2"), alpha=8, **options):
    return lorakit.AdapterConfig(r=r, lora_alpha=alpha, variant="mm_lora", target_modules=list(targets),
                                 options=options)


def routed(model, x, mask, grad=False):
    with lorakit.route(model, token_masks={"image": mask}), torch.set_grad_enabled(grad):
        return model(x)


def two_branch(model, x, m, name="default"):
    """The card's formula written out: y = Wx + M⊙(s_v B_v A_v x) + (1 − M)⊙(s_t B_t A_t x) on fc1 and fc2."""
    m = m.to(x.dtype)[..., None]

    def layer(module, h):
        v = module.adapters[name]
        s_v, s_t = 8 / v.r_vision, 8 / v.r_text  # α/r_branch
        vision = s_v * F.linear(F.linear(h, v.lora_A_vision), v.lora_B_vision)
        text = s_t * F.linear(F.linear(h, v.lora_A_text), v.lora_B_text)
        return module.base_layer(h) + m * vision + (1 - m) * text
    with torch.no_grad():
        return layer(model.fc2, F.gelu(layer(model.fc1, x)))


def test_trainable_count_is_both_branches():
    m = n = 64
    for r, beta in [(4, 0.5), (8, 0.25)]:
        model = mlp()
        lorakit.inject(model, mm(r=r, beta=beta))
        r_v, r_t = int(beta * r), r - int(beta * r)
        assert lorakit.count_parameters(model)[0] == 2 * ((m + n) * r_v + (m + n) * r_t)
        assert model.fc1.adapters["default"].lora_A_vision.shape == (r_v, n)


def test_init_is_zero_delta():
    model = mlp()
    lorakit.inject(model, mm())
    v = model.fc1.adapters["default"]
    assert v.lora_A_vision.abs().min() > 0 and v.lora_A_text.abs().min() > 0
    with lorakit.disabled(model):
        base = run(model, X)
    assert torch.equal(routed(model, X, MASK), base)


def test_output_is_the_two_branch_formula_for_hard_soft_and_flattened_masks():
    model = injected(mm())
    for mask in (MASK, torch.rand(4, 5, generator=G)):  # bool, and soft weights in [0, 1]
        ref = two_branch(model, X, mask)
        assert close(routed(model, X, mask), ref)  # in-place inference path
        assert close(routed(model, X, mask, grad=True).detach(), ref)  # autograd path
    # the mask lives on the flattened token axis: a layer input (batch·seq, features) gets the same tokens
    assert close(routed(model, X.reshape(20, 64), MASK), two_branch(model, X, MASK).reshape(20, 64))
    with lorakit.disabled(model):
        base = run(model, X)
    assert not close(routed(model, X, MASK), base)


def test_all_text_rows_equal_a_plain_lora_with_the_text_weights():
    model = injected(mm(r=8, beta=0.25))
    plain = mlp()
    lorakit.inject(plain, lorakit.AdapterConfig(r=6, lora_alpha=8, target_modules=["fc1", "fc2"]))
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            v, lora = getattr(model, name).adapters["default"], getattr(plain, name).adapters["default"]
            lora.lora_A.copy_(v.lora_A_text)
            lora.lora_B.copy_(v.lora_B_text)
    out = routed(model, X, MASK)
    assert close(out[1], run(plain, X[1]))
    assert not close(out[0], run(plain, X[0]))  # rows with image tokens differ
    text_only = injected(mm(r=8, beta=0.25, unmasked="text"))  # same seed: same weights, no mask needed
    assert close(run(text_only, X), run(plain, X))


def test_gradients_reach_each_branch_from_its_own_tokens_only():
    model = injected(mm())
    routed(model, X, torch.zeros(4, 5, dtype=torch.bool), grad=True).pow(2).sum().backward()
    v = model.fc1.adapters["default"]
    assert torch.equal(v.lora_B_vision.grad, torch.zeros_like(v.lora_B_vision))
    assert torch.equal(v.lora_A_vision.grad, torch.zeros_like(v.lora_A_vision))
    assert v.lora_B_text.grad.abs().sum() > 0


def test_mixed_batch_with_token_masks_equals_each_row_alone():
    """Per-row adapters and per-token masks together: each row equals running it alone with its adapter
    and its row of the mask (the mask is gathered with the rows)."""
    model = injected(mm(), "a", seed=1)
    injected(mm(r=8, beta=0.75), "b", seed=2, model=model)
    names = ["b", "a", lorakit.BASE, "a"]
    expected = []
    for i, name in enumerate(names):
        if name == lorakit.BASE:
            with lorakit.disabled(model):
                expected.append(run(model, X[i:i + 1]))
            continue
        lorakit.set_active(model, [name])
        expected.append(routed(model, X[i:i + 1], MASK[i:i + 1]))
    expected = torch.cat(expected)
    for grad in (False, True):
        with lorakit.route(model, names, token_masks={"image": MASK}), torch.set_grad_enabled(grad):
            assert close(model(X).detach(), expected)


def test_not_mergeable():
    model = injected(mm())
    with pytest.raises(MergeError, match="cannot be merged"):
        lorakit.merge(model)
    with pytest.raises(MergeError, match="cannot be merged"):
        lorakit.merge_and_unload(model)
    with pytest.raises(MergeError, match="low-rank"):
        lorakit.export_lora(model, "/nonexistent/never-written")
    assert not model.fc1.merged
    assert close(routed(model, X, MASK), two_branch(model, X, MASK))


def test_save_load_save(tmp_path):
    config = mm(unmasked="image")  # runs without a mask (every token vision) inside the contract check
    loaded = check_save_load_save(injected(config), mlp(), X, tmp_path)
    assert close(routed(loaded, X, MASK), routed(injected(config), X, MASK))


def test_mask_errors_are_routing_errors():
    model = injected(mm())
    with pytest.raises(RoutingError, match="token_masks"):
        run(model, X)  # no mask and unmasked="error"
    with pytest.raises(RoutingError, match="20 tokens"):
        routed(model, X[:2], MASK)
    with pytest.raises(RoutingError, match=r"outside \[0, 1\]"):
        routed(model, X, MASK.float() * 2)
    with pytest.raises(RoutingError, match="bool or floating"):
        routed(model, X, MASK.long())
    with pytest.raises(RoutingError, match="adapter_names"):
        with lorakit.route(model):
            pass
    other = injected(mm(mask_key="audio"))
    with pytest.raises(RoutingError, match="'audio'"):
        routed(other, X, MASK)
    assert all(m.routing is None for m in model.modules() if hasattr(m, "routing"))
    assert close(routed(model, X, MASK), two_branch(model, X, MASK))  # still usable


def test_llama_with_a_modality_mask():
    """A real decoder: (batch, seq, hidden) inputs to q/v projections, mask (batch, seq)."""
    model = llama()
    lorakit.inject(model, lorakit.AdapterConfig(r=4, variant="mm_lora", target_modules=["q_proj", "v_proj"]))
    perturb(model)
    ids = torch.randint(0, 128, (2, 6), generator=G)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 1:4] = True
    with torch.no_grad(), lorakit.route(model, token_masks={"image": mask}):
        mixed = model(ids).logits
    with torch.no_grad(), lorakit.route(model, token_masks={"image": torch.zeros_like(mask)}):
        text = model(ids).logits
    assert close(mixed[:, 0], text[:, 0])  # causal: the token before any image token is unchanged
    assert not close(mixed[:, 1:], text[:, 1:])


def test_planted_task_with_all_text_tokens():
    # r = 8, β = 0.5: the text branch has rank 4, the planted ΔW's rank; the vision branch gets no gradient
    before, after, n = planted_task(mm(r=8, targets=["fc1"], alpha=8, unmasked="text"), steps=100)
    assert after <= 0.5 * before and n == (64 + 64) * 8


def test_invalid_options_and_targets():
    with pytest.raises(ConfigError, match="beta"):
        mm(beta=1.5)
    with pytest.raises(ConfigError, match="unmasked"):
        mm(unmasked="video")
    with pytest.raises(ConfigError, match="branch_scale"):
        mm(branch_scale="mean")
    with pytest.raises(ConfigError, match="option beta=0.3"):
        lorakit.inject(mlp(), mm(beta=0.3))  # 1.2 vision ranks
    model = convnet()
    with pytest.raises(TargetError, match="Linear layers only"):
        lorakit.inject(model, mm(targets=["conv"]))
    assert lorakit.adapter_names(model) == []


def test_mask_only_routing_leaves_module_copies_on_their_normal_path():
    config = lorakit.AdapterConfig(r=4, lora_alpha=8, variant="mm_lora", target_modules=["fc1"],
                                   modules_to_save=["fc2"])
    model = injected(config)  # perturbs the trained copy of fc2 too
    v = model.fc1.adapters["default"]
    m = MASK[..., None].float()
    with torch.no_grad():
        h = model.fc1.base_layer(X) + m * 4 * F.linear(F.linear(X, v.lora_A_vision), v.lora_B_vision) \
            + (1 - m) * 4 * F.linear(F.linear(X, v.lora_A_text), v.lora_B_text)
        expected = model.fc2.copies["default"](F.gelu(h))
    assert not close(expected, model.fc2.original_module(F.gelu(h)))
    with lorakit.route(model, token_masks={"image": MASK}):
        assert model.fc2.routing is None
        assert close(run(model, X), expected)


def train_mixed(text_noise=False, steps=300):
    """Train MM-LoRA on fc1 to a teacher whose image tokens see ΔW_v and text tokens ΔW_t (two different rank-2
    changes), on batches mixing both (40 % image tokens). `text_noise`: text targets replaced by noise."""
    g = torch.Generator().manual_seed(4)
    x, image = torch.randn(2000, 64, generator=g), torch.rand(2000, generator=g) < 0.4
    d_v = torch.randn(64, 2, generator=g) @ torch.randn(2, 64, generator=g) * 0.1
    d_t = torch.randn(64, 2, generator=g) @ torch.randn(2, 64, generator=g) * 0.1
    teacher = mlp()
    with torch.no_grad():
        h = teacher.fc1(x) + torch.where(image[:, None], x @ d_v.T, x @ d_t.T)
        y = teacher.fc2(F.gelu(h))
        if text_noise:
            y[~image] = torch.randn(int((~image).sum()), 64, generator=g)
    model = mlp()
    torch.manual_seed(0)
    lorakit.inject(model, mm(r=4, targets=["fc1"], alpha=4))  # two rank-2 branches, s = 2 each
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        i = (step * 200) % 2000
        opt.zero_grad()
        F.mse_loss(routed(model, x[i:i + 200], image[i:i + 200], grad=True), y[i:i + 200]).backward()
        opt.step()
    v = model.fc1.adapters["default"]
    s_v, s_t = v.branch_scales()
    return (s_v * v.lora_B_vision @ v.lora_A_vision).detach(), (s_t * v.lora_B_text @ v.lora_A_text).detach(), d_v, d_t


def test_each_branch_learns_its_own_modality_from_a_mixed_batch():
    learned_v, learned_t, d_v, d_t = train_mixed()

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()
    assert rel(learned_v, d_v) < 0.05 and rel(learned_t, d_t) < 0.05  # each branch recovers its own ΔW
    assert rel(learned_v, d_t) > 0.9 and rel(learned_t, d_v) > 0.9
    # and only from its own tokens: noise on the text targets leaves the vision branch's training unchanged
    noisy_v, noisy_t, _, _ = train_mixed(text_noise=True)
    assert torch.allclose(noisy_v, learned_v, atol=1e-6) and rel(noisy_t, d_t) > 0.5
