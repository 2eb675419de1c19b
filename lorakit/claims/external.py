"""Claims whose numbers come from another script's cache under runs/ (the bench scripts behind docs/intruders.md,
docs/merging.md, docs/composition.md and docs/transfer.md). Read fresh on every render, never run or copied here:
while a file is missing the row says "not run yet" and names the script that writes it."""
from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from ..errors import DataError, NotMeasuredError
from .records import Context, Measurement


def _read(ctx: Context, relative: str, command: str) -> dict:
    path = ctx.bench_dir / relative
    if not path.is_file():
        raise NotMeasuredError(f"{path} is missing: run `{command}`.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e})") from None


def _pick(data: dict, keys: Sequence[str], where: str) -> float:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            raise DataError(f"{where}: no {'/'.join(keys)} in it")
        data = data[key]
    return float(data)


class IntruderCounts:
    """Intruder dimensions (k 10, ε 0.5) per layer of two runs of bench/intruders.py (runs/intruders/<run>.json),
    paired by layer; the bootstrap resamples layers."""

    external = True
    command = ".venv/bin/python bench/intruders.py"

    def __init__(self, treatment: str, baseline: str, labels: tuple[str, str], cost: str):
        self.treatment, self.baseline, self.labels, self.cost = treatment, baseline, labels, cost

    def units(self) -> list[tuple[str, float]]:
        return []  # this command runs nothing for it

    def measure(self, ctx: Context) -> Measurement:
        rows = {arm: _read(ctx, f"intruders/{name}.json", self.command)
                for arm, name in (("treatment", self.treatment), ("baseline", self.baseline))}
        layers = {arm: r.get("intruders") for arm, r in rows.items()}
        if not all(isinstance(v, dict) and v for v in layers.values()):
            raise DataError("runs/intruders/*.json: no per-layer 'intruders' mapping")
        paths = sorted(set(layers["treatment"]) & set(layers["baseline"]))
        if not paths:
            raise DataError(f"runs/intruders/{self.treatment}.json and {self.baseline}.json share no layer")
        counts = {arm: [float(layers[arm][p]["intruders"]) for p in paths] for arm in layers}
        totals = {arm: int(sum(c)) for arm, c in counts.items()}
        sweep = {arm: _sweep_totals(layers[arm], paths) for arm in layers}
        return Measurement(
            treatment=self.labels[0], baseline=self.labels[1],
            replicates={arm: [float(np.mean(c))] for arm, c in counts.items()}, replicate_names=["seed 0"],
            examples={arm: [c] for arm, c in counts.items()}, example_unit="layer",
            details=[f"{self.labels[0]}: {totals['treatment']} intruders over {len(paths)} layers "
                     f"({sum(c > 0 for c in counts['treatment'])} layers with any); {self.labels[1]}: "
                     f"{totals['baseline']} ({sum(c > 0 for c in counts['baseline'])} layers with any)",
                     *([f"ε sweep (intruders summed over the layers): {lab} " + ", ".join(
                         f"ε {e} {n}" for e, n in sweep[arm].items())
                        for arm, lab in zip(("treatment", "baseline"), self.labels)] if sweep["treatment"] else []),
                     "test accuracy on the task: " + ", ".join(
                         f"{lab} {rows[arm].get('accuracy', float('nan')):.3f}"
                         for arm, lab in zip(("treatment", "baseline"), self.labels))],
            sources=[str(ctx.bench_dir / f"intruders/{n}.json") for n in (self.treatment, self.baseline)])


def _sweep_totals(layers: dict, paths: list[str]) -> dict[str, int]:
    """ε → intruders summed over `paths`, from each layer's "sweep" (empty when the file has none)."""
    keys = list(layers[paths[0]].get("sweep") or {})
    return {e: int(sum(layers[p].get("sweep", {}).get(e, 0) for p in paths)) for e in keys}


class BenchRows:
    """Two rows of a bench table with one accuracy per replicate (a task, or a task × target); replicates paired.

    `replicates`: (name, treatment files, baseline files, keys) — the value is the mean of `keys` (e.g.
    ("polarity", "accuracy")) over the files (several: samples of one generator, averaged) relative to runs/."""

    external = True

    def __init__(self, labels: tuple[str, str], replicates: list[tuple], unit: str, command: str, cost: str):
        self.labels, self.replicates, self.unit, self.command, self.cost = labels, replicates, unit, command, cost

    @classmethod
    def per_task(cls, folder: str, treatment: str, baseline: str, tasks: Sequence[str], labels: tuple[str, str],
                 command: str, cost: str) -> "BenchRows":
        """Files `<folder>/<row>.json` holding `{task: {"accuracy": ...}}`; the tasks are the replicates."""
        reps = [(t, [f"{folder}/{treatment}.json"], [f"{folder}/{baseline}.json"], (t, "accuracy")) for t in tasks]
        return cls(labels, reps, "task", command, cost)

    def units(self) -> list[tuple[str, float]]:
        return []  # this command runs nothing for it

    def measure(self, ctx: Context) -> Measurement:
        values = {"treatment": [], "baseline": []}
        sources = []
        for name, treat, base, keys in self.replicates:
            for arm, files in (("treatment", treat), ("baseline", base)):
                got = [_pick(_read(ctx, f, self.command), keys, f) for f in files]
                values[arm].append(float(np.mean(got)))
                sources += [str(ctx.bench_dir / f) for f in files if str(ctx.bench_dir / f) not in sources]
        names = [r[0] for r in self.replicates]
        return Measurement(
            treatment=self.labels[0], baseline=self.labels[1], replicates=values, replicate_names=names,
            unit=self.unit, sources=sources)


def transfer_files(family: str, rows: Sequence[str]) -> list[str]:
    """runs/transfer/generate/<family>/eval/<row>.json for each row."""
    return [f"transfer/generate/{family}/eval/{r}.json" for r in rows]
