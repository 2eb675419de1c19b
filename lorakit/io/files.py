"""Read and write one adapter folder in PEFT's exact format.

Keys are `base_model.model.<module path>.<suffix>` with PEFT's suffixes (`lora_A.weight`,
`lora_B.weight`, `lora_embedding_A`, `lora_magnitude_vector`, full module tensors for
`modules_to_save`), and `base_model.<key>` for an adapter's model-wide tensors (e.g. `vera_A`).
A load validates the whole folder (JSON, safetensors, keys, shapes, dtypes,
finite values, targets) before the model is touched; on any error the model is unchanged.
A classifier's label names (`id2label`) ride in the safetensors header metadata (`lorakit_id2label`), which PEFT
ignores. Files get the modes the process umask gives (0644 / 0755 usually), as PEFT's.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..config import AdapterConfig
from ..errors import CorruptFileError, PickleRefusedError, StateDictError
from ..model import SHARED_KEY, _book, adapter_names, adapter_parameters, attach, get_config, prepare
from ..variants import get_variant

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
LABELS_KEY = "lorakit_id2label"


def save_adapter(model: torch.nn.Module, directory: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter `name` to `directory` (created if needed); each file is written atomically. The config records
    the base's `base_model_name_or_path` and `task_type` when the adapter's own config leaves them unset and the
    model knows them (a transformers model), and a classifier's label names."""
    from ..hf import labels, metadata

    config = get_config(model, name)
    known = {k: v for k, v in metadata(model).items() if getattr(config, k) is None}
    if known:
        config = dataclasses.replace(config, **known)
    return write_folder(directory, config, adapter_parameters(model, name), id2label=labels(model))


def write_folder(directory: str | os.PathLike, config: AdapterConfig, tensors: dict[str, torch.Tensor],
                 id2label: Optional[dict[int, str]] = None) -> Path:
    """Write `config` and `tensors` (keys as `adapter_parameters` gives them) as an adapter folder."""
    tensors = {_file_key(k): t.detach().contiguous().cpu() for k, t in tensors.items()}
    header = {"format": "pt"}
    if id2label:
        header[LABELS_KEY] = json.dumps({str(k): v for k, v in sorted(id2label.items())})
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata=header))
    _atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(config.to_json() + "\n"))
    return directory


def read_labels(directory: str | os.PathLike) -> Optional[dict[int, str]]:
    """The label names a classifier adapter was saved with ({id: name}), or None."""
    try:
        with safe_open(Path(directory) / WEIGHTS_NAME, "pt") as f:
            text = (f.metadata() or {}).get(LABELS_KEY)
    except (SafetensorError, OSError) as e:
        raise CorruptFileError(f"{Path(directory) / WEIGHTS_NAME} is not a readable safetensors file: {e}") from None
    if text is None:
        return None
    try:
        return {int(k): str(v) for k, v in json.loads(text).items()}
    except (ValueError, AttributeError) as e:
        raise CorruptFileError(f"{directory}: label names in the weights header are not valid: {e}") from None


def file_mode() -> int:
    """The mode new files get under the process umask (0o644 for the usual 022)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode new folders get under the process umask (0o755 for the usual 022)."""
    return 0o777 & ~_umask()


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask sets it, racing other threads)
        with open("/proc/self/status") as status:
            return int(next(line.split()[1] for line in status if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0)
        os.umask(umask)
        return umask


def _file_key(key: str) -> str:
    return key if key.startswith(SHARED_KEY) else PREFIX + key


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())  # mkstemp's 0600 would stay on the renamed file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_adapter(directory: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Parse and check an adapter folder on its own: (config, tensors with the `base_model.model.` prefix off)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CorruptFileError(f"adapter folder {str(directory)!r} does not exist")
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.is_file():
        raise CorruptFileError(f"{config_path} is missing")
    try:
        data = json.loads(config_path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise CorruptFileError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CorruptFileError(f"{config_path} must hold a JSON object, found {type(data).__name__}")
    config = AdapterConfig.from_dict(data)
    if not weights_path.is_file():
        if (directory / PICKLE_NAME).is_file():
            raise PickleRefusedError(f"{directory} has only {PICKLE_NAME}, a pickle; lorakit never unpickles. "
                                     f"Convert it to {WEIGHTS_NAME} in a trusted environment first")
        raise CorruptFileError(f"{weights_path} is missing")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptFileError(f"{weights_path} is not a readable safetensors file: {e}") from None
    layer_keys = [k for k in tensors if not k.startswith(SHARED_KEY) or k.startswith(PREFIX)]
    prefixed = [k.startswith(PREFIX) for k in layer_keys]
    if any(prefixed) and not all(prefixed):
        raise StateDictError(f"{weights_path}: keys mix {PREFIX!r}-prefixed and unprefixed names")
    tensors = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in tensors.items()}
    tensors = get_variant(config.variant).canonical_file_tensors(config, tensors)
    for key, t in tensors.items():
        if not (t.is_floating_point() or _is_index(t)):
            raise StateDictError(f"{weights_path}: tensor {key!r} has dtype {t.dtype}, expected floating point "
                                 f"(or integer indices)")
        if t.is_floating_point() and not torch.isfinite(t if t.element_size() > 1 else t.float()).all():
            raise StateDictError(f"{weights_path}: tensor {key!r} has non-finite values (NaN or Inf)")
    return config, tensors


def load_adapter(model: torch.nn.Module, directory: str | os.PathLike, name: str = "default",
                 trainable: bool = False) -> torch.nn.Module:
    """Load one adapter folder as adapter `name`. Everything is checked before the model changes.

    Onto an existing adapter `name` (hot swap, e.g. another checkpoint of the same run): its weights are replaced in
    place when the file has the same variant, options, targets, shapes and per-layer scales; otherwise a
    StateDictError says what differs and the model keeps the old weights. `trainable` is then left as it was."""
    config, tensors = read_adapter(directory)
    if name in adapter_names(model):
        return _swap_weights(model, directory, name, config, tensors)
    prepared = prepare(model, config, name, initialize=False)
    expected = prepared.tensors()
    _check_fits(tensors, expected, directory, config)
    _copy(tensors, expected)
    attach(model, prepared, trainable=trainable)
    return model


# fields whose difference changes what the adapter computes beyond its tensors (shapes are checked separately)
SWAP_FIELDS = ("variant", "options", "lora_dropout", "use_rslora", "bias")


def _swap_weights(model, directory, name: str, config: AdapterConfig, tensors: dict) -> torch.nn.Module:
    current = get_config(model, name)
    where = Path(directory)
    differ = [f for f in SWAP_FIELDS if getattr(config, f) != getattr(current, f)]
    if differ:
        raise StateDictError(f"{where} cannot replace adapter {name!r} in place: "
                             + ", ".join(f"{f} {getattr(config, f)!r} (loaded: {getattr(current, f)!r})"
                                         for f in differ) + "; delete_adapter first, or load under another name")
    expected = adapter_parameters(model, name)
    try:
        _check_fits(tensors, expected, directory, config)
    except StateDictError as e:
        raise StateDictError(f"cannot replace adapter {name!r} in place: {e}") from None
    scales = {p: (v.scale, config.scale_for(p)) for p, v in _variants(model, name).items()}
    moved = sorted(p for p, (old, new) in scales.items() if abs(old - new) > 1e-12 * max(1.0, abs(old)))
    if moved:
        raise StateDictError(f"{where} cannot replace adapter {name!r} in place: its scale (lora_alpha / r) differs on "
                             f"{_few(moved)}; delete_adapter first, or load under another name")
    _copy(tensors, expected)
    _book(model).configs[name] = dataclasses.replace(config, target_modules=current.target_modules)
    return model


def _variants(model, name: str) -> dict:
    from ..layers import AdaptedLayer

    return {p: m.adapters[name] for p, m in model.named_modules() if isinstance(m, AdaptedLayer) and name in m.adapters}


def _check_fits(tensors: dict, expected: dict, directory, config: AdapterConfig) -> None:
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    where = Path(directory) / WEIGHTS_NAME
    if missing or extra:
        raise StateDictError(f"{where} does not fit this model and config: missing keys {_few(missing)}, "
                             f"unexpected keys {_few(extra)}")
    for key, target in expected.items():
        if tensors[key].is_floating_point() != target.is_floating_point():
            raise StateDictError(f"{where}: {key!r} has dtype {tensors[key].dtype}, the model needs {target.dtype}")
        if tuple(tensors[key].shape) != tuple(target.shape):
            raise StateDictError(f"{where}: {key!r} has shape {tuple(tensors[key].shape)}, the model needs "
                                 f"{tuple(target.shape)} (r={config.rank_for(key.rsplit('.', 2)[0])})")


def _copy(tensors: dict, expected: dict) -> None:
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key].to(target.dtype))


def _is_index(t: torch.Tensor) -> bool:
    return t.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _few(keys: list[str], k: int = 5) -> str:
    return "[]" if not keys else str(keys[:k]) + (f" and {len(keys) - k} more" if len(keys) > k else "")
