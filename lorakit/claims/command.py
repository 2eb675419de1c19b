"""`python -m lorakit.claims` / `lorakit claims`: measure what is missing (or nothing, `--cached-only`) and rewrite
docs/claims.md; `--list` and `--dry-run` only print."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from ..errors import LorakitError, NotMeasuredError
from .records import Claim, Context, Measurement, load_measurement, measurement_path, save_measurement


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", default="", metavar="KEYS", help="run only these claims (comma-separated keys); the "
                   "page still shows every claim, from its cache")
    p.add_argument("--cached-only", action="store_true", help="run nothing: the page from the measurements cached so "
                   "far and the bench scripts' caches")
    p.add_argument("--list", action="store_true", help="print every claim's key, method and status, then stop")
    p.add_argument("--dry-run", action="store_true", help="print what would run and its estimated cost, then stop")
    p.add_argument("--out", default="docs/claims.md", help="the page to write (default: docs/claims.md)")
    p.add_argument("--runs-dir", default="runs/claims", help="measurements and training runs (default: runs/claims)")
    p.add_argument("--bench-dir", default="runs", help="where the bench scripts keep their caches (default: runs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def status_of(claim: Claim, ctx: Context) -> tuple[Optional[Measurement], str]:
    """(measurement or None, a status line), without running anything."""
    if claim.measure.external:
        try:
            return claim.measure.measure(ctx), "read from the bench cache"
        except NotMeasuredError as e:
            return None, str(e)
    m = load_measurement(ctx.runs_dir, claim.key)
    if m is not None:
        return m, f"measured ({measurement_path(ctx.runs_dir, claim.key)})"
    return None, f"To measure: `python -m lorakit.claims --only {claim.key}` (~{claim.minutes:.0f} min from nothing)."


def collect(claims: list[Claim], ctx: Context, run: set[str]) -> tuple[dict, dict, list[str]]:
    """Every claim's measurement (cached, read, or measured now when its key is in `run`), status, and errors."""
    from tqdm.auto import tqdm

    measured, status, errors = {}, {}, []
    bar = tqdm(claims, desc="claims", unit="claim", disable=not ctx.progress)
    for claim in bar:
        bar.set_postfix_str(claim.key)
        m, line = status_of(claim, ctx)
        if m is None and claim.key in run and not claim.measure.external:
            try:
                m = claim.measure.measure(ctx)
            except LorakitError as e:
                line = f"failed: {e}"
                errors.append(f"{claim.key}: {e}")
            else:
                line = f"measured ({save_measurement(ctx.runs_dir, claim.key, m)})"
        measured[claim.key], status[claim.key] = m, line
    return measured, status, errors


def plan(claims: list[Claim], ctx: Context, run: set[str]) -> str:
    """The dry run: per claim its status and cost, and the minutes of the runs still missing."""
    lines, missing = [], {}
    for c in claims:
        m, line = status_of(c, ctx)
        if c.measure.external:
            lines.append(f"{c.key:<16} bench  {line if m is None else 'present'} (cost: {c.measure.cost})")
            continue
        if m is None and c.key in run:
            missing.update((u, mins) for u, mins in c.measure.units() if not _unit_done(u, ctx))
        lines.append(f"{c.key:<16} {c.minutes:4.0f} min  {'measured' if m else 'to run' if c.key in run else line}")
    lines.append(f"to run now: about {sum(missing.values()):.0f} min ({len(missing)} runs or steps not on disk yet)")
    return "\n".join(lines)


def _unit_done(unit: str, ctx: Context) -> bool:
    """Whether a unit of work ("run <arm>-seed<s>", "squeeze <arm>-seed<s>") already has its results."""
    kind, _, name = unit.partition(" ")
    if kind == "run":
        return (ctx.runs_dir / "runs" / name / "results.json").is_file()
    if kind == "squeeze":
        arm, _, seed = name.rpartition("-")
        return any(ctx.runs_dir.joinpath("runs").glob(f"squeeze-{arm}-r*-{seed}/results.json"))
    return False


def run(args: argparse.Namespace) -> int:
    from .registry import CLAIMS, select
    from .table import render

    ctx = Context(args.runs_dir, args.bench_dir, progress=not args.no_progress)
    chosen = {c.key for c in select(args.only)} if args.only else {c.key for c in CLAIMS}
    to_run = set() if args.cached_only else chosen
    if args.list:
        for c in CLAIMS:
            m, line = status_of(c, ctx)
            print(f"{c.key:<16} {c.method:<28} {line}")
        return 0
    if args.dry_run:
        print(plan(CLAIMS, ctx, to_run))
        return 0
    measured, status, errors = collect(CLAIMS, ctx, to_run)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(CLAIMS, measured, status))
    print(f"wrote {out}: {sum(m is not None for m in measured.values())} of {len(CLAIMS)} claims measured")
    if errors:  # after the page is written: the other claims' results are kept
        raise LorakitError(f"{len(errors)} claim(s) failed (their rows say not run yet): " + "; ".join(errors))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lorakit.claims", description=__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except LorakitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
