"""LoRA-GA: plain LoRA training from A₀, B₀ = singular vectors of the averaged gradient, offset −s·B₀A₀ in the adapter."""
import json

import pytest
import torch

import lorakit
from lorakit.errors import ConfigError, UnsupportedFeatureError
from lorakit.layers import AdaptedLayer
from lorakit.variants import get_variant

from models import convnet, inputs, vit
from contract import (check_export_loads_in_peft, check_merge_cycle, check_mixed_batch, check_save_load_save, close,
                      mlp, mse_loss, perturb, planted_task, planted_teacher, run)

pytestmark = pytest.mark.usefixtures("one_thread_module")

G = torch.Generator().manual_seed(11)
XS = torch.randn(96, 64, generator=G)
with torch.no_grad():
    YS = planted_teacher()(XS)
BATCHES = [(XS[i:i + 32], YS[i:i + 32]) for i in range(0, 96, 32)]
X = XS[:6]
R, ALPHA = 4, 8


def ga(r=R, target_modules=("fc1", "fc2"), **options):
    return lorakit.AdapterConfig(r=r, lora_alpha=ALPHA, variant="lora_ga", target_modules=list(target_modules),
                                 options=options)


def layers(model, name="default"):
    return {p: m for p, m in model.named_modules() if isinstance(m, AdaptedLayer) and name in m.adapters}


def ga_init(model, name="default"):
    return lorakit.initialize(model, "lora-ga", BATCHES, name, loss_fn=mse_loss, progress=False)


def ga_mlp(config=None, name="default"):
    model = mlp()
    torch.manual_seed(0)
    lorakit.inject(model, config or ga(), name)
    return ga_init(model, name)


def mean_gradients():
    """(1/#batches)·Σ ∂L/∂W over BATCHES for fc1 and fc2 of the plain base, by torch.autograd.grad (float64)."""
    model = mlp()
    weights = [model.fc1.weight, model.fc2.weight]
    total = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    for batch in BATCHES:
        for t, g in zip(total, torch.autograd.grad(mse_loss(model, batch), weights)):
            t += g.double() / len(BATCHES)
    return dict(zip(["fc1", "fc2"], total))


def cosine(a, b):
    return ((a * b).sum() / (a.norm() * b.norm())).item()


def in_span(rows, basis):
    """‖projection of `rows` (k, n) on the row span of orthonormal `basis` (j, n)‖ / ‖rows‖."""
    rows, basis = rows.double(), basis.double()
    return ((rows @ basis.T @ basis).norm() / rows.norm()).item()


def test_trainable_count_and_plain_lora_before_the_data_init():
    model = mlp()
    torch.manual_seed(0)
    lorakit.inject(model, ga())
    assert lorakit.count_parameters(model)[0] == 2 * R * (64 + 64)  # r·(in + out) per layer, fc1 and fc2
    for layer in layers(model).values():
        v = layer.adapters["default"]
        assert v.lora_A.abs().min() > 0 and torch.count_nonzero(v.lora_B) == 0  # kaiming A, B = 0: plain LoRA
        assert torch.count_nonzero(v.lora_A0) == 0 and torch.count_nonzero(v.lora_B0) == 0  # no offset yet
        assert v.lora_A.requires_grad and not v.lora_A0.requires_grad
    with pytest.raises(UnsupportedFeatureError, match="init_lora_weights"):
        lorakit.inject(mlp(), lorakit.AdapterConfig(r=R, variant="lora_ga", target_modules=["fc1"],
                                                    init_lora_weights="pissa"))


def test_data_init_keeps_the_output_and_the_base_and_takes_the_gradient_subspaces():
    model = mlp()
    torch.manual_seed(0)
    lorakit.inject(model, ga())
    with lorakit.disabled(model):
        base = run(model, XS)
    weights = {p: m.base_layer.weight.detach().clone() for p, m in layers(model).items()}
    ga_init(model)
    assert close(run(model, XS), base, tol=1e-5)  # output unchanged at init (offset −s·B₀A₀ in the adapter)
    grads = mean_gradients()
    factor = 64 ** 0.25 / 16 ** 0.5  # stable: m^{1/4}/√γ
    for path, layer in layers(model).items():
        v = layer.adapters["default"]
        assert torch.equal(layer.base_layer.weight, weights[path])  # the base is never modified
        assert torch.equal(v.lora_A, v.lora_A0) and torch.equal(v.lora_B, v.lora_B0)
        assert v.delta_weight().abs().max() <= 1e-6
        u, _, vh = torch.linalg.svd(grads[path])
        assert close(v.lora_A @ v.lora_A.T / factor ** 2, torch.eye(R), tol=1e-5)  # orthonormal × factor
        assert close(v.lora_B.T @ v.lora_B / factor ** 2, torch.eye(R), tol=1e-5)
        assert in_span(v.lora_A, vh[:R]) > 0.999          # A = Vᵀ[:r]
        assert in_span(v.lora_B.T, u[:, R:2 * R].T) > 0.999  # B = U[:, r:2r]
    w = model.fc1.base_layer.weight
    assert w.grad is None and not w.requires_grad  # the gradient pass leaves the base frozen and clean


def one_sgd_step_cosines(variant):
    """cos(−ΔW_step, G) per layer after one plain-SGD step on the mean loss over BATCHES (G its explicit gradient),
    and cos(G_2r, G) for G's best rank-2r approximation."""
    model = mlp()
    torch.manual_seed(0)
    lorakit.inject(model, lorakit.AdapterConfig(r=R, lora_alpha=ALPHA, variant=variant, target_modules=["fc1", "fc2"]))
    if variant == "lora_ga":
        ga_init(model)
    found = layers(model)
    start = {p: m.adapters["default"].delta_weight().detach().double() for p, m in found.items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = sum(mse_loss(model, b) for b in BATCHES) / len(BATCHES)
    opt.zero_grad()
    loss.backward()
    opt.step()
    out = {}
    for path, g in mean_gradients().items():
        step = found[path].adapters["default"].delta_weight().detach().double() - start[path]
        u, s, vh = torch.linalg.svd(g)
        best = (u[:, :2 * R] * s[:2 * R]) @ vh[:2 * R]
        out[path] = (cosine(-step, g), cosine(best, g))
    return out


def test_one_sgd_step_follows_the_full_gradient():
    """Issue 5 acceptance: cos(ΔW_step, G) ≥ 0.9·cos(G_2r, G), far above default LoRA init's."""
    ours, plain = one_sgd_step_cosines("lora_ga"), one_sgd_step_cosines("lora")
    for path in ("fc1", "fc2"):
        (c_ga, c_best), (c_lora, _) = ours[path], plain[path]
        print(f"{path}: cos(ΔW_step, G) LoRA-GA {c_ga:.4f}, default LoRA {c_lora:.4f}; cos(G_2r, G) {c_best:.4f}")
        assert c_ga >= 0.9 * c_best
        assert c_lora <= 0.5 * c_ga


@pytest.mark.parametrize("direction, a_idx, b_idx", [("ArB2r", range(0, R), range(R, 2 * R)),
                                                    ("A2rBr", range(R, 2 * R), range(0, R)),
                                                    ("ArBr", range(1, 2 * R, 2), range(0, 2 * R, 2))])
def test_directions_pick_their_singular_vectors(direction, a_idx, b_idx):
    model = ga_mlp(ga(direction=direction, target_modules=["fc1"]))
    v = layers(model)["fc1"].adapters["default"]
    u, _, vh = torch.linalg.svd(mean_gradients()["fc1"])
    assert in_span(v.lora_A, vh[list(a_idx)]) > 0.999
    assert in_span(v.lora_B.T, u[:, list(b_idx)].T) > 0.999


def test_random_direction_is_seeded_and_disjoint():
    a, b = ga_mlp(ga(direction="random", target_modules=["fc1"])), ga_mlp(ga(direction="random", target_modules=["fc1"]))
    va, vb = layers(a)["fc1"].adapters["default"], layers(b)["fc1"].adapters["default"]
    assert torch.equal(va.lora_A, vb.lora_A) and torch.equal(va.lora_B0, vb.lora_B0)  # deterministic (seed)
    u, _, vh = torch.linalg.svd(mean_gradients()["fc1"])
    top = u[:, :2 * R].T.double()
    assert in_span(va.lora_B.T, top) > 0.999 and in_span(va.lora_A, vh[:2 * R]) > 0.999
    # the authors' random split: B's left vectors and A's right vectors come from disjoint components
    b_comp = (u[:, :2 * R].double().T @ va.lora_B.double()).abs().sum(1) > 1e-3
    a_comp = (vh[:2 * R].double() @ va.lora_A.double().T).abs().sum(1) > 1e-3
    assert b_comp.sum() == R and a_comp.sum() == R and not (a_comp & b_comp).any()


def test_scales_and_peft_form():
    s = ALPHA / R
    g = mean_gradients()["fc1"]
    u, sv, vh = torch.linalg.svd(g)
    sw = torch.linalg.svdvals(mlp().fc1.weight.detach().double())
    stable = 64 ** 0.25 / 16 ** 0.5
    norms = {  # (row norms of A, column norms of B) per (scale, form); ArB2r
        ("stable", "authors"): (stable, stable),
        ("gd", "authors"): (1 / s, 1 / s),
        ("unit", "authors"): (1.0, 1.0),
        ("weightS", "authors"): ((sw[:R] / s).sqrt().mean(), (sw[:R] / s).sqrt().mean()),
        ("stable", "peft"): (1.0, stable * sv[R:2 * R]),
        ("unit", "peft"): (1.0, sv[R:2 * R]),
        ("weightS", "peft"): (1.0, sv[R:2 * R] * sw[0] / sv[R]),
    }
    for (scale, form), (na, nb) in norms.items():
        v = layers(ga_mlp(ga(scale=scale, form=form, target_modules=["fc1"])))["fc1"].adapters["default"]
        na, nb = torch.as_tensor(na, dtype=torch.float64).expand(R), torch.as_tensor(nb, dtype=torch.float64).expand(R)
        assert close(v.lora_A.double().norm(dim=1), na, tol=1e-4), (scale, form)
        assert close(v.lora_B.double().norm(dim=0), nb, tol=1e-3 * nb.max().item()), (scale, form)
    gamma4 = layers(ga_mlp(ga(stable_gamma=4, target_modules=["fc1"])))["fc1"].adapters["default"]
    assert close(gamma4.lora_A.norm(dim=1), torch.full((R,), 64 ** 0.25 / 2), tol=1e-4)


def test_norm_clip_bounds_the_offset_by_the_weight():
    """With α = 4096 the unclipped offset s·B₀A₀ would exceed max|W| many times."""
    v = layers(ga_mlp(lorakit.AdapterConfig(r=R, lora_alpha=4096, variant="lora_ga", target_modules=["fc1"],
                                            options={"norm_clip": True})))["fc1"]
    a, w_max = v.adapters["default"], v.base_layer.weight.abs().max()
    offset = (a.scale * a.lora_B0 @ a.lora_A0).abs().max()
    assert offset <= w_max * (1 + 1e-5)
    unclipped = layers(ga_mlp(lorakit.AdapterConfig(r=R, lora_alpha=4096, variant="lora_ga",
                                                    target_modules=["fc1"])))["fc1"].adapters["default"]
    assert (unclipped.scale * unclipped.lora_B0 @ unclipped.lora_A0).abs().max() > 10 * w_max
    ratio = (w_max / (unclipped.scale * unclipped.lora_B0 @ unclipped.lora_A0).abs().max()).sqrt()
    assert close(a.lora_A0, unclipped.lora_A0 * ratio) and close(a.lora_B0, unclipped.lora_B0 * ratio)


def test_merge_cycle_save_load_save_and_export_to_peft(tmp_path):
    model = ga_mlp()
    perturb(model)
    check_merge_cycle(model, X)
    check_save_load_save(model, mlp(), X, tmp_path)  # A, B, A₀, B₀ travel in the file
    data = json.loads((tmp_path / "first" / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORAKIT_LORA_GA" and data["options"]["direction"] == "ArB2r"
    check_export_loads_in_peft(model, mlp(), X, tmp_path / "export", r=2 * R)  # rank-2r plain LoRA on W₀


def test_mixed_batch_of_two_gradient_inits():
    model = mlp()
    torch.manual_seed(0)
    lorakit.inject(model, ga(), "a")
    lorakit.inject(model, ga(r=3, direction="A2rBr", form="peft"), "b")
    for i, name in enumerate("ab"):
        ga_init(model, name)
        perturb(model, name, seed=i)
    check_mixed_batch(model, X)


def test_data_init_hook_and_planted_task():
    method, options = get_variant("lora_ga").data_init(ga(), {"learning_rate": 1e-3, "total_steps": 10,
                                                               "warmup_steps": 0})
    assert method == "lora-ga" and method in lorakit.init.init_methods()
    before, after, n = planted_task(ga(target_modules=["fc1"]), steps=150, init=lambda m, loader: lorakit.initialize(
        m, method, loader, loss_fn=mse_loss, progress=False, **options))
    print(f"planted task: MSE {before:.4f} -> {after:.4f}, {n} parameters")
    assert n == R * 128 and after <= 0.5 * before


def test_options_and_errors():
    for options, key in [({"direction": "BrA2r"}, "direction"), ({"scale": "weight_svd"}, "scale"),
                         ({"form": "hf"}, "form"), ({"stable_gamma": 0}, "stable_gamma"),
                         ({"stable_gamma": True}, "stable_gamma"), ({"niter": -1}, "niter"), ({"seed": 1.5}, "seed"),
                         ({"norm_clip": "yes"}, "norm_clip")]:
        with pytest.raises(ConfigError, match=key):
            lorakit.inject(mlp(), ga(**options))
    with pytest.raises(ConfigError, match="unknown option"):
        lorakit.inject(mlp(), ga(gamma=16))
    with pytest.raises(ConfigError, match="2r = 80"):  # 2r singular components must exist
        ga_mlp(ga(r=40))
    plain = mlp()
    lorakit.inject(plain, lorakit.AdapterConfig(r=R, target_modules=["fc1"]))
    with pytest.raises(ConfigError, match="lora_ga"):
        ga_init(plain)
    with pytest.raises(ConfigError, match="dataloader"):
        lorakit.initialize(ga_mlp(), "lora-ga", None, loss_fn=mse_loss)


def test_vision_vit_and_convnet(tmp_path):
    """ViT (every Linear + the patch Conv2d, default `.loss` from labels) and ConvNet (Embedding, Conv1d, Conv2d: the
    flattened kernel matrix, and the head, with a cross-entropy loss_fn): output unchanged after the data init, then
    merge cycle and save/load."""
    x = inputs("vit", batch=4)
    data = [{**x, "labels": torch.tensor([0, 1, 2, 1])}]
    model = lorakit.inject(vit(), ga(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2",
                                                          "projection"]))
    lorakit.initialize(model, "lora-ga", data, progress=False)
    assert close(run(model, x), run(vit(), x))
    assert layers(model)["vit.embeddings.patch_embeddings.projection"].adapters["default"].lora_B0.abs().max() > 0
    perturb(model)
    check_merge_cycle(model, x)
    check_save_load_save(model, vit(), x, tmp_path / "vit")
    x = inputs("convnet", batch=5)
    labels = torch.tensor([0, 1, 2, 3, 4])
    model = lorakit.inject(convnet(), ga(r=2, target_modules=["emb", "conv", "conv2d", "head"]))
    lorakit.initialize(model, "lora-ga", [(x, labels)], progress=False,
                       loss_fn=lambda m, b: torch.nn.functional.cross_entropy(m(**b[0]), b[1]))
    assert close(run(model, x), run(convnet(), x))
    assert all(m.adapters["default"].lora_A0.abs().max() > 0 for m in layers(model).values())
    perturb(model)
    check_merge_cycle(model, x)
    check_save_load_save(model, convnet(), x, tmp_path / "convnet")


def test_a_run_starts_with_the_gradient_init(tmp_path, monkeypatch):
    """`lorakit train --variant lora_ga` runs the data init on `init_batches` training batches before training."""
    from lorakit.train import RunConfig, train
    from test_cli import write_sentiment

    calls = []
    real = lorakit.init._METHODS["lora-ga"]

    def spy(run, **kw):
        real(run, **kw)
        v = next(iter(layers(run.model, run.name).values())).adapters[run.name]
        calls.append((len(list(run.dataloader)), v.lora_B0.abs().max().item(), torch.equal(v.lora_B, v.lora_B0)))
    monkeypatch.setitem(lorakit.init._METHODS, "lora-ga", spy)
    data = write_sentiment(tmp_path / "data.jsonl", n=40)
    config = RunConfig.from_flat({"model": "tiny-llama", "data": data, "variant": "lora_ga", "r": 2,
                                  "init_batches": 2, "max_steps": 1, "per_device_train_batch_size": 4,
                                  "disable_tqdm": True, "output_dir": str(tmp_path / "run")})
    results = train(config)
    assert len(calls) == 1 and calls[0][0] == 2 and calls[0][1] > 0 and calls[0][2]
    assert results["steps"] == 1 and results["variant"] == "lora_ga"
