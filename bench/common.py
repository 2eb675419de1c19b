"""Shared benchmark helpers: interleaved median timing, peak RSS, machine info, BENCHMARKS.md sections."""
from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Holder(nn.Module):
    """A module holding one layer as `lin`, since PEFT's `get_peft_model` needs a parent module to wrap."""

    def __init__(self, lin: nn.Module):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def load_average() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def compare(fns: dict[str, Callable[[], object]], warmup: int = 2, repeats: int = 7,
            min_seconds: float = 0.0) -> dict[str, float]:
    """Median wall time (s) of each function, run round-robin so load changes hit all of them alike.

    After `warmup` rounds, at least `repeats` rounds are timed, more (up to 500) when that is needed to
    spend `min_seconds` in total, so that millisecond-scale calls get enough samples. Callers choose
    grad mode (wrap inference in `torch.no_grad()`).
    """
    return {k: statistics.median(v) for k, v in timed_rounds(fns, warmup, repeats, min_seconds).items()}


def timed_rounds(fns: dict[str, Callable[[], object]], warmup: int = 2, repeats: int = 7,
                 min_seconds: float = 0.0) -> dict[str, list[float]]:
    """Every timed round's wall time (s) of each function (see `compare`); round i of each list ran together."""
    times = {k: [] for k in fns}

    def one_round(record: bool) -> float:
        total = 0.0
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            total += dt
            if record:
                times[k].append(dt)
        return total

    last = 0.0
    for _ in range(warmup):
        last = one_round(False)
    rounds = repeats if not min_seconds or not last else max(repeats, min(500, int(min_seconds / last) + 1))
    for _ in range(rounds):
        one_round(True)
    return times


def ratio_spread(num: list[float], den: list[float]) -> str:
    """Median and min–max of the per-round ratios num[i] / den[i] (paired rounds), as "1.23 (1.10–1.40)"."""
    ratios = [a / b for a, b in zip(num, den)]
    return f"{statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f})"


# ---- memory ----------------------------------------------------------------------------------
def rss_bytes() -> int:
    """Current resident set size (VmRSS) of this process."""
    return _status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size (VmHWM) since process start or the last `reset_peak_rss()`."""
    return _status_kb("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux `/proc/self/clear_refs` = 5); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_subprocess(args: list[str]) -> str:
    """Run `python <args>` with the same interpreter and return its stdout (raises on failure)."""
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        raise RuntimeError(f"subprocess {args} failed:\n{res.stdout}\n{res.stderr}")
    return res.stdout


# ---- reporting -------------------------------------------------------------------------------
def cpu_model() -> str:
    name, fam, model, flags = platform.processor() or "?", "?", "?", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        name = re.search(r"^model name\s*:\s*(.+)$", text, re.M).group(1).strip()
        fam = re.search(r"^cpu family\s*:\s*(\d+)$", text, re.M).group(1)
        model = re.search(r"^model\s*:\s*(\d+)$", text, re.M).group(1)
        flags = set(re.search(r"^flags\s*:\s*(.+)$", text, re.M).group(1).split())
    except (OSError, AttributeError):
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return f"{name} (family {fam} model {model}; {', '.join(isa) or 'no AVX2'})"


def machine_info() -> list[str]:
    from importlib.metadata import version  # (importing peft would import bitsandbytes, which looks up a Hub kernel)

    return [
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores, torch threads: {torch.get_num_threads()}",
        f"- torch {torch.__version__}, peft {version('peft')}, transformers {version('transformers')}, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}",
    ]


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


NOTES = "## Notes (written by hand"


def write_section(key: str, title: str, body: str) -> None:
    """Replace this script's section of BENCHMARKS.md (delimited by HTML comments), or add it before the notes."""
    start, end = f"<!-- bench:{key}:start -->", f"<!-- bench:{key}:end -->"
    section = f"{start}\n## {title}\n\n{body.strip()}\n{end}"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else (
        "# Benchmarks\n\nEach section is written by the script named in it (`.venv/bin/python bench/<name>.py`);"
        " re-running a script replaces only its own section.\n")
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    elif NOTES in text:  # a new section goes before the hand-written notes
        text = text.replace(NOTES, section + "\n\n" + NOTES, 1)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    BENCHMARKS.write_text(text)


def header_lines(load_before: str, extra: list[str] = ()) -> str:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return "\n".join([f"- Date: {now}", *machine_info(), f"- Load average (1/5/15 min) at start: {load_before}, "
                      f"at end: {load_average()} (the run itself keeps up to 2 threads busy)", *extra])


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}" if seconds < 1 else f"{seconds * 1e3:.0f}"
