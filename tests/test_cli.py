"""`lorakit` command line, run in-process through `lorakit.cli.main`: help, train (flags and YAML), eval,
inspect, and bad input (exit code 2, one line on stderr, nothing written)."""
import json
import os
import random

import pytest
import torch
from torch import nn

import lorakit
from lorakit.analysis import layer_table
from lorakit.cli import build_parser, main, settings
from lorakit.train import RunConfig, evaluate
from lorakit.train.args import read_yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PNG = b"\x89PNG\r\n\x1a\n"


def write_sentiment(path, n=96, seed=0):
    """A JSONL file of (text, label) rows whose label a word decides; returns the path as a string."""
    rng = random.Random(seed)
    words = ("awful dull bad poor boring sad".split(), "great fine good lovely superb nice".split())
    with open(path, "w") as f:
        for i in range(n):
            y = i % 2
            f.write(json.dumps({"text": f"the film was {rng.choice(words[y])} and {rng.choice(words[y])}",
                                "label": y}) + "\n")
    return str(path)


def files(root):
    """Every path under root with its size and mtime: equal snapshots mean nothing was written."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def assert_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG
    assert matplotlib.image.imread(path).shape[0] > 100


def test_inspect_lists_tensors(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    lorakit.inject(model, lorakit.AdapterConfig(r=2, lora_alpha=6, use_dora=True, target_modules=["0"],
                                                init_lora_weights=False))
    lorakit.save_adapter(model, tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "variant=dora r=2" in out
    assert "1 adapted layers, ranks [2], 24 adapter parameters" in out  # A 2x6 + B 4x2 + magnitude 4
    _, rows, _ = layer_table(tmp_path)
    layer = model[0]
    dense = 3.0 * (layer.adapters["default"].lora_B @ layer.adapters["default"].lora_A)
    assert rows[0]["shape"] == "4x6" and rows[0]["rank"] == 2
    assert abs(rows[0]["norm_delta"] - dense.norm().item()) < 1e-5 * dense.norm().item()


def test_bad_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---- help ----------------------------------------------------------------------------------------
SETTING_FLAGS = ["--learning-rate", "--per-device-train-batch-size", "--target-modules", "--use-rslora",
                 "--lora-alpha", "--num-train-epochs", "--output-dir", "--variant", "--split-seed"]


@pytest.mark.parametrize("command, wanted", [
    ([], ["train", "eval", "compare", "inspect", "demo"]),
    (["train"], SETTING_FLAGS + ["--config", "--resume"]),
    (["eval"], SETTING_FLAGS + ["--config", "--split"]),
    (["compare"], SETTING_FLAGS + ["--variants", "--lrs", "--seeds"]),
    (["inspect"], ["dir", "output_dir"]),
    (["demo"], ["--learning-rate", "--max-train-samples", "--variant"]),
])
def test_help(command, wanted, capsys):
    assert main(command + ["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lorakit")
    for text in wanted:
        assert text in out, text
    assert "MISSING" not in out and "object at 0x" not in out  # defaults print as values


def test_flag_forms():
    """Flags become the settings a YAML file would hold: numbers, lists, one regex or all-linear, mappings."""
    def parsed(*argv):
        return settings(build_parser().parse_args(["train", *argv]))

    assert parsed("--target-modules", "all-linear") == {"target_modules": "all-linear"}
    assert parsed("--target-modules", "q_proj") == {"target_modules": ["q_proj"]}
    assert parsed("--target-modules", "q_proj", "v_proj") == {"target_modules": ["q_proj", "v_proj"]}
    assert parsed("--target-modules", r".*\.(q|v)_proj") == {"target_modules": r".*\.(q|v)_proj"}
    assert parsed("--layers-to-transform", "0") == {"layers_to_transform": [0]}
    assert parsed("--rank-pattern", "{q_proj: 2}", "--r", "4") == {"rank_pattern": {"q_proj": 2}, "r": 4}
    assert parsed("--use-rslora", "--no-load-best-model-at-end", "--learning-rate", "3e-4") == \
        {"use_rslora": True, "load_best_model_at_end": False, "learning_rate": 3e-4}
    assert parsed("--init-lora-weights", "gaussian", "--lora-alpha", "16") == \
        {"init_lora_weights": "gaussian", "lora_alpha": 16.0}


# ---- train / eval / inspect ------------------------------------------------------------------------
def test_train_yaml_and_flags_eval_inspect(tmp_path, monkeypatch, capsys):
    """MiniLM from a YAML file with a flag overriding it: every output file, eval reproduces (from another working
    directory: the run keeps its data path), inspect reports."""
    monkeypatch.chdir(tmp_path)
    write_sentiment(tmp_path / "train.jsonl")
    (tmp_path / "run.yaml").write_text(
        "model: minilm\ndata: train.jsonl\nr: 2\nlora_alpha: 8\nlearning_rate: 1e-3\nmax_steps: 4\n"
        "per_device_train_batch_size: 8\ntarget_modules: [query, value]\nsave_steps: 2\ndisable_tqdm: true\n")
    assert main(["train", "--config", "run.yaml", "--r", "4", "--output-dir", "run"]) == 0
    printed = capsys.readouterr().out
    run = tmp_path / "run"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")

    saved = read_yaml(run / "run_config.yaml")
    assert saved["r"] == 4 and saved["lora_alpha"] == 8 and saved["learning_rate"] == 1e-3  # flag beats YAML
    assert saved["data"] == str(tmp_path / "train.jsonl")
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 4
    assert adapter_config["task_type"] == "SEQ_CLS" and sorted(adapter_config["target_modules"]) == ["query", "value"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and all(s["loss"] > 0 for s in steps)
    assert_png(run / "training_curves.png")
    results = json.loads((run / "results.json").read_text())
    lora = 6 * 2 * 4 * (384 + 384)  # 6 layers x (query, value) x r x (in + out)
    assert results["trainable_parameters"] == lora + 384 * 2 + 2  # + the classifier head, trained fully
    assert results["steps"] == 4 and 0 <= results["test_accuracy"] <= 1
    assert printed_value(printed, "test_accuracy") == f"{results['test_accuracy']:.4g}"

    config = RunConfig.from_flat(saved)
    again = evaluate(run, config)
    assert again == {"data": saved["data"], "split": "test",
                     **{k: v for k, v in results.items() if k.startswith("test_")}}  # exactly
    assert main(["eval", str(run), "--split", "validation"]) == 0
    assert printed_value(capsys.readouterr().out, "validation_accuracy") == f"{results['validation_accuracy']:.4g}"

    for where in (run / "adapter", run):  # an adapter folder, or the run's folder
        assert main(["inspect", str(where)]) == 0
        out = capsys.readouterr().out
        assert f"12 adapted layers, ranks [4], {lora:,} adapter parameters" in out
        assert "770 parameters" in out  # classifier weight 2x384 + bias 2


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished 3-step tiny-llama classification run from flags only: (folder, data file)."""
    root = tmp_path_factory.mktemp("tiny")
    data = write_sentiment(root / "data.jsonl")
    run = root / "run"
    assert main(["train", "--model", "tiny-llama", "--data", data, "--target-modules", "all-linear", "--r", "4",
                 "--init-lora-weights", "false", "--learning-rate", "1e-2", "--max-steps", "3",
                 "--per-device-train-batch-size", "8", "--disable-tqdm", "--output-dir", str(run)]) == 0
    return run, data


def test_tiny_llama_flags_run(tiny_run, capsys):
    run, _ = tiny_run
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert {t.rsplit(".", 1)[-1] for t in adapter_config["target_modules"]} == \
        {"down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"}  # all-linear, head excluded
    assert adapter_config["base_model_name_or_path"] == str(run / "base_model")
    assert (run / "base_model" / "config.json").is_file() and (run / "base_model" / "tokenizer.json").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    results = json.loads((run / "results.json").read_text())
    assert main(["eval", str(run)]) == 0  # rebuilds model and tokenizer from base_model/
    out = capsys.readouterr().out
    assert printed_value(out, "test_accuracy") == f"{results['test_accuracy']:.4g}"
    config = RunConfig.from_flat(read_yaml(run / "run_config.yaml"))
    assert evaluate(run / "adapter", config)["test_f1"] == results["test_f1"]


# ---- bad input -----------------------------------------------------------------------------------
BAD = {  # name: (files to write, argv after `train`, words the one-line message must hold)
    "yaml typo": ({"run.yaml": "learning_rat: 1e-3\n"}, ["--config", "run.yaml"],
                  ["'learning_rat'", "did you mean learning_rate", "valid settings:", "per_device_train_batch_size"]),
    "flag typo": ({}, ["--learnng-rate", "1e-3"], ["'--learnng-rate'", "did you mean --learning-rate"]),
    "abbreviated flag": ({}, ["--learning", "1e-3"], ["unknown option '--learning'", "--learning-rate"]),
    "unknown variant": ({}, ["--variant", "lorax"], ["'lorax'", "dora", "lora"]),
    "unknown variant in yaml": ({"run.yaml": "variant: lorax\n"}, ["--config", "run.yaml"], ["'lorax'", "dora"]),
    "bad type in yaml": ({"run.yaml": 'r: "eight"\n'}, ["--config", "run.yaml"], ["r must be", "'eight'"]),
    "bad type flag": ({}, ["--r", "eight"], ["--r", "invalid int value: 'eight'", "lorakit train --help"]),
    "bad choice": ({}, ["--lr-scheduler-type", "cosin"], ["lr_scheduler_type='cosin'", "cosine"]),
    "bad task": ({}, ["--task", "regresion"], ["task='regresion'", "regression"]),
    "invalid yaml": ({"run.yaml": "r: [1\n"}, ["--config", "run.yaml"], ["run.yaml", "not valid YAML", "line 2"]),
    "yaml list": ({"run.yaml": "- r\n- 8\n"}, ["--config", "run.yaml"], ["mapping of settings", "list"]),
    "missing yaml": ({}, ["--config", "nope.yaml"], ["nope.yaml", "does not exist"]),
    "missing data file": ({}, ["--data", "nope.jsonl"], ["nope.jsonl"]),
    "missing column": ({}, ["--label-column", "stars"], ["no column 'stars'", "columns: text, label"]),
    "non-numeric label": ({"bad.csv": "text,label\nfine,1\nmeh,x\n"}, ["--data", "bad.csv"],
                          ["bad.csv row 2", "'x' is not a number"]),
    "empty data": ({"empty.jsonl": ""}, ["--data", "empty.jsonl"], ["empty.jsonl", "empty"]),
    "unknown model": ({}, ["--model", "tiny-lama"], ["'tiny-lama'", "minilm", "tiny-llama"]),
    "targets match nothing": ({}, ["--target-modules", "qproj"], ["matched no module", "q_proj"]),
    "resume without a run": ({}, ["--resume"], ["--resume", "no checkpoint"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_train_input(case, tmp_path, monkeypatch, capsys):
    extra_files, argv, words = BAD[case]
    monkeypatch.chdir(tmp_path)
    write_sentiment(tmp_path / "data.jsonl", n=40)
    for name, text in extra_files.items():
        (tmp_path / name).write_text(text)
    before = files(tmp_path)
    code = main(["train", "--model", "tiny-llama", "--data", "data.jsonl", "--max-steps", "2", "--disable-tqdm",
                 "--output-dir", "out", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
    for word in words:
        assert word in err, (word, err)
    assert files(tmp_path) == before  # nothing written


def test_second_train_into_a_run_is_refused(tiny_run, capsys):
    run, data = tiny_run
    before = files(run)
    assert main(["train", "--model", "tiny-llama", "--data", data, "--max-steps", "3", "--disable-tqdm",
                 "--output-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and err.count("\n") == 1
    assert files(run) == before


def test_yaml_numbers_in_exponent_form(tmp_path):
    """PyYAML reads `1e-3` as a string (YAML 1.1); settings files read it as the number a user means."""
    (tmp_path / "run.yaml").write_text("learning_rate: 1e-3\nadam_epsilon: 1E-08\nwarmup_ratio: 0.1\nr: 8\n")
    config = RunConfig.from_flat(read_yaml(tmp_path / "run.yaml"))
    assert config.training.learning_rate == 1e-3 and config.training.adam_epsilon == 1e-8
    assert config.training.warmup_ratio == 0.1 and config.adapter.r == 8


def test_inspect_any_variant_lists_each_layers_tensors(tmp_path, capsys):
    """Files of other variants: tensors grouped by layer (by the targets), model-wide state listed apart."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    lorakit.inject(model, lorakit.AdapterConfig(r=4, variant="vblora", target_modules=["0", "2"],
                                                options={"vector_length": 8, "num_vectors": 4}))
    lorakit.save_adapter(model, tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "variant=vblora" in out and "vector_length" in out
    assert "0: 64 stored values — vblora_logits_A (4, 2, 4), vblora_logits_B (2, 4, 4)" in out
    assert "base_model.vblora_vector_bank" in out and "2 adapted layers" in out


def printed_value(out: str, key: str) -> str:
    """The value `lorakit train` / `eval` printed for `key` (a `name  value` line)."""
    return next(line.split(None, 1)[1] for line in out.splitlines() if line.split()[:1] == [key])
