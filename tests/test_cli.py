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
    ([], ["train", "eval", "compare", "inspect", "merge", "export", "squeeze", "demo"]),
    (["train"], SETTING_FLAGS + ["--config", "--resume", "--overwrite-output-dir"]),
    (["eval"], ["--config", "--split", "--data", "--model", "--per-device-eval-batch-size", "--max-length"]),
    (["compare"], [f for f in SETTING_FLAGS if f not in ("--learning-rate", "--variant", "--use-rslora")]
     + ["--variants", "--lrs", "--seeds"]),
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


# ---- issue 16: the flags transformers users type, the life cycle, per-command flags, typos ----------------------
class Captured(Exception):
    """Raised by a stand-in for `lorakit.train.train`: carries the RunConfig the command line built."""


def config_of(monkeypatch, tmp_path, *argv):
    """The RunConfig `lorakit train ARGV` hands to train(), without training."""
    def capture(config, resume=False):
        raise Captured(config)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("lorakit.train.train", capture)
    with pytest.raises(Captured) as caught:
        main(["train", *argv])
    return caught.value.args[0]


def one_line_error(capsys, code, *words):
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, (word, err)
    return err


def test_transformers_spellings(monkeypatch, tmp_path):
    """Underscores, `--flag value` booleans (HfArgumentParser's forms) and transformers' optimizer names."""
    config = config_of(monkeypatch, tmp_path, "--per_device_train_batch_size=8", "--gradient_checkpointing",
                       "--bf16", "True", "--load_best_model_at_end", "false", "--optim", "adamw_torch_fused",
                       "--save_total_limit", "3", "--lora_alpha", "4")
    args = config.training
    assert args.per_device_train_batch_size == 8 and args.gradient_checkpointing and args.bf16
    assert not args.load_best_model_at_end and args.optim == "adamw" and args.save_total_limit == 3
    assert config.adapter.lora_alpha == 4
    for flags, bf16 in ((["--bf16"], True), (["--bf16", "false"], False), (["--bf16=yes"], True),
                        (["--bf16", "--no-bf16"], False)):
        assert config_of(monkeypatch, tmp_path, *flags).training.bf16 is bf16, flags
    for name, ours in (("adamw_torch", "adamw"), ("adamw_hf", "adamw"), ("adamw", "adamw"), ("sgd", "sgd")):
        assert config_of(monkeypatch, tmp_path, "--optim", name).training.optim == ours
    (tmp_path / "run.yaml").write_text("optim: adamw_torch\n")
    assert RunConfig.from_flat(read_yaml(tmp_path / "run.yaml")).training.optim == "adamw"


@pytest.mark.parametrize("argv, words", [
    (["train", "--optim", "adafactor"], ["optim='adafactor'", "adamw", "sgd", "lorapro", "adamw_torch"]),
    (["train", "--optim", "adamw_tor"], ["did you mean 'adamw'"]),
    (["train", "--bf16", "maybe"], ["--bf16", "invalid bool value: 'maybe'"]),
    (["train", "--report-to", "tensorbord"], ["report_to='tensorbord'", "did you mean 'tensorboard'"]),
    (["train", "--save-total-limit", "-1"], ["save_total_limit must be >= 0"]),
    (["train", "--resume", "--overwrite-output-dir"], ["choose one of --resume", "--overwrite-output-dir"]),
    (["trian", "--r", "4"], ["unknown command 'trian'", "did you mean 'train'", "eval"]),
    (["squeze", "a", "b"], ["did you mean 'squeeze'"]),
    (["train", "--variant", "dorra"], ["unknown variant 'dorra'", "did you mean 'dora'", "vera"]),
    (["eval", "run", "--learning-rate", "1e-3"], ["`lorakit eval` does not take the run setting --learning-rate"]),
    (["compare", "--learning-rate", "1e-3"], ["compare sweeps learning_rate", "--lrs"]),
])
def test_bad_flags_are_one_line_errors(argv, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    one_line_error(capsys, main(argv), *words)
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("missing", ["tensorboard", "wandb"])
def test_report_to_needs_its_package(missing, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    monkeypatch.chdir(tmp_path)
    one_line_error(capsys, main(["train", "--report-to", missing]), f"needs the {missing} package",
                   f"pip install {missing}")
    assert not any(tmp_path.iterdir())


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"lorakit {lorakit.__version__}\n"


def test_each_command_takes_its_own_flags(capsys):
    """eval: what to evaluate on and how; compare: every setting but those it sweeps (they parse, for the hint)."""
    assert main(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--data", "--model", "--task", "--max-eval-samples", "--per-device-eval-batch-size",
                 "--max-length", "--device", "--bf16", "--quantize"):
        assert flag in out, flag
    for flag in ("--learning-rate", "--lora-alpha", "--r ", "--optim", "--save-steps", "--resume", "--report-to"):
        assert flag not in out, flag
    assert main(["compare", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--learning-rate" not in out and "--variant " not in out and "--seed " not in out
    assert "--lr-scheduler-type" in out and "--lrs" in out


# ---- checkpoints kept, reporting -------------------------------------------------------------------------------
def test_save_total_limit_keeps_the_newest(tmp_path):
    from lorakit.train import checkpoint

    def steps(keep, n=4):
        folder = tmp_path / f"keep{keep}"
        for step in range(1, n + 1):
            checkpoint.save(folder, {"w": torch.zeros(2)}, {}, {"step": step, "best": None,
                                                              "evals_without_gain": 0}, keep=keep)
        return [p.name for p in checkpoint.checkpoints(folder)]

    assert steps(1) == ["checkpoint-4"]
    assert steps(2) == ["checkpoint-3", "checkpoint-4"]
    assert steps(0) == [f"checkpoint-{i}" for i in range(1, 5)]


class FakeWriter:
    """Records what `torch.utils.tensorboard.SummaryWriter` is asked to do."""
    made = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def fake_module(name, **attrs):
    import importlib.machinery
    import types

    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    return module


@pytest.fixture(scope="module")
def lifecycle_run(tmp_path_factory):
    """A finished 4-step tiny-llama run with transformers' spellings, every step checkpointed, 2 kept, and its
    metrics reported to TensorBoard (a stand-in writer: tensorboard is optional). Returns (run folder, data)."""
    import sys

    root = tmp_path_factory.mktemp("lifecycle")
    data = write_sentiment(root / "data.jsonl")
    run = root / "run"
    FakeWriter.made.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "tensorboard", fake_module("tensorboard"))
        mp.setitem(sys.modules, "torch.utils.tensorboard", fake_module("torch.utils.tensorboard",
                                                                       SummaryWriter=FakeWriter))
        assert main(["train", "--model", "tiny-llama", "--data", data, "--target_modules", "q_proj", "v_proj",
                     "--r", "4", "--init_lora_weights", "false", "--learning_rate", "1e-2", "--max_steps", "4",
                     "--save_steps", "1", "--save-total-limit", "2", "--optim", "adamw_torch", "--eval-steps", "2",
                     "--per_device_train_batch_size=8", "--disable_tqdm", "--report-to", "tensorboard",
                     "--output_dir", str(run)]) == 0
    return run, data


def test_lifecycle_run_checkpoints_and_tensorboard(lifecycle_run):
    run, _ = lifecycle_run
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-4"]
    assert read_yaml(run / "run_config.yaml")["optim"] == "adamw"
    [writer] = FakeWriter.made
    assert writer.log_dir == str(run / "runs") and writer.purge_step is None and writer.closed
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [(tag, value, step) for tag, value, step in writer.scalars if tag == "train/loss"]
    assert losses == [("train/loss", m["loss"], m["step"]) for m in metrics]
    evals = [(value, step) for tag, value, step in writer.scalars if tag == "eval/accuracy"]
    assert evals == [(m["eval_accuracy"], m["step"]) for m in metrics if "eval_accuracy" in m] and len(evals) == 2
    assert {"train/learning_rate", "train/grad_norm", "train/epoch"} <= {t for t, _, _ in writer.scalars}


def test_wandb_reports_offline(tmp_path, monkeypatch):
    import sys

    from lorakit.train.reporting import Reporter

    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    monkeypatch.setitem(sys.modules, "wandb", fake_module("wandb", init=lambda **kw: calls.append(("init", kw))
                                                          or Run()))
    reporter = Reporter("wandb", tmp_path / "run")
    reporter.log({"step": 3, "loss": 0.5, "eval_accuracy": 0.75, "note": "text"})
    reporter.close()
    assert calls[0] == ("init", {"mode": "offline", "dir": str(tmp_path / "run"), "project": "lorakit",
                                 "name": "run"})
    assert calls[1:] == [("log", {"train/loss": 0.5, "eval/accuracy": 0.75}, 3), ("finish",)]


def test_real_tensorboard_event_files(tmp_path):
    """With tensorboard installed, the scalars can be read back from the event file."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lorakit.train.reporting import Reporter

    reporter = Reporter("tensorboard", tmp_path)
    for step in (1, 2):
        reporter.log({"step": step, "loss": 1.0 / step})
    reporter.close()
    events = EventAccumulator(str(tmp_path / "runs")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 0.5)]


# ---- eval, merge, export, squeeze on a run ------------------------------------------------------------------------
def test_eval_takes_its_flags_and_ignores_training_settings_of_the_run(lifecycle_run, tmp_path, capsys):
    import re
    import shutil

    run, _ = lifecycle_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    with open(copy / "run_config.yaml", "a") as f:  # settings eval has no use for, which would fail here
        f.write("report_to: wandb\nfsdp: full_shard\n")
    assert main(["eval", str(copy), "--max-eval-samples", "4", "--per-device-eval-batch-size", "2",
                 "--max_length", "32"]) == 0
    assert re.search(r"test_examples\s+4\b", capsys.readouterr().out)


def model_logits(model, n=3):
    ids = torch.arange(4, 4 + 5 * n).reshape(n, 5)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_merge_writes_a_transformers_model(lifecycle_run, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from lorakit.models import load_model

    run, _ = lifecycle_run
    out = tmp_path / "merged"
    assert main(["merge", str(run), str(out)]) == 0
    assert f"wrote {out}: LlamaForSequenceClassification" in capsys.readouterr().out
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    adapted, _ = load_model(str(run / "base_model"), "classification")
    lorakit.load_adapter(adapted, run / "adapter")
    assert torch.allclose(model_logits(merged), model_logits(adapted), atol=1e-5)
    assert (out / "tokenizer.json").is_file() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


@pytest.mark.parametrize("command", [["merge"], ["export"], ["squeeze", "--r", "2"]])
def test_output_folders_are_never_silently_overwritten(command, lifecycle_run, tmp_path, capsys):
    run, _ = lifecycle_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    argv = [command[0], str(run / "adapter"), str(out), *command[1:]]
    one_line_error(capsys, main(argv), f"output folder {out} exists and is not empty", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert main(argv + ["--overwrite"]) == 0
    assert not (out / "mine.txt").exists() and (out / "config.json" if command == ["merge"] else
                                                  out / "adapter_config.json").is_file()


def test_train_refuses_a_non_empty_output_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = write_sentiment(tmp_path / "data.jsonl", n=40)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("x")
    argv = ["train", "--model", "tiny-llama", "--data", data, "--max-steps", "1", "--disable-tqdm",
            "--output-dir", "out"]
    one_line_error(capsys, main(argv), "output folder out exists and is not empty", "--overwrite-output-dir")
    assert main(argv + ["--overwrite-output-dir"]) == 0
    assert not (tmp_path / "out" / "notes.txt").exists() and (tmp_path / "out" / "adapter").is_dir()
    capsys.readouterr()
    one_line_error(capsys, main(argv), "already holds a run", "--resume", "--overwrite-output-dir")


def test_squeeze_takes_a_run_folder_and_r(lifecycle_run, tmp_path, capsys):
    run, _ = lifecycle_run
    assert main(["squeeze", str(run), str(tmp_path / "sq"), "--r", "2"]) == 0
    assert "r   4 -> 2" in capsys.readouterr().out
    config, _ = lorakit.read_adapter(tmp_path / "sq")
    assert config.r == 2 and config.variant == "lora"
    assert main(["squeeze", str(run), str(tmp_path / "old"), "--rank", "2"]) == 0  # the deprecated name
    assert "--rank` is deprecated; use --r" in capsys.readouterr().err
    assert lorakit.read_adapter(tmp_path / "old")[0].r == 2


def test_base_model_must_be_known(tmp_path, capsys):
    from contract import mlp

    model = mlp()
    lorakit.inject(model, lorakit.AdapterConfig(r=2, target_modules=["fc1"], use_dora=True))
    lorakit.save_adapter(model, tmp_path / "dora")
    one_line_error(capsys, main(["squeeze", str(tmp_path / "dora"), str(tmp_path / "sq"), "--r", "1"]),
                   "names no base model", "--model")
    assert not (tmp_path / "sq").exists()
