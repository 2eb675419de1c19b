"""Honest reporting of results: the majority-class rate, macro F1 and the predicted-label shares beside every
classification accuracy, a warning for a model that predicts one class, numbers printed to 4 significant digits,
progress lines without a progress bar, saved paths, and the plots' axes (read from the matplotlib figures)."""
import json
import os

import pytest
import torch

from lorakit.cli import _print_results, main
from lorakit.train import RunConfig, train
from lorakit.train.compare import class_summary, group_runs
from lorakit.train.plots import curves_figure, run_figure, sweep_figure
from lorakit.train.tasks import confusion_metrics, format_number, single_class_warning
from test_cli import write_sentiment

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ---- metrics and the single-class warning ------------------------------------------------------
def test_a_constant_prediction_shows_as_one():
    """The issue's tweets numbers: predicting `1` everywhere scores the positive share and a high positive F1."""
    confusion = torch.tensor([[0, 3192], [0, 6808]], dtype=torch.float64)  # rows: true, columns: predicted
    got = {f"test_{k}": v for k, v in confusion_metrics(confusion).items()}
    assert got["test_accuracy"] == pytest.approx(0.6808) and got["test_majority_class_rate"] == pytest.approx(0.6808)
    assert format_number(got["test_f1"]) == "0.8101"
    assert got["test_macro_f1"] == pytest.approx(got["test_f1"] / 2)  # class 0 never predicted: F1 0
    assert got["test_predicted_share_0"] == 0.0 and got["test_predicted_share_1"] == 1.0
    warning = single_class_warning(got, "test")
    assert "predicts class 1 for every example" in warning
    assert "test_accuracy 0.6808" in warning and "majority-class rate 0.6808" in warning and "0.8101" in warning
    assert single_class_warning(got, "validation") is None  # no validation metrics in these results


def test_mixed_predictions_metrics_and_no_warning():
    confusion = torch.tensor([[3, 1], [2, 4]], dtype=torch.float64)
    got = confusion_metrics(confusion)
    f1 = [2 * 3 / (6 + 2 + 1), 2 * 4 / (8 + 1 + 2)]
    assert got["accuracy"] == pytest.approx(0.7) and got["f1"] == pytest.approx(f1[1])
    assert got["macro_f1"] == pytest.approx(sum(f1) / 2) and got["majority_class_rate"] == pytest.approx(0.6)
    assert got["predicted_share_0"] == pytest.approx(0.5) and got["predicted_share_1"] == pytest.approx(0.5)
    assert single_class_warning({f"test_{k}": v for k, v in got.items()}, "test") is None


def test_numbers_print_with_four_significant_digits(capsys):
    assert [format_number(v) for v in (2e-5, 0.68081234, 1234.4, 12345.6, 0.0, 3, "cpu")] == \
        ["2e-05", "0.6808", "1234", "12346", "0", "3", "cpu"]
    _print_results({"learning_rate": 2e-5, "test_accuracy": 0.68081234, "steps": 3, "warnings": ["test: odd"]})
    assert capsys.readouterr().out.splitlines() == ["learning_rate  2e-05", "test_accuracy  0.6808",
                                                    "steps          3", "warning: test: odd"]


class ZeroHead:
    """A step hook that zeroes the classifier head after each step: equal logits, so every example is class 0."""

    def after_optimizer_step(self, trainer):
        with torch.no_grad():
            for name, p in trainer.model.named_parameters():
                if name.startswith("score."):
                    p.zero_()


def test_a_single_class_run_is_warned_recorded_and_evaluated(tmp_path, capsys):
    data = write_sentiment(tmp_path / "data.jsonl", n=64)
    config = RunConfig.from_flat({"model": "tiny-llama", "data": data, "r": 2, "max_steps": 2, "disable_tqdm": True,
                                  "per_device_train_batch_size": 8, "output_dir": str(tmp_path / "run")})
    results = train(config, hooks=[ZeroHead()])
    err = capsys.readouterr().err
    assert results["test_predicted_share_0"] == 1.0 and results["validation_predicted_share_0"] == 1.0
    assert results["test_accuracy"] == 1 - results["test_majority_class_rate"]  # class 0 is the minority here
    assert [w.split(":")[0] for w in results["warnings"]] == ["validation", "test"]
    assert all(f"warning: {w}" in err for w in results["warnings"])
    assert json.loads((tmp_path / "run" / "results.json").read_text())["warnings"] == results["warnings"]

    assert main(["eval", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr()
    lines = dict(line.split(None, 1) for line in printed.out.splitlines())
    assert lines["data"] == data and lines["split"] == "test" and lines["test_examples"] == str(results["test_examples"])
    assert lines["test_majority_class_rate"] == format_number(results["test_majority_class_rate"])
    assert "warning: test: the model predicts class 0 for every example" in printed.err


def test_train_without_a_bar_logs_each_step_and_prints_what_it_saved(tmp_path, capsys):
    data = write_sentiment(tmp_path / "data.jsonl", n=64)
    run = tmp_path / "run"
    assert main(["train", "--model", "tiny-llama", "--data", data, "--r", "2", "--init-lora-weights", "false",
                 "--learning-rate", "2e-5", "--max-steps", "3", "--eval-steps", "2", "--logging-steps", "1",
                 "--per-device-train-batch-size", "8", "--disable-tqdm", "--output-dir", str(run)]) == 0
    printed = capsys.readouterr()
    steps = [line for line in printed.err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["1/3", "2/3", "3/3"]
    assert all(" loss " in line and " lr " in line for line in steps)
    assert ["eval_accuracy" in line and "eval_majority_class_rate" in line for line in steps] == [False, True, True]
    lines = dict(line.split(None, 1) for line in printed.out.splitlines())
    assert lines["learning_rate"] == "2e-05"
    for key in ("test_accuracy", "test_f1", "test_macro_f1", "test_majority_class_rate", "test_predicted_share_0",
                "test_predicted_share_1", "test_examples"):
        assert key in lines, key
    saved = [line.removeprefix("saved ") for line in printed.out.splitlines() if line.startswith("saved ")]
    assert saved == [str(run / "adapter"), str(run / "results.json"), str(run / "metrics.jsonl"),
                     str(run / "training_curves.png")]


# ---- plots ---------------------------------------------------------------------------------------
def _lines(ax, label_start):
    return [line for line in ax.get_lines() if line.get_label().startswith(label_start)]


def test_run_figure_integer_steps_one_validation_point_and_majority_line():
    history = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    history[-1].update(eval_accuracy=0.7, eval_majority_class_rate=0.68)
    fig = run_figure(history, "accuracy")
    loss_ax, val_ax = fig.axes
    for ax in (loss_ax, val_ax):
        ticks = ax.get_xticks()
        assert len(ticks) >= 2 and all(t == int(t) for t in ticks)
        assert ax.get_xlim()[0] <= 0 and ax.get_xlim()[1] > 3
    point, = _lines(val_ax, "validation accuracy")
    assert point.get_marker() == "o" and point.get_markersize() >= 5 and list(point.get_xdata()) == [3]
    low, high = val_ax.get_ylim()
    assert 0 <= low < 0.68 and 0.7 < high <= 1.05 and high - low >= 0.05  # both values inside, never past [0, 1]
    majority, = _lines(val_ax, "majority class")
    assert majority.get_linestyle() == "--" and list(majority.get_ydata()) == [0.68, 0.68]
    assert "majority class (0.68)" in [t.get_text() for t in val_ax.get_legend().get_texts()]


def test_run_figure_other_metrics_have_no_majority_line():
    history = [{"step": 1, "loss": 2.0, "eval_perplexity": 40.0}]
    fig = run_figure(history, "perplexity")
    val_ax = fig.axes[1]
    assert not _lines(val_ax, "majority")
    low, high = val_ax.get_ylim()
    assert low < 40 < high and high - low >= 4  # one point: a margin of 10 % around it
    assert _lines(fig.axes[0], "")[1].get_marker() == "o"  # a one-step loss curve is a visible point too


def test_sweep_and_curves_figures():
    rows = [{"variant": "lora", "learning_rate": lr, "seed": s, "test_accuracy": 0.7 + s / 100,
             "test_majority_class_rate": 0.55} for lr in (1e-3, 1e-2) for s in (0, 1)]
    ax = sweep_figure(rows, "test_accuracy").axes[0]
    majority, = _lines(ax, "majority class")
    assert majority.get_linestyle() == "--" and list(majority.get_ydata()) == [0.55, 0.55]
    assert not _lines(sweep_figure([{**r, "test_mse": 1.0} for r in rows], "test_mse").axes[0], "majority")
    ax = curves_figure({("lora", 1e-3, 0): [(1, 0.9), (2, 0.8), (3, 0.7)]}, {"lora": 1e-3}).axes[0]
    assert all(t == int(t) for t in ax.get_xticks())


# ---- compare ---------------------------------------------------------------------------------------
def _row(lr, seed, shares):
    return {"variant": "lora", "learning_rate": lr, "seed": seed, "test_accuracy": shares[1] * 0.6 + 0.2,
            "test_f1": 0.5, "test_macro_f1": 0.4, "test_majority_class_rate": 0.6,
            "test_predicted_share_0": shares[0], "test_predicted_share_1": shares[1]}


def test_compare_class_table_and_single_class_runs():
    rows = [_row(1e-3, 0, (0.0, 1.0)), _row(1e-3, 1, (0.5, 0.5)), _row(1e-2, 0, (0.25, 0.75))]
    md = class_summary(group_runs(rows, "test_accuracy"))
    assert "| lora | 0.001 | 0.65 | 0.6 | 0.5 | 0.4 | 0: 0.25 · 1: 0.75 | 1 of 2 |" in md
    assert "| lora | 0.01 | 0.65 | 0.6 | 0.5 | 0.4 | 0: 0.25 · 1: 0.75 | 0 of 1 |" in md
    assert "**Warning**: 1 run(s) predict a single class" in md and "lora lr 0.001 seed 0" in md
    regression = [{"variant": "lora", "learning_rate": 1e-3, "test_mse": 1.0}]
    assert class_summary(group_runs(regression, "test_mse")) == ""
