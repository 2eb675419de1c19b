"""lorakit.compose.aligned: LoRA-LEGO and KnOTS on plain fp64 parts (training.md §9a, §9b)."""
import math

import pytest
import torch

from lorakit.compose.aligned import knots, lego
from lorakit.compose.layers import Part
from lorakit.errors import ConfigError

OUT, IN = 14, 11


def make_parts(ranks=(3, 5, 2), scales=(0.5, 2.0, 1.0), weights=(1.0, -0.7, 1.5), seed=0, out=OUT, inp=IN):
    g = torch.Generator().manual_seed(seed)
    return [Part(torch.randn(r, inp, generator=g, dtype=torch.float64),
                 torch.randn(out, r, generator=g, dtype=torch.float64), s, w)
            for r, s, w in zip(ranks, scales, weights)]


def weighted_sum(parts):
    return sum(p.weight * p.delta() for p in parts)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def close(x, y, tol=1e-10):
    return float((x - y).norm()) <= tol * max(1.0, float(y.norm()))


# ---- LoRA-LEGO ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gauge", [True, False])
def test_lego_every_unit_its_own_cluster_is_the_exact_weighted_sum(gauge):
    parts = make_parts()
    units = sum(p.a.shape[0] for p in parts)
    a, b, info = lego(parts, units, generator=gen(), gauge=gauge, norm_correction=False, output_correction=False)
    assert a.shape == (units, IN) and b.shape == (OUT, units)
    assert info["sizes"] == [1] * units and info["inertia"] == pytest.approx(0, abs=1e-20)
    assert close(b @ a, weighted_sum(parts), 1e-13)
    # the norm correction does nothing to singletons; the output correction is γ = √(r̄/k)
    a2, b2, info2 = lego(parts, units, generator=gen(), gauge=gauge)
    assert info2["output_scale"] == pytest.approx(math.sqrt((10 / 3) / 10))
    assert close(b2 @ a2, info2["output_scale"] * weighted_sum(parts), 1e-13)


def test_lego_is_invariant_to_the_order_of_ranks_and_of_sources():
    parts = make_parts(seed=1)
    a, b, _ = lego(parts, 4, generator=gen(5))
    g = torch.Generator().manual_seed(9)
    shuffled = []
    for p in parts:
        perm = torch.randperm(p.a.shape[0], generator=g)
        shuffled.append(Part(p.a[perm], p.b[:, perm], p.scale, p.weight))
    a2, b2, _ = lego(shuffled[::-1], 4, generator=gen(5))
    assert close(b2 @ a2, b @ a, 1e-12)


def test_lego_concatenation_equals_summation():
    """Stacking the (weighted, scaled) units of several LoRAs into one LoRA is the same pool of units."""
    parts = make_parts(seed=2)
    cat = Part(torch.cat([p.a for p in parts]), torch.cat([p.b * (p.scale * p.weight) for p in parts], dim=1),
               1.0, 1.0)
    assert close(cat.delta(), weighted_sum(parts), 1e-13)
    for k in (1, 3, 6, 10):
        a, b, info = lego(parts, k, generator=gen(3), output_correction=False)
        a2, b2, info2 = lego([cat], k, generator=gen(3), output_correction=False)
        assert info["sizes"] == info2["sizes"]
        assert close(b2 @ a2, b @ a, 1e-12)
    a, b, _ = lego([cat], 10, generator=gen(), norm_correction=False, output_correction=False)
    assert close(b @ a, weighted_sum(parts), 1e-13)


@pytest.mark.parametrize("w", [1.0, 0.4])
def test_lego_two_copies_into_r_clusters_give_the_adapter_back(w):
    (p,) = make_parts(ranks=(4,), scales=(0.5,), weights=(w,), seed=4)
    # the second copy splits each rank component differently (c·b, a/c, with signs): the gauge undoes it
    c = torch.tensor([2.0, -0.3, 5.0, -1.0], dtype=torch.float64)
    twin = Part(p.a / c[:, None], p.b * c, p.scale, w)
    assert close(twin.delta(), p.delta(), 1e-13)
    a, b, info = lego([p, twin], 4, generator=gen(1))
    assert info["sizes"] == [2, 2, 2, 2] and info["inertia"] == pytest.approx(0, abs=1e-10)
    assert info["output_scale"] == 1.0 and all(f == pytest.approx((1, 1)) for f in info["norm_factors"])
    assert close(b @ a, w * p.delta(), 1e-12)  # the paper's assembly: each centroid one unit (× the mean weight)
    a, b, info = lego([p, twin], 4, generator=gen(1), mass=True)
    assert close(b @ a, 2 * w * p.delta(), 1e-12)  # mass: each centroid stands for its members (× the weight sum)


def test_lego_norm_correction_restores_the_mean_member_norm():
    parts = make_parts(seed=6)
    units = [(p.weight * p.scale * p.b[:, j], p.a[j]) for p in parts for j in range(p.a.shape[0])]
    balanced = [math.sqrt(float(be.norm() * al.norm())) for be, al in units]  # the gauge's half norms
    a, b, info = lego(parts, 1, generator=gen(), output_correction=False)
    assert info["sizes"] == [10]
    assert float(a[0].norm()) == pytest.approx(sum(balanced) / len(balanced), rel=1e-12)
    assert float(b[:, 0].norm()) == pytest.approx(sum(balanced) / len(balanced), rel=1e-12)
    a0, b0, _ = lego(parts, 1, generator=gen(), output_correction=False, norm_correction=False)
    assert float(a0[0].norm()) < float(a[0].norm())  # norm decay: the plain centroid is shorter
    a1, b1, info1 = lego(parts, 1, generator=gen())
    assert info1["output_scale"] == pytest.approx(math.sqrt(10 / 3))
    assert close(b1 @ a1, info1["output_scale"] * (b @ a), 1e-13)


def test_lego_kmeans_is_deterministic_under_a_seed_and_clamps_k():
    parts = make_parts(ranks=(8, 6, 7), seed=7)
    runs = [lego(parts, 5, generator=gen(11)) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][2]["sizes"] == runs[1][2]["sizes"] and sum(runs[0][2]["sizes"]) == 21
    assert runs[0][2]["seed"] == 11 and runs[0][2]["k"] == 5
    a, b, info = lego(parts, 50, generator=gen())
    assert a.shape == (21, IN) and b.shape == (OUT, 21) and info["k"] == 21 and info["k_requested"] == 50


def test_lego_inertia_is_a_local_optimum():
    """The k-means result: every unit sits with its nearest centroid, and more clusters never cost more."""
    parts = make_parts(ranks=(8, 6, 7), seed=8)
    inertias = [lego(parts, k, generator=gen(), n_init=8)[2]["inertia"] for k in (1, 3, 7, 21)]
    assert inertias[0] > inertias[1] > inertias[2] > inertias[3] == pytest.approx(0, abs=1e-10)


# ---- KnOTS ----------------------------------------------------------------------------------------------------

def test_knots_ta_is_the_exact_weighted_sum():
    parts = make_parts(seed=10)
    a, b, info = knots(parts)
    assert info["basis_rank"] == 10 and info["rank"] == 10 and a.shape == (10, IN) and b.shape == (OUT, 10)
    assert close(b @ a, weighted_sum(parts), 1e-12)
    # ranks summing past the output width: the basis is capped by out, still lossless
    wide = make_parts(ranks=(9, 8), scales=(1.0, 0.25), weights=(0.5, -2.0), seed=11)
    a, b, info = knots(wide, lam=0.5)
    assert info["basis_rank"] == min(OUT, 17) and a.shape[0] <= OUT
    assert close(b @ a, 0.5 * weighted_sum(wide), 1e-12)


def dense_ties(parts, density, sign="weighted", divide="count"):
    """Reference: SVD of the dense concatenation [ΔW₁ … ΔW_N], coefficient blocks Σ·Vᵢᵀ, TIES on the blocks."""
    deltas = [p.delta() for p in parts]
    u, s, vh = torch.linalg.svd(torch.cat(deltas, dim=1), full_matrices=False)
    keep = s > 1e-12 * s[0]
    u, s, vh = u[:, keep], s[keep], vh[keep]
    n_in = deltas[0].shape[1]
    blocks = [s[:, None] * vh[:, i * n_in:(i + 1) * n_in] for i in range(len(parts))]
    for d, c in zip(deltas, blocks):
        assert close(u @ c, d, 1e-12)
    trimmed = []
    for c in blocks:
        n = int(density * c.numel())
        threshold = c.abs().flatten().sort(descending=True).values[n - 1]
        trimmed.append(torch.where(c.abs() >= threshold, c, torch.zeros_like(c)))
    w = [p.weight for p in parts]
    votes = [wi * t for wi, t in zip(w, trimmed)] if sign == "weighted" else trimmed
    elected = torch.where(sum(votes) >= 0, 1.0, -1.0)
    num = torch.zeros_like(blocks[0])
    den = torch.zeros_like(blocks[0])
    for wi, t, v in zip(w, trimmed, votes):
        agree = (v != 0) & (torch.sign(v) == elected)
        num += agree.double() * (wi * t)
        den += agree.double() * (1.0 if divide == "count" else abs(wi))
    merged = torch.where(den > 0, num / den.clamp_min(1e-300), 0.0)
    return u @ merged


@pytest.mark.parametrize("density,sign,divide", [(0.3, "weighted", "count"), (0.6, "unweighted", "count"),
                                                 (0.5, "weighted", "weight_sum"), (1.0, "weighted", "count")])
def test_knots_ties_matches_a_dense_reference(density, sign, divide):
    parts = make_parts(seed=12)
    a, b, info = knots(parts, inner="ties", density=density, sign=sign, divide=divide)
    assert info["sign"] == sign and info["divide"] == divide and info["density"] == density
    assert info["kept"] == [pytest.approx(int(density * 10 * IN) / (10 * IN))] * 3
    ref = dense_ties(parts, density, sign, divide)
    assert close(b @ a, ref, 1e-9)
    assert a.shape[0] <= 10 and b.shape == (OUT, a.shape[0])
    if density < 1:
        assert not close(b @ a, weighted_sum(parts), 1e-3)


def test_knots_ties_of_one_adapter_at_full_density_is_that_adapter():
    (p,) = make_parts(ranks=(4,), scales=(0.5,), weights=(1.0,), seed=13)
    a, b, _ = knots([p], inner="ties", density=1.0)
    assert close(b @ a, p.delta(), 1e-12)


def test_knots_dare_is_seeded_and_rescales_survivors():
    parts = make_parts(seed=14)
    runs = [knots(parts, inner="dare_linear", density=0.5, generator=gen(21)) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][2]["seed"] == 21
    other = knots(parts, inner="dare_linear", density=0.5, generator=gen(22))
    assert not close(other[1] @ other[0], runs[0][1] @ runs[0][0], 1e-6)
    # unbiased: the mean over many seeds approaches the exact weighted sum
    mean = sum(b @ a for a, b, _ in (knots(parts, inner="dare_linear", density=0.5, generator=gen(s))
                                     for s in range(400))) / 400
    ref = weighted_sum(parts)
    assert float((mean - ref).norm()) < 0.15 * float(ref.norm())
    a, b, info = knots(parts, inner="dare_ties", density=0.7, generator=gen(3))
    assert len(info["kept_after_vote"]) == 3 and info["rank"] <= 10


def test_knots_different_ranks_negative_weights_and_inputs_untouched():
    parts = make_parts(ranks=(1, 6), scales=(3.0, 0.1), weights=(-1.0, 2.0), seed=15)
    before = [(p.a.clone(), p.b.clone()) for p in parts]
    for inner, kw in (("ta", {}), ("ties", {"density": 0.4}), ("magnitude_prune", {"density": 0.4}),
                      ("dare_ties", {"density": 0.5, "generator": gen()})):
        a, b, info = knots(parts, inner=inner, **kw)
        assert a.shape[1] == IN and b.shape[0] == OUT and a.shape[0] == b.shape[1] <= 7
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
    lego(parts, 3, generator=gen())
    for p, (a0, b0) in zip(parts, before):
        assert torch.equal(p.a, a0) and torch.equal(p.b, b0)


# ---- refusals -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{"k": 0}, {"k": -2}, {"k": True}, {"k": 2.0}, {"k": 2, "iters": 0},
                                    {"k": 2, "n_init": 0}, {"k": 2, "generator": 3}])
def test_lego_refuses_bad_options(kwargs):
    with pytest.raises(ConfigError):
        lego(make_parts(), **kwargs)


@pytest.mark.parametrize("kwargs", [{"inner": "svd"}, {"inner": "ties"}, {"inner": "ties", "density": 0.0},
                                    {"inner": "ties", "density": 1.5}, {"inner": "ties", "density": True},
                                    {"inner": "ta", "density": 0.5}, {"inner": "dare_ties", "density": 0.5},
                                    {"inner": "ties", "density": 0.5, "sign": "mass"},
                                    {"inner": "ties", "density": 0.5, "sign_method": "majority"},
                                    {"inner": "ties", "density": 0.5, "divide": "mean"},
                                    {"lam": float("nan")}, {"rtol": 1.0}])
def test_knots_refuses_bad_options(kwargs):
    with pytest.raises(ConfigError):
        knots(make_parts(), **kwargs)


def test_bad_parts_are_refused():
    good = make_parts()
    wrong_shape = good[:1] + [Part(good[1].a[:, :5], good[1].b, 1.0, 1.0)]
    nan_weight = [Part(good[0].a, good[0].b, 1.0, float("nan"))]
    for parts in ([], wrong_shape, nan_weight):
        with pytest.raises(ConfigError):
            knots(parts)
        with pytest.raises(ConfigError):
            lego(parts, 2)
