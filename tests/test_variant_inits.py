"""What makes each variant that method at step 0: the init distribution of every factor (which is zero, the bound and
standard deviation of random ones, within 5 % of the analytic value, fixed seed) or the defining decomposition, for
every registered variant on one 768 → 512 Linear layer, r = 8. The reference each number comes from is named."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lorakit
from lorakit.variants import get_variant, variant_names
from lorakit.variants.loldu import ldu

IN, OUT, R = 768, 512, 8


class One(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(IN, OUT)

    def forward(self, x):
        return self.layer(x)


def adapter(variant, **options):
    torch.manual_seed(0)
    model = One()
    with torch.no_grad():
        model.layer.weight.normal_(0, 0.05)
    lorakit.inject(model, lorakit.AdapterConfig(r=R, lora_alpha=2 * R, variant=variant, target_modules=["layer"],
                                                options=options))
    shared = model.lorakit_shared["default"] if hasattr(model, "lorakit_shared") else None
    return model, model.layer.adapters["default"], shared


def uniform(t, bound):
    """t ~ U(±bound): no entry beyond it, the largest near it, std = bound/√3, mean ≈ 0 (each within 5 %)."""
    t = t.detach().double()
    assert t.abs().max().item() <= bound * (1 + 1e-6)
    assert t.abs().max().item() == pytest.approx(bound, rel=0.05)
    assert t.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert abs(t.mean().item()) < 0.05 * bound


def normal(t, std, mean=0.0):
    t = t.detach().double()
    assert t.std().item() == pytest.approx(std, rel=0.05)
    assert abs(t.mean().item() - mean) < 0.05 * std
    assert t.abs().max().item() > 3 * std  # tails: not a uniform of the same std (its max is √3·std)


def zero(t):
    assert torch.count_nonzero(t) == 0


def kaiming_ab(v):  # PEFT's LoRA init: kaiming_uniform_(a=√5) on A (r, in) → U(±1/√in); B = 0
    uniform(v.lora_A, 1 / math.sqrt(IN))
    zero(v.lora_B)


def redraws(v, name, n):
    """`n` fresh draws of tensor `name` of variant `v` (its own init run again), stacked."""
    torch.manual_seed(1)
    draws = []
    for _ in range(n):
        v.initialize(True)
        draws.append(getattr(v, name).detach().clone())
    return torch.stack(draws)


def top_svd(w, r):
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return u[:, :r], s[:r], vh[:r]


def check_lora():
    kaiming_ab(adapter("lora")[1])


def check_dora():  # PEFT: LoRA's init, magnitude = ‖W‖ per output row
    model, v, _ = adapter("dora")
    kaiming_ab(v)
    assert torch.allclose(v.lora_magnitude_vector, model.layer.base_layer.weight.norm(dim=1), rtol=1e-6)


def check_dylora():  # huawei-noah DyLoRA loralib: lora_A (r, in) kaiming, lora_B zeros
    kaiming_ab(adapter("dylora")[1])


def check_sora():  # TsinghuaC3I/SoRA src/lora.py L39-44: A kaiming, B zeros, gate = torch.randn(1, r)
    v = adapter("sora")[1]
    kaiming_ab(v)
    normal(redraws(v, "lora_gate", 200), 1.0)


def check_matryoshka_lora():  # IST-DASLab/MatryoshkaLoRA adapters/lora.py L20-28: A (in, r) kaiming → U(±1/√r)
    v = adapter("matryoshka_lora")[1]
    uniform(v.lora_A, 1 / math.sqrt(R))
    zero(v.lora_B)


def check_mm_lora():  # both branches LoRA's init (card [U])
    v = adapter("mm_lora")[1]
    uniform(v.lora_A_vision, 1 / math.sqrt(IN))
    uniform(v.lora_A_text, 1 / math.sqrt(IN))
    zero(v.lora_B_vision)
    zero(v.lora_B_text)


def check_reclora():  # RecLoRA card: every A_k as LoRA's A → U(±1/√in), every B_k = 0; gate: nn.Linear defaults
    v = adapter("reclora", user_dim=16)[1]
    a, _ = v.bank()
    for k in range(a.shape[0]):
        uniform(a[k], 1 / math.sqrt(IN))
    zero(v.reclora_B)
    uniform(v.reclora_gate.fc1.weight, 1 / math.sqrt(16))
    uniform(v.reclora_gate.fc2.weight, 1 / math.sqrt(60))


def check_block_lora():  # CLIP-LoRA's init on the shared head A₀ (r, n/k): U(±1/√(n/k)); arms B = 0
    v = adapter("block_lora")[1]
    uniform(v.block_lora_A, 1 / math.sqrt(IN // 8))
    zero(v.block_lora_B)


def check_hypelora():  # btrojan-official/HypeLoRA models/hypernet.py L66-71 (fixed A) and PEFT's lora_A (blend)
    v = adapter("hypelora")[1]
    uniform(v.hypelora_A, 1 / math.sqrt(R))
    uniform(v.hypelora_A_init, 1 / math.sqrt(IN))


def check_lamda():  # ArminAzizi98/LaMDA: A PEFT kaiming (frozen), B = 0, S = nn.Linear(r, r) default: U(±1/√r)
    v = adapter("lamda")[1]
    uniform(v.lora_A, 1 / math.sqrt(IN))
    zero(v.lora_B)
    uniform(redraws(v, "lora_R", 100), 1 / math.sqrt(R))


def check_vera():  # PEFT VeRA `_kaiming_init` (gain √2, a = 0): U(±√(6/fan_in)) on A (r, in), B (out, r);
    _, v, shared = adapter("vera")  # λ_b = 0, λ_d = d_initial = 0.1
    uniform(shared.vera_A[:R, :IN], math.sqrt(6 / IN))
    uniform(shared.vera_B[:OUT, :R], math.sqrt(6 / R))
    zero(v.vera_lambda_b)
    assert torch.equal(v.vera_lambda_d, torch.full((R,), 0.1))


def check_randlora():  # PEFT RandLoRA: bases divided by their std, Λ = 0, Γ = 1/max(Γ.shape) = 1/max(N, min(in, out))
    _, v, shared = adapter("randlora")
    for basis in (shared.randlora_A, shared.randlora_B):
        assert basis.double().std().item() == pytest.approx(1.0, rel=0.05)
    zero(v.randlora_lambda)
    assert torch.equal(v.randlora_gamma, torch.full_like(v.randlora_gamma, 1 / OUT))


def check_tied_lora():  # Tied-LoRA: one kaiming A and zero B shared by the layers, u = v = 1 (ΔW = 0)
    _, v, shared = adapter("tied_lora")
    a, b = shared.pair(v.key)
    uniform(a, 1 / math.sqrt(IN))
    zero(b)
    assert torch.equal(v.tied_lora_u, torch.ones_like(v.tied_lora_u))
    assert torch.equal(v.tied_lora_v, torch.ones_like(v.tied_lora_v))


def check_vblora():  # PEFT VB-LoRA: bank U(±init_vector_bank_bound = 0.02), logits N(0, init_logits_std = 0.1)
    _, v, shared = adapter("vblora")
    uniform(shared.vblora_vector_bank, 0.02)
    normal(torch.cat([v.vblora_logits_A.flatten(), v.vblora_logits_B.flatten()]), 0.1)


def check_unilora():  # PEFT Uni-LoRA: θ_d ~ U(±init_theta_d_bound = 0.02)
    _, _, shared = adapter("unilora", theta_d_length=4096)
    uniform(shared.unilora_theta_d, 0.02)


def check_shira():  # PEFT SHiRA: values 0 at r·(in + out) random positions
    v = adapter("shira")[1]
    zero(v.shira_weight)
    rows, cols = v.shira_indices.long()
    assert v.shira_weight.numel() == R * (IN + OUT) == (rows * IN + cols).unique().numel()


def check_pissa():  # PEFT pissa_init: B₀ = U_r·√S_r, A₀ = √S_r·V_rᵀ of W, ΔW = 0
    model, v, _ = adapter("pissa")
    u, s, vh = top_svd(model.layer.base_layer.weight, R)
    scale = v.scale
    assert torch.allclose(v.lora_B0.double() @ v.lora_A0.double() * scale, u @ torch.diag(s) @ vh, atol=1e-5)
    assert torch.equal(v.lora_A, v.lora_A0) and torch.equal(v.lora_B, v.lora_B0)


def check_olora():  # PEFT olora_init: W = Q·R, B₀ = Q[:, :r] (orthonormal), A₀ = R[:r]
    model, v, _ = adapter("olora")
    q, rr = torch.linalg.qr(model.layer.base_layer.weight.double())
    b0, a0 = v.lora_B0.double(), v.lora_A0.double()
    assert torch.allclose(b0.T @ b0, torch.eye(R, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(b0 @ a0, q[:, :R] @ rr[:R], atol=1e-5)


def check_lora_ga():  # before its data init: plain LoRA (A kaiming, B = 0) and a zero offset (tests in test_lora_ga)
    v = adapter("lora_ga")[1]
    kaiming_ab(v)
    zero(v.lora_A0)
    zero(v.lora_B0)


def check_lora_xs():  # LoRA-XS: B = U_r, A = S_r·V_rᵀ (frozen), core R ~ N(0, σ = 1e-5)
    model, v, _ = adapter("lora_xs")
    u, s, vh = top_svd(model.layer.base_layer.weight, R)
    assert torch.allclose(v.lora_B.double().T @ v.lora_B.double(), torch.eye(R, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(v.lora_B.double() @ v.lora_A.double(), u @ torch.diag(s) @ vh, atol=1e-5)
    normal(redraws(v, "lora_R", 100), v.opts.sigma)


def check_lora_sb():  # before its data init: an orthonormal SVD frame of W and a zero core (tests in test_lora_sb)
    v = adapter("lora_sb")[1]
    a, b = v.lora_A.double(), v.lora_B.double()
    assert torch.allclose(a @ a.T, torch.eye(R, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(b.T @ b, torch.eye(R, dtype=torch.float64), atol=1e-5)
    zero(v.lora_R)


def check_loldu():  # SKDDJ/LoLDU: W = P·L·diag(D)·U (pivoted LU), z = D_r, ΔW = 0
    model, v, _ = adapter("loldu")
    perm, lower, d, upper = ldu(model.layer.base_layer.weight.detach().float())
    assert torch.equal(v.vector_z.detach(), d[:R]) and torch.equal(v.loldu_U, upper[:R])
    assert v.delta_weight().abs().max() == 0


CHECKS = {name[len("check_"):]: f for name, f in globals().items() if name.startswith("check_")}


def test_every_variant_has_a_defining_check():
    ours = [n for n in variant_names() if get_variant(n).__module__.startswith("lorakit.")]  # not tests' toys
    assert sorted(CHECKS) == sorted(ours)


@pytest.mark.parametrize("variant", sorted(CHECKS))
def test_init(variant):
    CHECKS[variant]()
