"""What the claims table is made of: a `Claim` (the paper's sentence, our experiment, the rule it is judged by), a
`Measurement` (the numbers an experiment produced, cached as JSON) and an `Assessment` (interval + verdict)."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

from ..errors import ConfigError, StatisticsError
from .stats import (KINDS, NOT_RUN, STATISTICS, Condition, Interval, Verdict, mean_std, paired_bootstrap,
                    replicate_interval, statistic_value, verdict)

RULES = ("bootstrap", "replicates")
ARMS = ("treatment", "baseline")
MEASUREMENT = "measurement.json"


@dataclass
class Measurement:
    """The numbers behind one row. `replicates`: per arm, one value per replicate (paired by position);
    `examples`: per arm, per seed, the per-example values (scores, or [confidence, hit] for ECE) on the same examples
    in the same order; `conditions`: exact checks; `details` and `sources`: lines for the notes."""

    treatment: str
    baseline: str
    replicates: dict[str, list[float]]
    replicate_names: list[str]
    unit: str = "seed"
    examples: Optional[dict[str, list]] = None
    example_unit: str = "test example"
    statistic: str = "mean"
    conditions: list[Condition] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def __post_init__(self):
        if set(self.replicates) != set(ARMS):
            raise StatisticsError(f"replicates must be given for {ARMS}, got {sorted(self.replicates)}")
        if not len(self.replicates["treatment"]) == len(self.replicates["baseline"]) == len(self.replicate_names):
            raise StatisticsError("replicates must be paired: one treatment and one baseline value per replicate name")
        if self.examples is not None and set(self.examples) != set(ARMS):
            raise StatisticsError(f"examples must be given for {ARMS}, got {sorted(self.examples)}")
        if self.statistic not in STATISTICS:
            raise StatisticsError(f"statistic must be one of {', '.join(STATISTICS)}, got {self.statistic!r}")
        self.conditions = [c if isinstance(c, Condition) else Condition(**c) for c in self.conditions]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Measurement":
        return cls(**data)


class Context:
    """Where a claims run reads and writes: `runs_dir` (runs/claims: measurements and training runs), `bench_dir`
    (runs/: the caches the bench scripts left), and whether bars are shown."""

    def __init__(self, runs_dir: str | os.PathLike = "runs/claims", bench_dir: str | os.PathLike = "runs",
                 progress: bool = True):
        self.runs_dir, self.bench_dir, self.progress = Path(runs_dir), Path(bench_dir), progress


class Experiment(Protocol):
    """How a claim gets its numbers. `external`: read from another script's cache (`command` makes it), never run or
    cached here; `units()`: (name, minutes) of each unit of work from nothing, shared between claims by name."""

    external: bool
    command: str

    def units(self) -> list[tuple[str, float]]: ...

    def measure(self, ctx: Context) -> Measurement: ...


@dataclass(frozen=True)
class Claim:
    """One row: `claim` (the paper's headline, one line) tested by `experiment` (one line) through `measure`."""

    key: str
    method: str
    paper: str
    claim: str
    experiment: str
    metric: str
    measure: Experiment
    rule: str = "bootstrap"
    higher_is_better: bool = True
    kind: str = "better"
    margin: float = 0.0
    magnitude: Optional[float] = None
    percent: bool = True  # shown ×100 (accuracy, ECE); else as is

    def __post_init__(self):
        if self.rule not in RULES:
            raise ConfigError(f"claim {self.key!r}: rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if self.kind not in KINDS:
            raise ConfigError(f"claim {self.key!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "no_worse" and not self.margin > 0:
            raise ConfigError(f"claim {self.key!r}: a no_worse claim needs a margin > 0")

    @property
    def minutes(self) -> float:
        return sum(m for _, m in self.measure.units())


@dataclass(frozen=True)
class Assessment:
    interval: Optional[Interval]       # the interval the verdict uses (None: the rule could not be applied)
    verdict: Verdict
    other: Optional[Interval] = None   # the other interval, when the data allow it
    means: dict = field(default_factory=dict)  # arm → (mean, std) over replicates
    values: dict = field(default_factory=dict)  # arm → the metric on all examples (bootstrap rule)


def assess(claim: Claim, m: Optional[Measurement]) -> Assessment:
    """Apply the claim's rule to its measurement; None → "not run yet"."""
    if m is None:
        return Assessment(None, Verdict(NOT_RUN))
    means = {arm: mean_std(m.replicates[arm]) for arm in ARMS}
    boot = values = None
    if m.examples is not None:
        boot = paired_bootstrap(m.examples["treatment"], m.examples["baseline"], m.statistic)
        values = {arm: statistic_value(m.examples[arm], m.statistic) for arm in ARMS}
    try:
        seeds = replicate_interval(m.replicates["treatment"], m.replicates["baseline"])
    except StatisticsError as e:
        seeds, refusal = None, str(e)
    else:
        refusal = ""
    if claim.rule == "bootstrap":
        if boot is None:
            raise StatisticsError(f"claim {claim.key!r} uses the bootstrap rule but its measurement has no "
                                  "per-example values")
        chosen, other = boot, seeds
    else:
        chosen, other = seeds, boot
    v = verdict(chosen, claim.higher_is_better, claim.kind, claim.margin, claim.magnitude, m.conditions)
    if chosen is None and v.word != "does not hold":
        v = Verdict(v.word, refusal)
    return Assessment(chosen, v, other, means, values or {})


def measurement_path(runs_dir: str | os.PathLike, key: str) -> Path:
    return Path(runs_dir) / key / MEASUREMENT


def load_measurement(runs_dir: str | os.PathLike, key: str) -> Optional[Measurement]:
    """The cached measurement of claim `key`, or None."""
    path = measurement_path(runs_dir, key)
    if not path.is_file():
        return None
    try:
        return Measurement.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise StatisticsError(f"{path} is not a measurement ({e}); delete it to measure the claim again") from None


def save_measurement(runs_dir: str | os.PathLike, key: str, m: Measurement) -> Path:
    """Write atomically (a half-written file never counts as measured)."""
    path = measurement_path(runs_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(m.to_json(), indent=1))
    os.replace(tmp, path)
    return path
