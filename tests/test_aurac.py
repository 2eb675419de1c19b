"""AURAC v1/v2 (area under accuracy-vs-rank, trapezoid rule normalized by the x-range) on hand-computed examples;
the plot helper; `evaluate_at_ranks` on the nested-rank variants."""
import csv
import json
import math

import pytest
import torch

from lorakit.analysis.aurac import aurac, aurac_v1, aurac_v2, plot_accuracy_vs_rank, write_rank_report
from lorakit.rank.truncate import evaluate_at_ranks
from lorakit.variants.dylora import resample

import lorakit
from contract import planted_teacher, train_planted

pytestmark = pytest.mark.usefixtures("one_thread_module")


def test_hand_computed_values():
    acc = {8: 0.9, 1: 0.5, 4: 0.8, 2: 0.6}  # any order
    # v1: x = 1, 2, 4, 8: (1·0.55 + 2·0.70 + 4·0.85) / 7 = 5.35 / 7
    assert aurac_v1(acc) == pytest.approx(5.35 / 7, abs=1e-12)
    # v2: x = 0, 1, 2, 3: (0.55 + 0.70 + 0.85) / 3
    assert aurac_v2(acc) == pytest.approx(0.7, abs=1e-12)
    assert aurac(acc) == {"aurac_v1": aurac_v1(acc), "aurac_v2": aurac_v2(acc)}
    # uneven log spacing: ranks 2, 3, 8 → v2 x = 1, log2 3, 3
    acc2 = {2: 0.2, 3: 0.4, 8: 1.0}
    l3 = math.log2(3)
    assert aurac_v2(acc2) == pytest.approx(((l3 - 1) * 0.3 + (3 - l3) * 0.7) / 2, abs=1e-12)
    assert aurac_v1(acc2) == pytest.approx((1 * 0.3 + 5 * 0.7) / 6, abs=1e-12)
    assert aurac_v1({4: 0.7}) == aurac_v2({4: 0.7}) == 0.7  # one rank: its accuracy
    assert aurac_v1({1: 0.3, 16: 0.3}) == pytest.approx(0.3) and aurac_v2({1: 0.3, 16: 0.3}) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        aurac_v1({})
    with pytest.raises(ValueError):
        aurac_v2({0: 0.5, 2: 0.6})


def test_plot_writes_a_file(tmp_path):
    pytest.importorskip("matplotlib")
    out = plot_accuracy_vs_rank({"dylora": {1: 0.5, 2: 0.6, 4: 0.8}, "lora": {1: 0.2, 2: 0.4, 4: 0.9}},
                                tmp_path / "acc.png", title="test")
    assert out == str(tmp_path / "acc.png") and (tmp_path / "acc.png").stat().st_size > 1000


def test_rank_report_files(tmp_path):
    curves = {"a": {1: 0.5, 2: 0.6, 4: 0.8, 8: 0.9}, "b": {2: 0.2, 3: 0.4, 8: 1.0}}
    scores = write_rank_report(curves, tmp_path / "r")
    assert scores["a"]["aurac_v2"] == pytest.approx(0.7)
    assert json.loads((tmp_path / "r" / "aurac.json").read_text()) == scores
    rows = list(csv.reader((tmp_path / "r" / "accuracy_by_rank.csv").open()))
    assert rows[0] == ["label", "rank", "accuracy"] and rows[1] == ["a", "1", "0.5"] and len(rows) == 8


def test_evaluate_at_ranks_on_the_planted_task():
    """Both nested variants trained on the planted rank-4 task; score = −test MSE at each rank, then AURAC."""
    x_test = torch.randn(300, 64, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        y_test = planted_teacher()(x_test)
    ranks = [1, 2, 4, 8]
    scores = {}
    for variant, hook in [("dylora", lambda m, t: resample(m, t)), ("matryoshka_lora", None)]:
        cfg = lorakit.AdapterConfig(r=8, variant=variant, target_modules=["fc1"],
                                    options={"frozen": False} if variant == "dylora" else {})
        model, *_ = train_planted(cfg, steps=300, hook=hook)
        model.train()  # evaluate_at_ranks puts it in eval mode and back
        with torch.no_grad():
            scores[variant] = evaluate_at_ranks(
                model, ranks, lambda m: -torch.nn.functional.mse_loss(m(x_test), y_test).item())
        assert model.training and lorakit.variants._nested.get_rank(model) is None
        assert list(scores[variant]) == ranks
    print({v: (s, aurac(s)) for v, s in scores.items()})
    for s in scores.values():
        assert s[8] > s[1] and aurac_v1(s) < 0
