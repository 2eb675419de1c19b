"""EVA init (`lorakit.initialize(model, "eva", ...)`): parity with PEFT's EVA on a tiny Llama (ranks, subspaces,
scaling), ΔW = 0 at init, rank-0 layers left unadapted, option errors."""
import pytest
import torch

import lorakit
from lorakit.errors import ConfigError
from lorakit.layers import AdaptedLayer

from contract import check_save_load_save, mlp, mse_loss
from models import llama

pytestmark = pytest.mark.usefixtures("one_thread_module")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def token_batches(n=6, b=4, t=32, seed=0):
    """Random token batches with labels; the first 8 positions are masked out (-100), one row is half padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 128, (b, t), generator=g)
        labels = ids.clone()
        labels[:, :8] = -100
        mask = torch.ones_like(ids)
        mask[0, t // 2:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


DATA = token_batches()


def ours_eva(r, alpha=8, data=DATA, **opts):
    model = lorakit.inject(llama(), lorakit.AdapterConfig(r=r, lora_alpha=alpha, target_modules=TARGETS))
    lorakit.initialize(model, "eva", data, progress=False, **opts)
    return model


def peft_eva(r, alpha=8, data=DATA, **opts):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    model = get_peft_model(llama(), LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS,
                                               init_lora_weights="eva", eva_config=EvaConfig(**opts)))
    initialize_lora_eva_weights(model, data, show_progress_bar=False)
    return model


def ours_layers(model):
    return {p: m.adapters["default"] for p, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def peft_layers(model):
    return {p.replace("base_model.model.", ""): m for p, m in model.named_modules()
            if hasattr(m, "lora_A") and "default" in m.lora_A}


def all_linear_paths(model):
    return [p for p, m in model.named_modules() if isinstance(m, torch.nn.Linear) and p.split(".")[-1] in TARGETS]


@pytest.mark.parametrize("r, opts", [
    (4, {}),                                                    # defaults: ρ=2, τ=0.99
    (2, {"rho": 3.0, "whiten": True}),                          # a layer gets rank 0; equal-input rank swap
    (1, {"rho": 8.0, "adjust_scaling_factors": False, "tau": 0.95}),  # most layers dropped, α kept
])
def test_matches_peft(r, opts):
    ref, ours = peft_eva(r, **opts), ours_eva(r, **opts)
    ref_cfg, our_cfg = ref.peft_config["default"], lorakit.get_config(ours)
    ref_l, our_l = peft_layers(ref), ours_layers(ours)
    # the same per-layer ranks (0 = not adapted) and scales
    assert our_cfg.rank_pattern == ref_cfg.rank_pattern
    assert our_cfg.alpha_pattern == ref_cfg.alpha_pattern
    paths = all_linear_paths(llama())
    ref_ranks = {p: ref_l[p].r["default"] if p in ref_l else 0 for p in paths}
    our_ranks = {p: our_l[p].r if p in our_l else 0 for p in paths}
    assert our_ranks == ref_ranks
    assert sum(our_ranks.values()) == r * len(paths)  # the budget is redistributed, not changed
    assert max(our_ranks.values()) <= round(r * opts.get("rho", 2.0))
    for p in our_l:
        assert our_l[p].scale == pytest.approx(ref_l[p].scaling["default"], rel=1e-12)
    # the same subspaces: singular values σ from PEFT's whitened A (rows scaled by 1/√σ)
    sigma_ref = peft_layers(peft_eva(r, **{**opts, "whiten": True})) if not opts.get("whiten") else ref_l
    worst = 1.0
    for p, v in our_l.items():
        a, b = v.lora_A.detach().double(), ref_l[p].lora_A["default"].weight.detach().double()
        sigma = sigma_ref[p].lora_A["default"].weight.detach().double().norm(dim=1).pow(-2)
        if opts.get("whiten"):
            a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
        for i in range(a.shape[0]):
            gaps = [abs(sigma[i] / sigma[j] - 1) for j in (i - 1, i + 1) if 0 <= j < a.shape[0]]
            if all(gap > 0.01 for gap in gaps):
                cos = (a[i] @ b[i]).abs().item()
                worst = min(worst, cos)
                assert cos >= 0.999, (p, i, cos)
        # whole subspace: principal-angle cosines
        cosines = torch.linalg.svdvals(torch.linalg.qr(a.T).Q.T @ torch.linalg.qr(b.T).Q)
        assert cosines.min() >= 0.999, (p, cosines)
    print(f"r={r} {opts}: ranks {sorted(set(our_ranks.values()))}, worst component cosine {worst:.8f}")


def test_output_unchanged_and_factors():
    """ΔW = 0 (B = 0) so the model equals the base model; A rows are orthonormal principal directions."""
    model = ours_eva(2, rho=3.0)
    base = llama()
    batch = {k: v for k, v in DATA[0].items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base(**batch).logits)
    layers = ours_layers(model)
    assert len(layers) < len(all_linear_paths(base))  # some layer got rank 0 and is a plain module again
    for p, v in layers.items():
        assert torch.count_nonzero(v.lora_B) == 0
        assert v.lora_A.requires_grad and v.lora_B.requires_grad
        eye = v.lora_A @ v.lora_A.T
        torch.testing.assert_close(eye, torch.eye(v.r), atol=1e-5, rtol=0)
        assert v.scale == pytest.approx(8 / 2)  # adjust_scaling_factors keeps α/r
    dropped = set(all_linear_paths(base)) - set(layers)
    for p in dropped:
        assert type(model.get_submodule(p)) is torch.nn.Linear
    # trains: B gets a gradient through the new adapter
    model.train()
    model(**DATA[1]).loss.backward()
    assert all(v.lora_B.grad is not None and v.lora_B.grad.abs().sum() > 0 for v in layers.values())


def test_label_mask_matters_and_save_load(tmp_path):
    """Masking changes the statistics (so the mask is applied); the re-created adapter saves and loads."""
    masked, unmasked = ours_eva(4), ours_eva(4, use_label_mask=False)
    a = ours_layers(masked)["model.layers.0.self_attn.o_proj"].lora_A
    b = ours_layers(unmasked)["model.layers.0.self_attn.o_proj"].lora_A
    assert a.shape != b.shape or not torch.allclose(a, b, atol=1e-4)
    with torch.no_grad():
        for v in ours_layers(masked).values():
            v.lora_B.normal_(0, 0.1)
    batch = {k: v for k, v in DATA[0].items() if k != "labels"}
    check_save_load_save(masked, llama(), batch, tmp_path)


def test_errors():
    with pytest.raises(ConfigError, match="rho"):
        ours_eva(4, rho=0.5)
    with pytest.raises(ConfigError, match="tau"):
        ours_eva(4, tau=1.5)
    with pytest.raises(ConfigError, match="max_steps"):
        ours_eva(4, max_steps=0)
    with pytest.raises(ConfigError, match="max_steps=2"):
        ours_eva(4, max_steps=2)
    with pytest.raises(ConfigError, match="rho"):
        ours_eva(4, rho=40.0)  # 160 components > 64 input features
    with pytest.raises(ConfigError, match="dataloader"):
        ours_eva(4, data=None)
    with pytest.raises(ConfigError, match="empty"):
        ours_eva(4, data=[])
    with pytest.raises(TypeError):
        ours_eva(4, bogus=1)
    model = lorakit.inject(llama(), lorakit.AdapterConfig(r=4, variant="dora", target_modules=TARGETS))
    with pytest.raises(ConfigError, match="plain 'lora'"):
        lorakit.initialize(model, "eva", DATA, progress=False)


@pytest.mark.parametrize("build, targets", [
    ("gpt2", ["c_attn", "c_proj", "c_fc"]),                # transformers Conv1D layers
    ("llama", ["embed_tokens", "q_proj", "v_proj", "down_proj"]),  # an embedding: kept at r, default init
])
def test_matches_peft_conv1d_and_embedding(build, targets):
    import models
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    data = [{k: v if k == "attention_mask" else torch.where(v >= 0, v % 99, v) for k, v in b.items()}
            for b in DATA]  # gpt2: vocab 100
    ref = get_peft_model(getattr(models, build)(), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                              init_lora_weights="eva", eva_config=EvaConfig()))
    initialize_lora_eva_weights(ref, data, show_progress_bar=False)
    ours = lorakit.inject(getattr(models, build)(), lorakit.AdapterConfig(r=4, lora_alpha=8, target_modules=targets))
    lorakit.initialize(ours, "eva", data, progress=False)
    assert lorakit.get_config(ours).rank_pattern == ref.peft_config["default"].rank_pattern
    ref_l, our_l = peft_layers(ref), ours_layers(ours)
    for p, v in our_l.items():
        if p.endswith("embed_tokens"):
            assert v.r == 4 and torch.count_nonzero(v.lora_A) == 0  # default LoRA init, as PEFT
            continue
        assert v.lora_A.shape == ref_l[p].lora_A["default"].weight.shape
        torch.testing.assert_close(v.lora_A, ref_l[p].lora_A["default"].weight, atol=1e-5, rtol=0)
    assert set(our_l) - {"model.embed_tokens"} == set(ref_l)


def test_plain_tensor_batches_with_loss_fn():
    """Batches that are not mappings run through loss_fn; every row of the layer input is used (no mask)."""
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(32, 64, generator=g) @ torch.randn(64, 64, generator=g) * 0.3, torch.zeros(32, 64))
               for _ in range(4)]
    model = lorakit.inject(mlp(), lorakit.AdapterConfig(r=4, target_modules=["fc1", "fc2"]))
    x = batches[0][0]
    with torch.no_grad():
        before = mlp()(x)
    lorakit.initialize(model, "eva", iter(batches), loss_fn=mse_loss, max_batches=3, progress=False)
    layers = ours_layers(model)
    assert sum(v.r for v in layers.values()) == 8  # the budget 2·4 is kept
    with torch.no_grad():
        assert torch.equal(model(x), before)
    with pytest.raises(ConfigError, match="loss_fn"):
        lorakit.initialize(lorakit.inject(mlp(), lorakit.AdapterConfig(r=4, target_modules=["fc1"])), "eva",
                           batches, progress=False)
