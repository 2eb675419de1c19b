#!/usr/bin/env bash
# One GPU, under 5 minutes: the device-generic unit tests, a 50-step bf16 LoRA run of a seeded random model with
# SmolLM2's config, DoRA and mixed-batch checks against PEFT, a short serving run; prints a summary table.
#
#   bench/gpu_check.sh prepare   # on a machine with PyPI: fills bench/gpu_bundle/ (< 64 MiB, git-ignored):
#                                # wheels for Python 3.12 (transformers, peft, ... — not torch), SmolLM2's config
#                                # and tokenizer (no weights), the VADER files
#   bench/gpu_check.sh           # on the GPU machine (no network): uses its torch (>= 2.11), installs the wheels
#                                # offline into bench/gpu_bundle/venv, runs bench/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=bench/gpu_bundle
PY=${PYTHON:-python3}

if [ "${1:-}" = prepare ]; then
    rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/wheels" "$BUNDLE/cache"
    # lorakit's dependencies and the test-only ones at the versions installed here, as wheels for CPython 3.12 on
    # x86-64 Linux; torch is the GPU machine's own (a CUDA torch is GBs) and numpy comes with it
    "$PY" - transformers safetensors tqdm PyYAML gguf peft pytest <<'PYEOF' > "$BUNDLE/requirements.txt"
import re, sys
from importlib.metadata import distribution
from packaging.requirements import Requirement
target = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython", "extra": ""}
skip = re.compile(r"^(torch|numpy|triton|nvidia-.*|setuptools|pip)$")
seen, todo = {}, list(sys.argv[1:])
while todo:
    dist = distribution(todo.pop())
    name = dist.metadata["Name"].lower().replace("_", "-")
    if name in seen or skip.match(name):
        continue
    seen[name] = dist.version
    for req in map(Requirement, dist.requires or ()):
        if req.marker is None or req.marker.evaluate(target):
            todo.append(req.name)
print("\n".join(f"{n}=={v}" for n, v in sorted(seen.items())))
PYEOF
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        -d "$BUNDLE/wheels" -r "$BUNDLE/requirements.txt"
    "$PY" - "$BUNDLE" <<'PYEOF'
import shutil, sys
from pathlib import Path
from lorakit.data import vader_files
from lorakit.models import smollm2_dir
bundle = Path(sys.argv[1])
shutil.copytree(vader_files(), bundle / "cache" / vader_files().name)
src, dst = Path(smollm2_dir()), bundle / "smollm2-config"
dst.mkdir()
for f in src.iterdir():
    if f.suffix != ".safetensors":
        shutil.copy(f, dst / f.name)
PYEOF
    du -sh "$BUNDLE"
    exit 0
fi

[ -d "$BUNDLE/wheels" ] || { echo "no $BUNDLE: run 'bench/gpu_check.sh prepare' where PyPI is reachable" >&2; exit 2; }
if [ ! -x "$BUNDLE/venv/bin/python" ]; then
    "$PY" -m venv --system-site-packages "$BUNDLE/venv"
    "$BUNDLE/venv/bin/python" -m pip install -q --no-index --find-links "$BUNDLE/wheels" --no-deps "$BUNDLE"/wheels/*.whl
fi
export LORAKIT_CACHE="$PWD/$BUNDLE/cache" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$BUNDLE/venv/bin/python" bench/gpu_check.py "$BUNDLE"
