"""Crash-safe checkpoints: each is written to a temporary folder and renamed into place in one step.

A folder `checkpoint-<step>` therefore exists only when complete; a run killed at any moment (SIGKILL
included) resumes from the newest one. Tensors go to safetensors; the optimizer state is read back with
`torch.load(weights_only=True)` (plain tensors and numbers, never arbitrary objects). `progress.json` records
each file's SHA-256, so a damaged or truncated file is an error on resume rather than a silently wrong run.

Under FSDP the files hold whole tensors, as a single process writes them: `trainable_state` and
`optimizer_state` gather the shards (every rank calls them; rank 0 writes), and `restore` splits them again.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import secrets
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import TrainingError
from .distributed import full_tensor, full_tensors, shard_like

PATTERN = re.compile(r"checkpoint-(\d+)")


def trained_parameters(model, optimizer) -> dict[str, torch.nn.Parameter]:
    """The model's parameters that `optimizer` updates, by name (also those a schedule has frozen since, such as
    LaMDA's B: what was trained must be restored)."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return {n: p for n, p in model.named_parameters() if id(p) in held}


def trainable_state(model, optimizer) -> dict[str, torch.Tensor]:
    """A copy of the trained tensors, whole (under FSDP a collective: every rank calls it)."""
    return {n: full_tensor(p.detach()).clone() for n, p in trained_parameters(model, optimizer).items()}


def optimizer_state(optimizer) -> dict:
    """`optimizer.state_dict()` with whole tensors (under FSDP a collective: every rank calls it)."""
    return full_tensors(optimizer.state_dict())


def _shard_optimizer_state(optimizer) -> None:
    """After loading whole tensors: split each state tensor shaped like its sharded parameter as the parameter is."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.dim() > 0:
                    state[key] = shard_like(value, p)


def load_trainable_state(model, optimizer, state: dict[str, torch.Tensor]) -> None:
    """Copy tensors into the trained parameters, after checking that names and shapes match exactly."""
    params = trained_parameters(model, optimizer)
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise TrainingError(f"checkpoint does not fit this model: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, t in state.items():
        if t.shape != params[name].shape:
            raise TrainingError(f"checkpoint tensor {name} has shape {tuple(t.shape)}, "
                                f"the model has {tuple(params[name].shape)}")
    with torch.no_grad():
        for name, t in state.items():
            params[name].copy_(shard_like(t, params[name]))


def save(directory: str | Path, trainable: dict[str, torch.Tensor], optimizer: dict, progress: dict,
         best: dict | None = None, keep: int = 1) -> Path:
    """Write `checkpoint-<step>` under `directory` atomically, then delete all but the newest `keep` checkpoints
    (0: keep every one; transformers' `save_total_limit`). `trainable` and `optimizer`: as `trainable_state` and
    `optimizer_state` give them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"checkpoint-{progress['step']}"
    tmp = directory / f".tmp-checkpoint-{progress['step']}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # (not mkdtemp: its mode 0700 would stay on the renamed checkpoint)
    try:
        save_file({k: v.contiguous() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        if best is not None:
            save_file({k: v.contiguous() for k, v in best.items()}, tmp / "best.safetensors")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():  # every visible device's generator (dropout masks on the GPU)
            rng.update({f"cuda:{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, tmp / "rng.safetensors")
        torch.save(optimizer, tmp / "optimizer.pt")
        digests = {f.name: _sha256(f) for f in sorted(tmp.iterdir())}
        progress = dict(progress, python_random=_plain(random.getstate()), sha256=digests)
        (tmp / "progress.json").write_text(json.dumps(progress, indent=1))
        for f in tmp.iterdir():
            _fsync(f)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        for old in checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest(directory: str | Path) -> Path | None:
    found = checkpoints(directory)
    return found[-1] if found else None


def checkpoints(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and PATTERN.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(PATTERN.fullmatch(p.name).group(1)))


def restore(path: str | Path, model, optimizer) -> tuple[dict, dict | None]:
    """Load a checkpoint into the model and optimizer and restore the RNG; returns (progress, best state)."""
    path = Path(path)
    try:
        progress = json.loads((path / "progress.json").read_text())
        digests = progress.pop("sha256")
        python_random = _tuples(progress.pop("python_random"))
        missing = [k for k in ("step", "best", "evals_without_gain") if k not in progress]
        if missing:
            raise ValueError(f"progress.json lacks {', '.join(missing)}")
        for name, digest in digests.items():  # a changed byte anywhere is caught before anything is loaded
            if _sha256(path / name) != digest:
                raise ValueError(f"{name} does not match the checksum written with it")
        trainable = load_file(path / "trainable.safetensors")
        best = load_file(path / "best.safetensors") if (path / "best.safetensors").exists() else None
        rng = load_file(path / "rng.safetensors")
        opt_state = torch.load(path / "optimizer.pt", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file means the same thing
        raise TrainingError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from None
    load_trainable_state(model, optimizer, trainable)
    try:
        optimizer.load_state_dict(opt_state)
    except (ValueError, KeyError) as e:
        raise TrainingError(f"checkpoint {path} optimizer state does not fit this optimizer: {e}") from None
    _shard_optimizer_state(optimizer)
    torch.set_rng_state(rng["torch"])
    cuda = [rng[f"cuda:{i}"] for i in range(torch.cuda.device_count()) if f"cuda:{i}" in rng]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(python_random)
    return progress, best


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain(state):
    return [_plain(s) for s in state] if isinstance(state, (tuple, list)) else state


def _tuples(state):
    return tuple(_tuples(s) for s in state) if isinstance(state, list) else state
