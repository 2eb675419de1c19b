"""docs/claims.md: the rule first, then one row per claim, then the notes per claim and the cost of each experiment."""
from __future__ import annotations

import datetime
from typing import Optional

from .records import ARMS, Assessment, Claim, Measurement, assess
from .runs import COMMON
from .stats import NOT_RUN, RULE, Interval

# the one timed run of the whole command from an empty runs/claims (update when the experiments change)
MEASURED_FROM_NOTHING = ("120 min on 2026-12-06 (`time python -m lorakit.claims` from an empty runs/claims, 2 CPU "
                         "cores, AMD EPYC Zen 4; the bench rows not included)")

HEADER = """# Paper claims, tested on our data

Regenerate: `python -m lorakit.claims` (or `lorakit claims`): it runs the experiments whose results are missing
(each writes `runs/claims/<claim>/measurement.json` and is skipped once that exists; training runs are shared between
claims and resume after an interruption) and rewrites this page. `--cached-only` rewrites the page from what is
measured, `--dry-run` prints what would run and its cost, `--only KEY` runs one claim. Rows marked *bench* read the
caches that another script writes under `runs/` (named in the row); this command never runs those scripts.

Scale: the papers test 100 M–70 B models on GLUE, commonsense or math benchmarks; we test each claim once, small,
on CPU: all-MiniLM-L6-v2 on VADER movie-review sentences ({train} training sentences, {test} test sentences,
batch {batch}, max length {length}, adapters on every linear layer) or SmolLM2-135M-Instruct on the VADER instruct
tasks. A claim that does not hold here may hold at the paper's scale; the verdict is about this setting only.

Generated {date}: {measured} of {total} claims measured ({holds} hold, {fails} do not hold, {inconclusive}
inconclusive).

## The rule

{rule}
"""


def fmt_value(claim: Claim, value: float) -> str:
    return f"{100 * value:.1f}" if claim.percent else f"{value:.4g}"


def fmt_diff(claim: Claim, value: float) -> str:
    return (f"{100 * value:+.1f}" if claim.percent else f"{value:+.3g}").replace("-", "−")


def fmt_interval(claim: Claim, iv: Optional[Interval], unit: str = "") -> str:
    if iv is None:
        return "—"
    points = " pts" if claim.percent else ""
    what = f"bootstrap, {iv.n:,} {plural(unit, iv.n)}" if iv.method == "bootstrap" else f"t, {iv.n} replicates"
    return (f"{fmt_diff(claim, iv.estimate)}{points} [{fmt_diff(claim, iv.low)}, {fmt_diff(claim, iv.high)}] "
            f"({what})")


def ours(claim: Claim, m: Measurement, a: Assessment) -> str:
    n = len(m.replicate_names)
    parts = []
    for arm in ARMS:
        mean, std = a.means[arm]
        shown = fmt_value(claim, a.values[arm]) if a.values and claim.rule == "bootstrap" else fmt_value(claim, mean)
        spread = f" ± {fmt_value(claim, std)}" if n > 1 else ""
        parts.append(f"{shown}{spread}")
    count = f"{n} {plural(m.unit, n)}"
    return f"{parts[0]} vs {parts[1]} ({count})"


def plural(unit: str, n: int) -> str:
    if n == 1:
        return unit
    return unit[:-1] + "ies" if unit.endswith("y") else unit + "s"


def cells(*texts: str) -> str:
    """One Markdown table row ("|" inside a cell escaped)."""
    return "| " + " | ".join(t.replace("|", "\\|") for t in texts) + " |"


def row(claim: Claim, m: Optional[Measurement], a: Assessment, external: bool) -> str:
    where = " *bench*" if external else ""
    if m is None:
        ours_cells = ["not run yet", "—", f"**{NOT_RUN}**"]
    else:
        ours_cells = [f"{m.treatment} vs {m.baseline}: {ours(claim, m, a)}",
                      fmt_interval(claim, a.interval, m.example_unit), f"**{a.verdict.word}**"]
    return cells(f"[{claim.method}](#{claim.key}){where}", claim.claim, claim.experiment, claim.metric, *ours_cells)


def _direction(claim: Claim) -> str:
    side = "higher" if claim.higher_is_better else "lower"
    below = "below" if claim.higher_is_better else "above"
    if claim.kind == "no_worse":
        return f"the treatment at most δ = {fmt_value(claim, claim.margin)} {below} the baseline"
    size = f" by at least {fmt_value(claim, claim.magnitude)}" if claim.magnitude is not None else ""
    return f"the treatment {side} than the baseline{size}"


def notes(claim: Claim, m: Optional[Measurement], a: Assessment, status: str) -> list[str]:
    rule = "paired bootstrap" if claim.rule == "bootstrap" else f"replicates (≥ 3 {plural(m.unit if m else 'seed', 3)})"
    lines = [f'### <a id="{claim.key}"></a>{claim.method} (`{claim.key}`)', "",
             f"- Paper: {claim.paper}.", f"- Claim: {claim.claim}", f"- Experiment: {claim.experiment}",
             f"- Metric: {claim.metric}; claimed: {_direction(claim)}; rule: {rule}."]
    if m is None:
        return lines + [f"- Not run yet. {status}", ""]
    per = " · ".join(f"{name}: {fmt_value(claim, t)} vs {fmt_value(claim, b)}" for name, t, b in
                     zip(m.replicate_names, m.replicates["treatment"], m.replicates["baseline"]))
    lines.append(f"- Per {m.unit} ({m.treatment} vs {m.baseline}): {per}.")
    lines.append(f"- Interval used: {fmt_interval(claim, a.interval, m.example_unit)}"
                 + (f"; the other interval: {fmt_interval(claim, a.other, m.example_unit)}" if a.other else "") + ".")
    lines.append(f"- Verdict: **{a.verdict.word}**" + (f" ({a.verdict.reason})." if a.verdict.reason else "."))
    lines += [f"- Condition: {c.text} — {'met' if c.passed else 'not met'}." for c in m.conditions]
    lines += [f"- {d}." for d in m.details]
    if m.sources:
        shown = ", ".join(f"`{s}`" for s in m.sources[:8]) + (f" and {len(m.sources) - 8} more" if len(m.sources) > 8
                                                              else "")
        lines.append(f"- From: {shown}.")
    return lines + [""]


def cost_table(claims: list[Claim], measured: dict[str, Optional[Measurement]]) -> list[str]:
    """Per claim the minutes from nothing (shared units counted at each claim that uses them) and the total with
    every unit once; bench rows name their script instead."""
    lines = ["## Cost from nothing (2 CPU cores)", "",
             "Estimates per claim; a training run shared by several claims is counted in each of them, and once in "
             "the total.", "", "| claim | what runs | estimate | status |", "|---|---|---|---|"]
    seen: dict[str, float] = {}
    for c in claims:
        state = "measured" if measured.get(c.key) is not None else NOT_RUN
        if c.measure.external:
            lines.append(cells(c.key, f"*bench*: `{c.measure.command}`", c.measure.cost, state))
            continue
        units = c.measure.units()
        seen.update(units)
        lines.append(cells(c.key, f"{len(units)} runs here", f"{c.minutes:.0f} min", state))
    lines += ["", f"All claims this command runs, from nothing: about **{sum(seen.values()):.0f} min** "
              f"({sum(seen.values()) / 60:.1f} h) for {len(seen)} distinct training runs and steps. Measured: "
              f"{MEASURED_FROM_NOTHING}.", ""]
    return lines


def render(claims: list[Claim], measured: dict[str, Optional[Measurement]], status: dict[str, str],
           date: Optional[str] = None) -> str:
    """The whole page."""
    assessed = {c.key: assess(c, measured.get(c.key)) for c in claims}
    words = [a.verdict.word for a in assessed.values()]
    head = HEADER.format(train=f"{COMMON['max_train_samples']:,}", test=f"{COMMON['max_eval_samples']:,}",
                         batch=COMMON["per_device_train_batch_size"], length=COMMON["max_length"],
                         date=date or datetime.date.today().isoformat(),
                         measured=sum(w != NOT_RUN for w in words), total=len(claims), holds=words.count("holds"),
                         fails=words.count("does not hold"), inconclusive=words.count("inconclusive"), rule=RULE)
    table = ["## Claims", "",
             "| method | paper's claim | our experiment | metric | ours: treatment vs baseline | difference [95 % "
             "interval] | verdict |", "|---|---|---|---|---|---|---|"]
    table += [row(c, measured.get(c.key), assessed[c.key], c.measure.external) for c in claims]
    body = ["", "## Notes per claim", ""]
    for c in claims:
        body += notes(c, measured.get(c.key), assessed[c.key], status[c.key])
    return head + "\n" + "\n".join(table + body + cost_table(claims, measured))
