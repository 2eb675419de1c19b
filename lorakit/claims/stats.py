"""The claims table's statistics: two 95 % intervals of a difference and the verdict rule (pure functions).

- `replicate_interval`: the t-interval of the mean paired difference over ≥ 3 replicates (training seeds, or the
  tasks of a merge); covers what varies between replicates.
- `paired_bootstrap`: the percentile interval of the difference over 2,000 paired resamples of the test examples
  (numpy PCG64, seed 0); an arm's per-example values are first averaged over its seeds (statistic "mean"), or the
  statistic (ECE) is computed per seed and averaged. Covers test-set sampling, not training randomness.
- `verdict`: holds / does not hold / inconclusive from an interval, the claimed direction, a claimed magnitude or
  a non-inferiority margin, and deterministic conditions (`RULE` states it in words).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..errors import StatisticsError

LEVEL = 0.95
RESAMPLES = 2000
BOOTSTRAP_SEED = 0
MIN_REPLICATES = 3
ECE_BINS = 10
HOLDS, FAILS, INCONCLUSIVE, NOT_RUN = "holds", "does not hold", "inconclusive", "not run yet"
KINDS = ("better", "no_worse")
STATISTICS = ("mean", "ece")

# Student's t, 97.5 % quantile, degrees of freedom 1..30 (scipy.stats.t.ppf(0.975, df), 9 decimals)
_T975 = (12.706204736, 4.302652730, 3.182446305, 2.776445105, 2.570581836, 2.446911851, 2.364624252, 2.306004135,
         2.262157163, 2.228138852, 2.200985160, 2.178812830, 2.160368656, 2.144786688, 2.131449546, 2.119905299,
         2.109815578, 2.100922040, 2.093024054, 2.085963447, 2.079613845, 2.073873068, 2.068657610, 2.063898562,
         2.059538553, 2.055529439, 2.051830516, 2.048407142, 2.045229642, 2.042272456)
_Z975 = 1.959963984540054

RULE = f"""\
Each row compares a **treatment** (the method) with a **baseline** on one metric, trained and scored identically
(same data, split, steps and test examples). d = treatment − baseline, oriented so that d > 0 is the direction the
paper claims (for a lower-is-better metric such as ECE or loss, d = baseline − treatment). The tables show the
plain difference treatment − baseline and its interval, so for a lower-is-better metric d is their negation. Each
claim names its interval in the registry before any number is seen:

1. **Replicates** (≥ {MIN_REPLICATES} paired replicates: training seeds, or the tasks of a merge): mean ± std per
   arm, and the {LEVEL:.0%} t-interval of the mean paired difference (n − 1 degrees of freedom). With fewer than
   {MIN_REPLICATES} replicates this rule refuses and the row is inconclusive.
2. **Paired bootstrap** over the test examples (or, for intruder counts, over the layers): {RESAMPLES:,} resamples
   with replacement (numpy PCG64, seed {BOOTSTRAP_SEED}), the same resample for both arms; the {LEVEL:.0%}
   percentile interval of the difference. An arm's per-example scores are first averaged over its seeds (for ECE
   the metric is computed per seed on the resample and averaged). This interval covers test-set sampling, not
   training randomness: the per-seed numbers and, with ≥ {MIN_REPLICATES} seeds, the seed t-interval are shown
   beside it.

Verdict, from the chosen interval [lo, hi] of the oriented d and its estimate d̂:
- **"better" claims** (threshold θ = 0; m = the claimed gain, when the paper states one that transfers):
  **holds** when lo > 0 and d̂ ≥ m; **does not hold** when hi ≤ 0 (no gain: the interval lies at or below zero)
  or hi < m (the claimed size is ruled out); otherwise **inconclusive**.
- **"no worse" claims** ("matches X with fewer parameters", margin δ > 0 in the metric's units): **holds** when
  lo > −δ; **does not hold** when hi ≤ −δ; otherwise **inconclusive**.
- A claim may also state exact conditions (e.g. "≤ 10 % of LoRA's parameters"): a failed condition makes the
  verdict **does not hold** whatever the interval; "holds" needs every condition met.
- A row with no measurement says **not run yet**; no number is ever filled in by hand."""


@dataclass(frozen=True)
class Interval:
    """A difference d (treatment − baseline, in the metric's own direction) with its 95 % interval."""

    estimate: float
    low: float
    high: float
    method: str  # "t" | "bootstrap"
    n: int       # replicates, or examples

    def oriented(self, higher_is_better: bool) -> "Interval":
        """The same interval with d > 0 meaning better (negated for a lower-is-better metric)."""
        if higher_is_better:
            return self
        return Interval(-self.estimate, -self.high, -self.low, self.method, self.n)


@dataclass(frozen=True)
class Verdict:
    word: str  # HOLDS | FAILS | INCONCLUSIVE | NOT_RUN
    reason: str = ""


@dataclass(frozen=True)
class Condition:
    """An exact check the claim makes beside the measured difference (e.g. a parameter ratio)."""

    text: str
    passed: bool
    extra: dict = field(default_factory=dict, compare=False)


def t_quantile(df: int) -> float:
    """Student's t 97.5 % quantile (two-sided 95 %): a table up to 30 degrees of freedom, then the Cornish-Fisher
    expansion (error < 1e-5)."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise StatisticsError(f"degrees of freedom must be an integer ≥ 1, got {df!r}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3


def _finite(values, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise StatisticsError(f"{what} is empty")
    if not np.isfinite(array).all():
        raise StatisticsError(f"{what} holds a non-finite value")
    return array


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    array = _finite(values, "values")
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def replicate_interval(treatment: Sequence[float], baseline: Sequence[float]) -> Interval:
    """95 % t-interval of mean(treatment_i − baseline_i) over paired replicates (needs ≥ 3 pairs)."""
    t, b = _finite(treatment, "treatment replicates"), _finite(baseline, "baseline replicates")
    if t.shape != b.shape or t.ndim != 1:
        raise StatisticsError(f"replicates must be paired one to one, got {t.shape} and {b.shape} values")
    if len(t) < MIN_REPLICATES:
        raise StatisticsError(f"the replicate rule needs ≥ {MIN_REPLICATES} paired replicates, got {len(t)}")
    d = t - b
    half = t_quantile(len(d) - 1) * float(d.std(ddof=1)) / math.sqrt(len(d))
    mean = float(d.mean())
    return Interval(mean, mean - half, mean + half, "t", len(d))


def ece(confidence, hit, bins: int = ECE_BINS) -> float:
    """Expected calibration error from max-softmax confidences and 0/1 hits, with the bins of
    `lorakit.analysis.calibration.ece` (bin i holds (i/M, (i+1)/M]; 0 goes to the first bin, 1 to the last)."""
    conf, hits = _finite(confidence, "confidences"), _finite(hit, "hits")
    return float(_ece_rows(conf[None], hits[None], bins)[0])


def _ece_rows(conf: np.ndarray, hit: np.ndarray, bins: int) -> np.ndarray:
    """ECE of each row of (R, n) confidences and hits: Σ_b |Σ hit − Σ conf| / n."""
    edges = np.arange(bins + 1, dtype=np.float64) / bins
    index = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    rows = np.arange(conf.shape[0])[:, None] * bins + index
    size = conf.shape[0] * bins
    gap = np.bincount(rows.ravel(), hit.ravel(), size) - np.bincount(rows.ravel(), conf.ravel(), size)
    return np.abs(gap.reshape(conf.shape[0], bins)).sum(1) / conf.shape[1]


def _per_seed(values, what: str, statistic: str) -> np.ndarray:
    """(seeds, n) scores for "mean", (seeds, n, 2) [confidence, hit] pairs for "ece"."""
    array = _finite(values, what)
    want = 3 if statistic == "ece" else 2
    if array.ndim != want or (statistic == "ece" and array.shape[2] != 2):
        shape = "(seeds, examples, 2) [confidence, hit]" if statistic == "ece" else "(seeds, examples)"
        raise StatisticsError(f"{what} must have the shape {shape}, got {array.shape}")
    return array


def statistic_value(values, statistic: str = "mean") -> float:
    """The metric of one arm on all its examples: the mean over seeds of the per-seed mean (or ECE)."""
    array = _per_seed(values, "values", _check_statistic(statistic))
    if statistic == "mean":
        return float(array.mean())
    return float(np.mean([ece(s[:, 0], s[:, 1]) for s in array]))


def _check_statistic(statistic: str) -> str:
    if statistic not in STATISTICS:
        raise StatisticsError(f"statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")
    return statistic


def paired_bootstrap(treatment, baseline, statistic: str = "mean", resamples: int = RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> Interval:
    """95 % percentile interval of statistic(treatment) − statistic(baseline) over paired resamples of the examples.

    `treatment`, `baseline`: per seed, the per-example values on the same examples in the same order — shape
    (seeds, n) of scores for "mean", (seeds, n, 2) of [confidence, hit] for "ece"; the arms may differ in seeds.
    """
    _check_statistic(statistic)
    t, b = _per_seed(treatment, "treatment", statistic), _per_seed(baseline, "baseline", statistic)
    if t.shape[1] != b.shape[1]:
        raise StatisticsError(f"the arms must be scored on the same examples, got {t.shape[1]} and {b.shape[1]}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 100:
        raise StatisticsError(f"resamples must be an integer ≥ 100, got {resamples!r}")
    n = t.shape[1]
    index = np.random.Generator(np.random.PCG64(seed)).integers(0, n, size=(resamples, n))
    if statistic == "mean":
        d = t.mean(0) - b.mean(0)
        estimate, draws = float(d.mean()), d[index].mean(1)
    else:
        estimate = statistic_value(t, "ece") - statistic_value(b, "ece")
        draws = (np.mean([_ece_rows(s[index, 0], s[index, 1], ECE_BINS) for s in t], 0)
                 - np.mean([_ece_rows(s[index, 0], s[index, 1], ECE_BINS) for s in b], 0))
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Interval(estimate, float(low), float(high), "bootstrap", n)


def verdict(interval: Optional[Interval], higher_is_better: bool = True, kind: str = "better", margin: float = 0.0,
            magnitude: Optional[float] = None, conditions: Sequence[Condition] = ()) -> Verdict:
    """The rule of `RULE`: `interval` in the metric's units (treatment − baseline); `margin` (δ > 0) for "no_worse"
    claims; `magnitude` (m ≥ 0, in the metric's units, oriented) for "better" claims. None: inconclusive."""
    if kind not in KINDS:
        raise StatisticsError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "no_worse" and not margin > 0:
        raise StatisticsError(f"a no_worse claim needs a margin > 0, got {margin!r}")
    if kind == "better" and magnitude is not None and magnitude < 0:
        raise StatisticsError(f"a claimed magnitude is a gain ≥ 0 in the claimed direction, got {magnitude!r}")
    failed = [c.text for c in conditions if not c.passed]
    if failed:
        return Verdict(FAILS, "condition not met: " + "; ".join(failed))
    if interval is None:
        return Verdict(INCONCLUSIVE, "no interval (too few replicates for the rule)")
    found = _oriented_verdict(interval.oriented(higher_is_better), kind, margin, magnitude)
    return found if higher_is_better else Verdict(found.word, found.reason + "; d = baseline − treatment, as "
                                                  "lower is better")


def _oriented_verdict(g: Interval, kind: str, margin: float, magnitude: Optional[float]) -> Verdict:
    if kind == "no_worse":
        if g.low > -margin:
            return Verdict(HOLDS, f"the whole interval is above −δ = −{margin:g}")
        if g.high <= -margin:
            return Verdict(FAILS, f"the whole interval is at or below −δ = −{margin:g}")
        return Verdict(INCONCLUSIVE, f"the interval contains −δ = −{margin:g}")
    m = 0.0 if magnitude is None else magnitude
    if g.high <= 0:
        return Verdict(FAILS, "the whole interval is at or below zero")
    if magnitude is not None and g.high < m:
        return Verdict(FAILS, f"the interval excludes the claimed gain {m:g}")
    if g.low > 0 and g.estimate >= m:
        return Verdict(HOLDS, "the whole interval is above zero" + (f" and d̂ ≥ {m:g}" if magnitude else ""))
    if g.low > 0:
        return Verdict(INCONCLUSIVE, f"a gain, but d̂ is below the claimed {m:g}")
    return Verdict(INCONCLUSIVE, "the interval contains zero")
