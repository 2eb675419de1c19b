"""docs/claims.md from cached measurements in a tmp dir: the rule is stated, one row per registered claim, "not run
yet" for the missing ones, verdicts as the rule says; a cached measurement is reused, never recomputed; the bench
caches and existing run folders are read without training."""
import json
import re

import pytest
import yaml

from lorakit.claims import command, registry
from lorakit.claims.experiments import ArmComparison
from lorakit.claims.external import BenchRows, IntruderCounts
from lorakit.claims.predictions import PREDICTIONS, write_predictions
from lorakit.claims.records import Claim, Context, Measurement, load_measurement, save_measurement
from lorakit.claims.runs import Arm
from lorakit.claims.stats import RULE
from lorakit.errors import ConfigError, NotMeasuredError


class Fake:
    """An experiment that counts its calls and refuses to run when its measurement is already cached."""

    external, command, cost = False, "fake", ""

    def __init__(self, key, treatment, baseline, runs_dir):
        self.key, self.t, self.b, self.runs_dir, self.calls = key, treatment, baseline, runs_dir, 0

    def units(self):
        return [(f"run {self.key}", 2.0)]

    def measure(self, ctx):
        assert load_measurement(ctx.runs_dir, self.key) is None, "recomputed a cached measurement"
        self.calls += 1
        return seeds_measurement(self.t, self.b)


class Missing:
    external, command, cost = True, "bench/nothing.py", "1 min"

    def units(self):
        return []

    def measure(self, ctx):
        raise NotMeasuredError("runs/nothing.json is missing: run `bench/nothing.py`.")


def seeds_measurement(t, b):
    return Measurement("T", "B", {"treatment": list(t), "baseline": list(b)}, [f"seed {i}" for i in range(len(t))])


def claim(key, experiment, **kw):
    return Claim(key, key.upper(), "Someone, 2024", f"{key} is better.", f"{key} vs base.", "test accuracy",
                 experiment, **{"rule": "replicates", **kw})


def table_rows(page):
    return [line for line in page.splitlines() if line.startswith("| [")]


def verdict_of(page, key):
    (line,) = [r for r in table_rows(page) if f"(#{key})" in r]
    return re.findall(r"\*\*([a-z ]+)\*\*", line)[-1]


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    runs = tmp_path / "runs" / "claims"
    win = Fake("win", [0.80, 0.82, 0.84], [0.78, 0.79, 0.80], runs)
    loss = Fake("loss", [0.70, 0.71, 0.69], [0.80, 0.81, 0.79], runs)
    tie = Fake("tie", [0.80, 0.78, 0.82], [0.79, 0.81, 0.80], runs)
    todo = Fake("todo", [0.9] * 3, [0.1] * 3, runs)
    claims = [claim("win", win), claim("loss", loss), claim("tie", tie), claim("todo", todo),
              claim("bench", Missing())]
    for f in (win, loss, tie):  # cached before the command runs
        save_measurement(runs, f.key, seeds_measurement(f.t, f.b))
    monkeypatch.setattr(registry, "CLAIMS", claims)
    return tmp_path, {c.key: c for c in claims}


def run_command(tmp_path, *extra):
    out = tmp_path / "claims.md"
    code = command.main(["--out", str(out), "--runs-dir", str(tmp_path / "runs" / "claims"),
                         "--bench-dir", str(tmp_path / "runs"), "--no-progress", *extra])
    return code, out.read_text() if out.exists() else ""


def test_cached_only_page_states_the_rule_and_gives_one_row_per_claim(fakes):
    tmp_path, claims = fakes
    code, page = run_command(tmp_path, "--cached-only")
    assert code == 0
    assert page.index("## The rule") < page.index("## Claims")
    assert RULE in page
    assert len(table_rows(page)) == len(claims)
    assert verdict_of(page, "win") == "holds"
    assert verdict_of(page, "loss") == "does not hold"
    assert verdict_of(page, "tie") == "inconclusive"
    assert verdict_of(page, "todo") == verdict_of(page, "bench") == "not run yet"
    assert "runs/nothing.json is missing" in page
    assert all(c.measure.calls == 0 for k, c in claims.items() if k != "bench")  # nothing ran


def test_missing_measurements_run_once_then_come_from_the_cache(fakes):
    tmp_path, claims = fakes
    code, page = run_command(tmp_path)
    assert code == 0
    assert [claims[k].measure.calls for k in ("win", "loss", "tie", "todo")] == [0, 0, 0, 1]
    assert verdict_of(page, "todo") == "holds"
    assert (tmp_path / "runs" / "claims" / "todo" / "measurement.json").is_file()
    code, again = run_command(tmp_path)
    assert claims["todo"].measure.calls == 1  # a second run reuses the cached measurement
    assert verdict_of(again, "todo") == "holds"


def test_lorakit_claims_is_the_same_command(fakes):
    from lorakit.cli import main

    tmp_path, _ = fakes
    out = tmp_path / "via_cli.md"
    assert main(["claims", "--cached-only", "--out", str(out), "--runs-dir", str(tmp_path / "runs" / "claims"),
                 "--bench-dir", str(tmp_path / "runs"), "--no-progress"]) == 0
    assert verdict_of(out.read_text(), "win") == "holds"


def test_only_runs_the_named_claim_and_refuses_unknown_keys(fakes, capsys):
    tmp_path, claims = fakes
    assert run_command(tmp_path, "--only", "todo", "--dry-run")[0] == 0
    assert "about 2 min (1 runs or steps" in capsys.readouterr().out
    assert claims["todo"].measure.calls == 0
    assert run_command(tmp_path, "--only", "todx")[0] == 2
    assert "did you mean todo" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        registry.select("nope")


def test_every_registered_claim_renders_as_not_run_yet_and_fits_three_hours(tmp_path):
    code, page = run_command(tmp_path, "--cached-only")
    assert code == 0
    rows = table_rows(page)
    assert len(rows) == len(registry.CLAIMS) == len(set(registry.claim_keys()))
    assert all(r.rstrip().endswith("**not run yet** |") for r in rows)
    units = {}
    for c in registry.CLAIMS:
        if not c.measure.external:
            assert c.minutes > 0, c.key
            units.update(c.measure.units())
    assert sum(units.values()) <= 180  # the experiments this command runs, from nothing
    required = {"dora", "rslora", "loraplus", "lorapro", "pissa", "lora-ga", "vera", "vblora", "unilora", "dylora",
                "matryoshka", "squeeze", "sora", "loram", "intruders-full", "hypelora", "ties", "knots", "arrow"}
    assert required <= set(registry.claim_keys())


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_bench_rows_pair_the_tasks(tmp_path):
    bench = tmp_path / "runs"
    tasks = ("a", "b", "c")
    write_json(bench / "merging/eval/new.json", {t: {"accuracy": v} for t, v in zip(tasks, (0.8, 0.7, 0.9))})
    write_json(bench / "merging/eval/old.json", {t: {"accuracy": v} for t, v in zip(tasks, (0.7, 0.6, 0.8))})
    rows = BenchRows.per_task("merging/eval", "new", "old", tasks, ("new", "old"), "bench/x.py", "1 min")
    m = rows.measure(Context(tmp_path / "claims", bench))
    assert m.replicates == {"treatment": [0.8, 0.7, 0.9], "baseline": [0.7, 0.6, 0.8]}
    assert m.replicate_names == list(tasks) and m.unit == "task"
    missing = BenchRows.per_task("merging/eval", "gone", "old", tasks, ("gone", "old"), "bench/x.py", "1 min")
    with pytest.raises(NotMeasuredError, match="bench/x.py"):
        missing.measure(Context(tmp_path / "claims", bench))


def test_intruder_counts_are_paired_by_layer(tmp_path):
    bench = tmp_path / "runs"
    write_json(bench / "intruders/lora.json", {"accuracy": 0.9, "intruders": {
        "l0": {"intruders": 3}, "l1": {"intruders": 1}, "l2": {"intruders": 0}}})
    write_json(bench / "intruders/full.json", {"accuracy": 0.9, "intruders": {
        "l0": {"intruders": 0}, "l1": {"intruders": 0}, "l2": {"intruders": 0}, "extra": {"intruders": 5}}})
    m = IntruderCounts("lora", "full", ("LoRA", "full"), "?").measure(Context(tmp_path / "claims", bench))
    assert m.examples == {"treatment": [[3.0, 1.0, 0.0]], "baseline": [[0.0, 0.0, 0.0]]}
    assert m.example_unit == "layer"


def fake_run(arm, seed, runs_dir, correct, losses):
    """A finished run folder as `lorakit train` and the claims runner leave it (no training)."""
    from lorakit.train.args import RunConfig
    from lorakit.train.run import saved_settings

    flat = arm.flat(seed, runs_dir)
    folder = arm.run_dir(seed, runs_dir)
    folder.mkdir(parents=True)
    (folder / "run_config.yaml").write_text(yaml.safe_dump(saved_settings(RunConfig.from_flat(flat))))
    rows = [{"index": i, "label": 1, "predicted": int(c), "probabilities": [0.4, 0.6] if c else [0.6, 0.4]}
            for i, c in enumerate(correct)]
    write_predictions(folder / PREDICTIONS, rows)
    (folder / "results.json").write_text(json.dumps({"test_accuracy": sum(correct) / len(correct),
                                                     "test_examples": len(correct), "trainable_parameters": 100,
                                                     "seconds_per_step": 0.1}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": x}) + "\n"
                                                  for i, x in enumerate(losses)))


def test_arm_comparison_reads_finished_runs_without_training(tmp_path):
    runs = tmp_path / "claims"
    new = Arm.of("new", "New", 1.0, r=8, learning_rate=1e-3)
    old = Arm.of("old", "Old", 1.0, r=8, learning_rate=3e-3)
    for s in new.seeds:
        fake_run(new, s, runs, [1] * 90 + [0] * 10, [0.5, 0.3])
        fake_run(old, s, runs, [1] * 70 + [0] * 30, [0.6, 0.5])
    ctx = Context(runs, tmp_path / "runs")
    acc = ArmComparison(new, old, "accuracy").measure(ctx)
    assert acc.replicates == {"treatment": [0.9] * 3, "baseline": [0.7] * 3}
    assert len(acc.examples["treatment"]) == 3 and len(acc.examples["treatment"][0]) == 100
    loss = ArmComparison(new, old, "train_loss").measure(ctx)
    assert loss.replicates["treatment"] == pytest.approx([0.4] * 3)
    assert loss.examples is None
    other = Arm.of("new", "New", 1.0, r=16, learning_rate=1e-3)  # same folder, other settings: refused
    with pytest.raises(ConfigError, match="other settings"):
        ArmComparison(other, old, "accuracy").measure(ctx)
