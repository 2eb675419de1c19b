"""The claims table's statistics on hand-computed data: the t-interval over replicates, the paired bootstrap, ECE,
and the verdict rule (a clear win holds, a clear loss does not, a zero-centred interval is inconclusive)."""
import math

import numpy as np
import pytest

from lorakit.claims.stats import (FAILS, HOLDS, INCONCLUSIVE, Condition, Interval, ece, paired_bootstrap,
                                  replicate_interval, statistic_value, t_quantile, verdict)
from lorakit.errors import StatisticsError


def test_t_quantiles_are_students():
    assert t_quantile(1) == pytest.approx(12.7062047, abs=1e-6)
    assert t_quantile(2) == pytest.approx(4.3026527, abs=1e-6)
    assert t_quantile(10) == pytest.approx(2.2281389, abs=1e-6)
    assert t_quantile(31) == pytest.approx(2.0395134, abs=1e-5)  # past the table: Cornish-Fisher
    assert t_quantile(10_000) == pytest.approx(1.9602012, abs=1e-5)
    with pytest.raises(StatisticsError):
        t_quantile(0)


def test_replicate_interval_by_hand():
    # d = 0.02, 0.03, 0.04: mean 0.03, sd 0.01, se 0.01/√3; half-width 4.302653 · 0.005773503 = 0.0248418
    iv = replicate_interval([0.80, 0.82, 0.84], [0.78, 0.79, 0.80])
    assert (iv.method, iv.n) == ("t", 3)
    assert iv.estimate == pytest.approx(0.03)
    assert iv.low == pytest.approx(0.03 - 0.0248418, abs=1e-6)
    assert iv.high == pytest.approx(0.03 + 0.0248418, abs=1e-6)
    assert verdict(iv).word == HOLDS


def test_replicate_rule_refuses_fewer_than_three_or_unpaired():
    with pytest.raises(StatisticsError, match="≥ 3"):
        replicate_interval([0.8, 0.9], [0.7, 0.8])
    with pytest.raises(StatisticsError, match="paired"):
        replicate_interval([0.8, 0.9, 0.7], [0.7, 0.8])
    with pytest.raises(StatisticsError, match="non-finite"):
        replicate_interval([0.8, math.nan, 0.7], [0.7, 0.8, 0.6])


def test_bootstrap_of_a_constant_difference_is_that_constant():
    base = np.linspace(0, 0.5, 40)
    iv = paired_bootstrap([base + 0.1], [base])
    assert (iv.method, iv.n) == ("bootstrap", 40)
    assert iv.estimate == pytest.approx(0.1) and iv.low == pytest.approx(0.1) and iv.high == pytest.approx(0.1)
    assert verdict(iv).word == HOLDS


def test_bootstrap_clear_loss_does_not_hold():
    iv = paired_bootstrap([[0.0] * 30], [[1.0] * 30])
    assert (iv.low, iv.high) == (-1.0, -1.0)
    assert verdict(iv).word == FAILS


def test_bootstrap_zero_centred_is_inconclusive():
    # 50 examples only the treatment gets right, 50 only the baseline: d̂ = 0, se = 1/√100 → about ±0.196
    t = [[1.0] * 50 + [0.0] * 50]
    b = [[0.0] * 50 + [1.0] * 50]
    iv = paired_bootstrap(t, b)
    assert iv.estimate == 0
    assert -0.25 < iv.low < -0.14 and 0.14 < iv.high < 0.25
    assert verdict(iv).word == INCONCLUSIVE
    assert paired_bootstrap(t, b) == iv  # seeded: the same interval every time


def test_bootstrap_seed_moves_the_interval_only_a_little():
    scores = np.random.default_rng(3).normal(size=(1, 300))
    zero = np.zeros((1, 300))
    a, b = paired_bootstrap(scores, zero), paired_bootstrap(scores, zero, seed=1)
    assert a != b and a.estimate == b.estimate
    assert abs(a.low - b.low) < 0.05 and abs(a.high - b.high) < 0.05


def test_bootstrap_averages_each_arms_seeds_first():
    t = [[1, 1, 0, 0], [1, 0, 0, 0]]  # per example over seeds: 1, .5, 0, 0 → 0.375
    b = [[0, 0, 0, 0]]
    assert statistic_value(t) == pytest.approx(0.375)
    assert paired_bootstrap(t, b).estimate == pytest.approx(0.375)
    with pytest.raises(StatisticsError, match="same examples"):
        paired_bootstrap(t, [[0, 0, 0]])


def test_ece_by_hand_and_bin_edges():
    # bin (0.8, 0.9]: hits 1 + 0 vs confidence 1.8 → 0.8; bin (0.5, 0.6]: 2 vs 1.2 → 0.8; ECE = 1.6 / 4
    assert ece([0.9, 0.9, 0.6, 0.6], [1, 0, 1, 1]) == pytest.approx(0.4)
    # 0.3 belongs to (0.2, 0.3], 0.35 to (0.3, 0.4]: (|0 − 0.3| + |1 − 0.35|) / 2
    assert ece([0.3, 0.35], [0, 1]) == pytest.approx(0.475)
    assert ece([0.0, 1.0], [0, 1]) == pytest.approx(0.0)  # 0 goes to the first bin, 1 to the last


def test_ece_equals_the_library_metric():
    torch = pytest.importorskip("torch")
    from lorakit.analysis.calibration import ece as library_ece

    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(300, 3, generator=gen) * 2, -1)
    labels = torch.randint(0, 3, (300,), generator=gen)
    conf, pred = probs.max(1)
    mine = ece(conf.double().numpy(), (pred == labels).double().numpy())
    assert mine == pytest.approx(library_ece(probs, labels), abs=1e-9)


def test_lower_is_better_ece_claim_holds_for_the_calibrated_arm():
    n = 200
    hits = [1.0, 0.0] * (n // 2)
    calibrated = [[[0.5, h] for h in hits]]       # ECE 0
    overconfident = [[[0.99, h] for h in hits]]   # ECE 0.49
    iv = paired_bootstrap(calibrated, overconfident, statistic="ece")
    assert iv.estimate == pytest.approx(-0.49)
    assert iv.high < 0
    assert verdict(iv, higher_is_better=False).word == HOLDS
    assert verdict(iv, higher_is_better=True).word == FAILS


def test_claimed_magnitude():
    gain = Interval(0.03, 0.01, 0.05, "t", 3)
    assert verdict(gain, magnitude=0.02).word == HOLDS
    assert verdict(gain, magnitude=0.04).word == INCONCLUSIVE  # a gain, smaller than claimed, not ruled out
    assert verdict(gain, magnitude=0.06).word == FAILS          # the claimed size lies above the interval


def test_no_worse_claims_use_the_margin():
    assert verdict(Interval(-0.005, -0.015, 0.005, "t", 3), kind="no_worse", margin=0.02).word == HOLDS
    assert verdict(Interval(-0.02, -0.03, -0.01, "t", 3), kind="no_worse", margin=0.02).word == INCONCLUSIVE
    assert verdict(Interval(-0.05, -0.07, -0.03, "t", 3), kind="no_worse", margin=0.02).word == FAILS
    with pytest.raises(StatisticsError, match="margin"):
        verdict(Interval(0, 0, 0, "t", 3), kind="no_worse")


def test_zero_effect_does_not_hold_and_conditions_decide_first():
    assert verdict(Interval(0.0, 0.0, 0.0, "bootstrap", 10)).word == FAILS
    win = Interval(0.05, 0.02, 0.08, "t", 3)
    assert verdict(win, conditions=[Condition("≤ 10 % of the parameters", True)]).word == HOLDS
    failed = verdict(win, conditions=[Condition("≤ 10 % of the parameters", False)])
    assert failed.word == FAILS and "10 %" in failed.reason
    assert verdict(None).word == INCONCLUSIVE
    with pytest.raises(StatisticsError, match="kind"):
        verdict(win, kind="faster")
