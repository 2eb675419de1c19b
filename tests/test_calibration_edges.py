"""Calibration at the bin edges, a hand-computed 6-prediction example to 1e-12, the reliability table and diagram,
and the bad inputs `test_calibration.py` does not cover."""
import math
import sys

import pytest
import torch

from lorakit.analysis.calibration import (ace, bin_edges, bin_index, brier, classwise_ece, ece, mce, reliability,
                                          reliability_diagram)
from lorakit.errors import ConfigError, DataError, MissingDependencyError

# K = 4 classes, M = 3 equal-width bins (0, 1/3], (1/3, 2/3], (2/3, 1]
PROBS = torch.tensor([[0.3, 0.25, 0.25, 0.2],      # conf 0.3,  predicts 0, label 1: wrong  → bin 0
                      [2 / 3, 1 / 3, 0.0, 0.0],    # conf 2/3,  predicts 0, label 0: right  → bin 1 (its upper edge)
                      [0.5, 0.25, 0.25, 0.0],      # conf 0.5,  predicts 0, label 1: wrong  → bin 1
                      [0.1, 0.7, 0.2, 0.0],        # conf 0.7,  predicts 1, label 1: right  → bin 2
                      [0.0, 0.0, 0.0, 1.0],        # conf 1.0,  predicts 3, label 3: right  → bin 2 (exactly 1)
                      [0.05, 0.05, 0.1, 0.8]],     # conf 0.8,  predicts 3, label 2: wrong  → bin 2
                     dtype=torch.float64)
LABELS = torch.tensor([1, 0, 1, 1, 3, 2])


def test_hand_computed_six_predictions_three_bins():
    # equal width: bin 0 {0.3 ✗}: conf 0.3, acc 0, gap 0.3
    #              bin 1 {2/3 ✓, 0.5 ✗}: conf 7/12, acc 1/2, gap 1/12
    #              bin 2 {0.7 ✓, 1.0 ✓, 0.8 ✗}: conf 5/6, acc 2/3, gap 1/6
    # ECE = 1/6·0.3 + 2/6·1/12 + 3/6·1/6 = 0.05 + 1/36 + 1/12 = 0.05 + 1/9;  MCE = 0.3
    assert ece(PROBS, LABELS, bins=3) == pytest.approx(0.05 + 1 / 9, abs=1e-12)
    assert mce(PROBS, LABELS, bins=3) == pytest.approx(0.3, abs=1e-12)
    # equal mass, N // 3 = 2 per bin in confidence order 0.3 ✗, 0.5 ✗ | 2/3 ✓, 0.7 ✓ | 0.8 ✗, 1.0 ✓
    # gaps |0 − 0.4| = 0.4, |1 − 41/60| = 19/60, |1/2 − 0.9| = 0.4; ACE = (0.4 + 19/60 + 0.4) / 3 = 67/180
    assert ace(PROBS, LABELS, bins=3) == pytest.approx(67 / 180, abs=1e-12)
    # Brier rows: 0.09+0.5625+0.0625+0.04 = 0.755 | 1/9+1/9 = 2/9 | 0.25+0.5625+0.0625 = 0.875 | 0.01+0.09+0.04 = 0.14
    #             | 0 | 0.0025+0.0025+0.81+0.64 = 1.455;  mean = (3.225 + 2/9) / 6 = 0.5375 + 1/27
    assert brier(PROBS, LABELS) == pytest.approx(0.5375 + 1 / 27, abs=1e-12)


def test_reliability_rows_are_the_bins_of_ece():
    rows = reliability(PROBS, LABELS, bins=3)
    assert [(r["lower"], r["upper"], r["count"]) for r in rows] == [(0.0, 1 / 3, 1), (1 / 3, 2 / 3, 2), (2 / 3, 1.0, 3)]
    assert [r["confidence"] for r in rows] == pytest.approx([0.3, 7 / 12, 5 / 6], abs=1e-12)
    assert [r["accuracy"] for r in rows] == pytest.approx([0.0, 0.5, 2 / 3], abs=1e-12)
    n = sum(r["count"] for r in rows)
    assert sum(r["count"] / n * abs(r["accuracy"] - r["confidence"]) for r in rows) == \
        pytest.approx(ece(PROBS, LABELS, bins=3), abs=1e-12)
    empty = reliability(PROBS, LABELS, bins=10)[0]  # no confidence is ≤ 0.1
    assert empty["count"] == 0 and empty["confidence"] is None and empty["accuracy"] is None


def test_bin_index_edges():
    conf = torch.tensor([0.0, 1e-300, 0.1, 0.3, 0.30000000000000004, 0.7, 0.99, 1.0], dtype=torch.float64)
    # 0 → first bin; each edge belongs to the bin below it (0.3 is in (0.2, 0.3] although 0.3·10 > 3); 1 → last
    assert bin_index(conf, 10).tolist() == [0, 0, 0, 2, 3, 6, 9, 9]
    assert bin_edges(4).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert bin_index(torch.tensor([0.0, 0.5, 1.0]), 1).tolist() == [0, 0, 0]


def test_confidence_exactly_one_is_counted_in_the_last_bin():
    one_class = reliability(torch.ones(3, 1), torch.zeros(3, dtype=torch.long), bins=5)  # K = 1: conf 1, right
    assert [r["count"] for r in one_class] == [0, 0, 0, 0, 3] and one_class[-1]["accuracy"] == 1.0
    assert ece(torch.ones(3, 1), torch.zeros(3, dtype=torch.long), bins=5) == 0.0
    sure = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # K = 2, conf 1 three times, the second one wrong
    rows = reliability(sure, torch.tensor([0, 1, 1]), bins=10)
    assert [r["count"] for r in rows] == [0] * 9 + [3]
    assert rows[-1]["confidence"] == 1.0 and rows[-1]["accuracy"] == pytest.approx(2 / 3, abs=1e-15)
    assert ece(sure, torch.tensor([0, 1, 1])) == pytest.approx(1 / 3, abs=1e-15)
    assert mce(sure, torch.tensor([0, 1, 1])) == pytest.approx(1 / 3, abs=1e-15)
    # classwise ECE bins each class's probability, 0 included: class 0 has p = 1, 1, 0 for targets 1, 0, 0
    # → last bin {1 ✓, 1 ✗}: gap 1/2, weight 2/3; first bin {0 vs 0}: gap 0. Class 1 mirrors it. Mean = 1/3
    assert classwise_ece(sure, torch.tensor([0, 1, 1])) == pytest.approx(1 / 3, abs=1e-15)


def test_reliability_diagram_writes_a_png(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    path = reliability_diagram(PROBS, LABELS, tmp_path / "plots" / "reliability.png", bins=3, title="tiny")
    pixels = image.imread(path)
    assert path.endswith("reliability.png") and pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert (pixels[..., :3] < 0.9).any()  # something was drawn on the white canvas


def test_reliability_diagram_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # `import matplotlib.figure` now fails
    with pytest.raises(MissingDependencyError, match=r"lorakit\[plot\]"):
        reliability_diagram(PROBS, LABELS, tmp_path / "r.png")
    assert not (tmp_path / "r.png").exists()


@pytest.mark.parametrize("probs, labels, match", [
    (torch.tensor([0.2, 0.8]), torch.tensor([1, 0]), "expected probs"),          # 1-D probs
    (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), "N ≥ 1"),              # no predictions
    (torch.rand(2, 3, 4), torch.tensor([0, 1]), "expected probs"),               # 3-D probs
    (torch.tensor([[0.5, 0.5]]), torch.tensor([[0]]), "expected probs"),         # 2-D labels
    (torch.tensor([[0.5, 0.5]]), torch.tensor([2]), "class indices"),            # label out of range
    (torch.tensor([[0.5, 0.5]]), torch.tensor([-1]), "class indices"),
    (torch.tensor([[0.5, 0.5]]), torch.tensor([0.5]), "integer"),                # fractional label
    (torch.tensor([[math.nan, 0.5]]), torch.tensor([0]), "finite"),
    (torch.tensor([[1.5, -0.5]]), torch.tensor([0]), r"\[0, 1\]"),
])
def test_bad_inputs_are_data_errors(probs, labels, match, tmp_path):
    for metric in (ece, mce, ace, classwise_ece, brier, reliability):
        with pytest.raises(DataError, match=match):
            metric(probs, labels)
    with pytest.raises(DataError, match=match):
        reliability_diagram(probs, labels, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("bins", [0, -3, 2.5, True])
def test_bad_bin_counts_are_config_errors(bins):
    for metric in (ece, mce, ace, classwise_ece, reliability):
        with pytest.raises(ConfigError, match="bins"):
            metric(PROBS, LABELS, bins=bins)
