"""`lorakit compare`: a sweep of variants x learning rates x seeds on a tiny task (table, CSV, plots, reuse of
finished runs), refusal of bad sweeps before any run, and the table's arithmetic on hand-made rows."""
import csv
import importlib
import json
import math
import os

import pytest

from lorakit.cli import main
from lorakit.train import RunConfig
from lorakit.train.compare import best_learning_rates, group_runs, summary
from lorakit.train.run import load_splits
from test_cli import assert_png, files, write_sentiment

os.environ.setdefault("HF_HUB_OFFLINE", "1")
compare_module = importlib.import_module("lorakit.train.compare")  # `lorakit.train.compare` is also the function


def sweep(data, out, *extra):
    return ["compare", "--variants", "rslora,dora", "--lrs", "1e-3", "1e-2", "--seeds", "2", "--model", "tiny-llama",
            "--data", data, "--max-steps", "2", "--per-device-train-batch-size", "8", "--r", "2",
            "--disable-tqdm", "--output-dir", str(out), *extra]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    data = write_sentiment(root / "data.jsonl", n=60)
    assert main(sweep(data, root / "cmp")) == 0
    return data, root / "cmp"


def test_sweep_files(swept):
    _, out = swept
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8  # 2 variants x 2 learning rates x 2 seeds
    assert {(r["variant"], float(r["learning_rate"]), int(r["seed"])) for r in rows} == \
        {(v, lr, s) for v in ("rslora", "dora") for lr in (1e-3, 1e-2) for s in (0, 1)}
    for r in rows:
        assert int(r["steps"]) == 2 and float(r["seconds_per_step"]) > 0 and float(r["peak_memory_mb"]) > 0
        assert 0 <= float(r["test_accuracy"]) <= 1
    params = {r["variant"]: int(r["trainable_parameters"]) for r in rows}
    assert params["dora"] - params["rslora"] == 2 * (64 + 32)  # DoRA magnitudes: 2 layers x (q_proj 64 + v_proj 32)

    for name in sorted(os.listdir(out / "runs")):  # each run's own files, with its own settings
        variant, lr, seed = name.split("-")
        saved = json.loads((out / "runs" / name / "adapter" / "adapter_config.json").read_text())
        assert saved["use_rslora"] == (variant == "rslora") and saved["use_dora"] == (variant == "dora")
        results = json.loads((out / "runs" / name / "results.json").read_text())
        assert results["learning_rate"] == float(lr[2:]) and results["seed"] == int(seed[4:])

    md = (out / "results.md").read_text()
    assert "| rslora | 0.001 | 2 |" in md and "| dora | 0.01 | 2 |" in md and "Best learning rate" in md
    for png in ("accuracy_vs_lr.png", "training_curves.png"):
        assert_png(out / png)


def test_second_call_reuses_finished_runs(swept, monkeypatch, capsys):
    data, out = swept
    before = files(out / "runs")
    first = (out / "results.csv").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(compare_module, "run_one", no_training)
    assert main(sweep(data, out)) == 0
    assert files(out / "runs") == before
    assert (out / "results.csv").read_text() == first
    assert "| dora | 0.01 | 2 |" in capsys.readouterr().out


def test_interrupted_run_resumes_and_changed_settings_are_refused(swept, monkeypatch, capsys):
    data, out = swept
    calls = []
    real = compare_module.run_one

    def counted(config, resume=False):
        calls.append((config.training.output_dir, resume))
        return real(config, resume=resume)

    monkeypatch.setattr(compare_module, "run_one", counted)
    (out / "runs" / "dora-lr0.01-seed1" / "results.json").unlink()  # stopped after its last checkpoint
    assert main(sweep(data, out)) == 0
    assert calls == [(str(out / "runs" / "dora-lr0.01-seed1"), True)]
    assert (out / "runs" / "dora-lr0.01-seed1" / "results.json").is_file()

    before = files(out)
    assert main(sweep(data, out)[:-2] + ["--output-dir", str(out), "--max-steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "max_steps: 2 -> 3" in err
    assert files(out) == before and len(calls) == 1


@pytest.mark.parametrize("variants, words", [("lora,lorax", ["'lorax'", "dora", "rslora"]),
                                             ("dora+rslorax", ["'dora+rslorax'"])])
def test_unknown_variant_refused_before_any_run(variants, words, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare_module, "run_one", lambda *a, **k: pytest.fail("a run started"))
    data = write_sentiment(tmp_path / "data.jsonl", n=20)
    argv = sweep(data, tmp_path / "cmp")
    argv[argv.index("--variants") + 1] = variants
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown variant") and err.count("\n") == 1
    assert all(w in err for w in words)
    assert not (tmp_path / "cmp").exists()


def test_bad_setting_refused_before_any_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare_module, "run_one", lambda *a, **k: pytest.fail("a run started"))
    (tmp_path / "sweep.yaml").write_text("lora_alfa: 16\n")
    assert main(sweep("data.jsonl", tmp_path / "cmp", "--config", str(tmp_path / "sweep.yaml"))) == 2
    assert "did you mean lora_alpha" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("argv, words", [
    (["--learning-rate", "1e-3"], ["compare sweeps learning_rate", "--lrs"]),
    (["--seed", "3", "--variant", "dora"], ["variant, seed", "--variants", "--seeds"]),
    (["--seeds", "two"], ["--seeds", "integers"]),
])
def test_swept_settings_are_not_flags(argv, words, tmp_path, monkeypatch, capsys):
    """`--learning-rate` or `--seed` given to compare would be silently replaced by the sweep: refused."""
    monkeypatch.setattr(compare_module, "run_one", lambda *a, **k: pytest.fail("a run started"))
    assert main(sweep("data.jsonl", tmp_path / "cmp") + argv) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not (tmp_path / "cmp").exists()


def test_seeds_share_the_data_split(tmp_path):
    """The training seed varies init and order, not the test set: a sweep's seed spread is over one test set."""
    data = write_sentiment(tmp_path / "data.jsonl", n=60)
    split = lambda **kw: load_splits(RunConfig.from_flat({"data": data, **kw}))  # noqa: E731
    a, b, c = split(seed=0), split(seed=1), split(seed=0, split_seed=1)
    assert a.test.texts == b.test.texts and a.train.texts == b.train.texts
    assert a.test.texts != c.test.texts


# ---- table arithmetic ----------------------------------------------------------------------------
def row(variant, lr, seed, value, metric="test_accuracy"):
    return {"variant": variant, "learning_rate": lr, "seed": seed, metric: value, "trainable_parameters": 1000,
            "seconds_per_step": 0.5, "peak_memory_mb": 100.0}


def test_group_runs_mean_std():
    rows = [row("lora", 1e-3, 0, 0.8), row("lora", 1e-3, 1, 0.6), row("lora", 1e-2, 0, 0.9),
            row("lora", 1e-2, 1, 0.9), row("dora", 1e-3, 0, 0.5)]
    groups = group_runs(rows, "test_accuracy")
    assert set(groups) == {("lora", 1e-3), ("lora", 1e-2), ("dora", 1e-3)}
    g = groups[("lora", 1e-3)]
    assert len(g["runs"]) == 2 and g["mean"] == pytest.approx(0.7)
    assert g["std"] == pytest.approx(math.sqrt(0.02))  # sample std over seeds: sqrt(((0.1)^2 + (0.1)^2) / 1)
    assert groups[("lora", 1e-2)]["std"] == 0 and groups[("dora", 1e-3)]["std"] == 0  # one seed: 0, not an error

    md = summary(groups, best_learning_rates(groups, True), "test_accuracy", True, {"model": "m", "data": "d"})
    assert "| lora | 0.001 | 2 | 0.7 ± 0.1414 | 1,000 | 0.5 | 100 |" in md
    assert "| lora | 0.01 | 0.9 ± 0 |" in md and "higher is better" in md


@pytest.mark.parametrize("greater, expected", [(True, 1e-2), (False, 1e-3)])
def test_best_learning_rates(greater, expected):
    metric = "test_accuracy" if greater else "test_perplexity"
    values = {1e-4: [0.5, 0.7], 1e-3: [0.2, 0.2], 1e-2: [0.9, 0.95]}
    rows = [row("lora", lr, s, v, metric) for lr, vs in values.items() for s, v in enumerate(vs)]
    best = best_learning_rates(group_runs(rows, metric), greater)
    assert set(best) == {"lora"} and best["lora"][0] == expected
    assert best["lora"][1] == pytest.approx(sum(values[expected]) / 2)


def test_best_learning_rates_ties_and_nan():
    rows = [row("a", 1e-3, 0, 0.5), row("a", 1e-2, 0, 0.5), row("b", 1e-3, 0, float("nan")), row("b", 1e-2, 0, 0.1),
            row("c", 1e-3, 0, 0.1), row("c", 1e-2, 0, float("nan"))]
    for greater in (True, False):
        best = best_learning_rates(group_runs(rows, "test_accuracy"), greater)
        assert best["a"][0] == 1e-3  # a tie keeps the first learning rate
        assert best["b"][0] == 1e-2 and best["c"][0] == 1e-3  # a failed (NaN) group never wins


def test_per_variant_settings_give_each_entry_its_own_rank(tmp_path):
    data = write_sentiment(tmp_path / "data.jsonl", n=40)
    spec = tmp_path / "variants.yaml"
    spec.write_text("lora: {r: 4}\nwide: {variant: lora, r: 8, learning_rates: [0.01]}\n")
    out = tmp_path / "cmp"
    assert main(["compare", "--variant-settings", str(spec), "--lrs", "1e-3", "--seeds", "1", "--model",
                 "tiny-llama", "--data", data, "--max-steps", "1", "--per-device-train-batch-size", "8",
                 "--disable-tqdm", "--output-dir", str(out)]) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    params = {r["variant"]: int(r["trainable_parameters"]) for r in rows}
    assert {(r["variant"], float(r["learning_rate"])) for r in rows} == {("lora", 1e-3), ("wide", 1e-2)}
    assert params["wide"] - params["lora"] == 2 * 4 * (128 + 96)  # 2 layers × 4 more ranks × (q_proj + v_proj)
    with pytest.raises(Exception, match="not in the sweep"):
        compare_module.compare({}, ["lora"], [1e-3], [0], per_variant={"dora": {"r": 4}})


def test_runs_saved_before_a_setting_existed_are_reused_at_its_default(tmp_path):
    import yaml

    from lorakit.train.run import saved_settings

    config = RunConfig.from_flat({"output_dir": str(tmp_path)})
    old = saved_settings(config)
    del old["init"], old["optim_args"]  # settings added after this run was made
    (tmp_path / "run_config.yaml").write_text(yaml.safe_dump(old))
    (tmp_path / "results.json").write_text("{}")
    compare_module._check_reusable(tmp_path, config)  # defaults: reusable
    with pytest.raises(Exception, match="init"):
        compare_module._check_reusable(tmp_path, RunConfig.from_flat({"output_dir": str(tmp_path), "init": "eva"}))


def test_eval_ranks_report_accuracy_by_rank_and_aurac(tmp_path):
    data = write_sentiment(tmp_path / "data.jsonl", n=60)
    argv = ["compare", "--variants", "lora,dylora", "--lrs", "1e-2", "--seeds", "1", "--model", "tiny-llama",
            "--data", data, "--max-steps", "2", "--per-device-train-batch-size", "8", "--r", "4",
            "--eval-ranks", "1,2,4", "--disable-tqdm", "--output-dir", str(tmp_path / "cmp")]
    assert main(argv) == 0
    out = tmp_path / "cmp"
    results = json.loads((out / "runs" / "lora-lr0.01-seed0" / "results.json").read_text())
    assert results["test_accuracy@r4"] == results["test_accuracy"]  # rank r is the adapter itself
    assert set(results) >= {"test_accuracy@r1", "test_accuracy@r2", "aurac_v1", "aurac_v2"}
    scores = json.loads((out / "aurac.json").read_text())
    assert set(scores) == {"lora", "dylora"}
    assert "AURAC v1" in (out / "results.md").read_text()
    assert_png(out / "accuracy_vs_rank.png")


def test_plain_lora_at_rank_k_is_its_first_k_components():
    import torch

    import lorakit
    from contract import mlp, run
    from lorakit.errors import ConfigError
    from lorakit.rank.truncate import at_rank

    model = mlp()
    lorakit.inject(model, lorakit.AdapterConfig(r=4, lora_alpha=8, target_modules=["fc1"], init_lora_weights=False))
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    full = run(model, x)
    lora = model.fc1.adapters["default"]
    a, b = lora.lora_A.detach().clone(), lora.lora_B.detach().clone()
    with at_rank(model, 2):
        truncated = run(model, x)
    reference = mlp()  # a rank-2 LoRA of the first two components at the same scale α/r = 2
    lorakit.inject(reference, lorakit.AdapterConfig(r=2, lora_alpha=4, target_modules=["fc1"]))
    with torch.no_grad():
        reference.fc1.adapters["default"].lora_A.copy_(a[:2])
        reference.fc1.adapters["default"].lora_B.copy_(b[:, :2])
    assert torch.allclose(truncated, run(reference, x), atol=1e-6) and not torch.allclose(truncated, full)
    assert torch.equal(run(model, x), full)  # restored after the block
    lorakit.inject(model, lorakit.AdapterConfig(r=4, variant="dora", target_modules=["fc1"]), "d")
    with pytest.raises(ConfigError, match="dylora"):
        with at_rank(model, 2, "d"):
            pass


def test_best_learning_rate_is_chosen_on_validation_not_test():
    rows = [{**row("lora", 1e-3, 0, 0.9), "validation_accuracy": 0.6}, {**row("lora", 1e-2, 0, 0.7),
                                                                        "validation_accuracy": 0.8}]
    best = best_learning_rates(group_runs(rows, "test_accuracy", select="validation_accuracy"), True)
    assert best["lora"] == (1e-2, 0.7, 0.0)  # validation picks 1e-2; its test accuracy is what gets reported
    assert best_learning_rates(group_runs(rows, "test_accuracy"), True)["lora"][0] == 1e-3  # no select: the metric


def test_sweep_reports_majority_class_macro_f1_and_predicted_labels(swept):
    _, out = swept
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        shares = float(r["test_predicted_share_0"]) + float(r["test_predicted_share_1"])
        assert shares == pytest.approx(1.0) and 0.5 <= float(r["test_majority_class_rate"]) <= 1
        assert float(r["test_macro_f1"]) <= 1
    assert len({r["test_majority_class_rate"] for r in rows}) == 1  # the runs share their test split
    md = (out / "results.md").read_text()
    assert "| variant | learning rate | accuracy | majority class | f1 | macro f1 | predicted labels |" in md
    assert md.count(" of 2 |") == 4  # one row per (variant, lr), each counting its single-class seeds
