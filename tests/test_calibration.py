"""Calibration metrics (HypeLoRA card): ECE, MCE, ACE, classwise ECE, Brier on hand-computed examples."""
import pytest
import torch

from lorakit.analysis.calibration import ace, brier, calibration_report, classwise_ece, ece, mce
from lorakit.errors import DataError

# confidences 0.94, 0.83, 0.72, 0.55 (each in its own tenth), correct, wrong, correct, wrong
PROBS = torch.tensor([[0.94, 0.06], [0.83, 0.17], [0.28, 0.72], [0.45, 0.55]])
LABELS = torch.tensor([0, 1, 1, 0])


def test_hand_computed_values():
    assert ece(PROBS, LABELS) == pytest.approx((0.06 + 0.83 + 0.28 + 0.55) / 4)
    assert mce(PROBS, LABELS) == pytest.approx(0.83)
    # equal-mass bins of N // 3 = 1, the last takes the remainder: {0.55}, {0.72}, {0.83, 0.94}
    assert ace(PROBS, LABELS, bins=3) == pytest.approx(0.25 * 0.55 + 0.25 * 0.28 + 0.5 * abs(0.5 - 0.885))
    assert classwise_ece(PROBS, LABELS) == pytest.approx(0.43)
    assert brier(PROBS, LABELS) == pytest.approx((0.0072 + 1.3778 + 0.1568 + 0.605) / 4)
    assert calibration_report(PROBS, LABELS)["mce"] == pytest.approx(0.83)


def test_calibrated_predictions_score_zero_and_overconfidence_does_not():
    probs, labels = torch.tensor([[0.75, 0.25]] * 4), torch.tensor([0, 0, 0, 1])  # 75% confident, 75% right
    assert ece(probs, labels) == mce(probs, labels) == ace(probs, labels, bins=1) == 0
    assert ace(probs, labels) == pytest.approx(0.375)  # fewer examples than bins: one example per bin
    sure = torch.tensor([[0.99, 0.01]] * 4)
    assert ece(sure, labels) == pytest.approx(0.24) and brier(sure, labels) > brier(probs, labels)


def test_bad_shapes_are_data_errors():
    with pytest.raises(DataError, match="labels"):
        ece(PROBS, LABELS[:3])
