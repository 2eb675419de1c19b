"""Read and write one adapter folder in PEFT's exact format.

Keys are `base_model.model.<module path>.<suffix>` with PEFT's suffixes (`lora_A.weight`,
`lora_B.weight`, `lora_embedding_A`, `lora_magnitude_vector`, full module tensors for
`modules_to_save`), and `base_model.<key>` for an adapter's model-wide tensors (e.g. `vera_A`).
A load validates the whole folder (JSON, safetensors, keys, shapes, dtypes,
finite values, targets) before the model is touched; on any error the model is unchanged.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import AdapterConfig
from ..errors import CorruptFileError, PickleRefusedError, StateDictError
from ..model import SHARED_KEY, adapter_parameters, attach, get_config, prepare
from ..variants import get_variant

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


def save_adapter(model: torch.nn.Module, directory: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter `name` to `directory` (created if needed); each file is written atomically."""
    return write_folder(directory, get_config(model, name), adapter_parameters(model, name))


def write_folder(directory: str | os.PathLike, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> Path:
    """Write `config` and `tensors` (keys as `adapter_parameters` gives them) as an adapter folder."""
    tensors = {_file_key(k): t.detach().contiguous().cpu() for k, t in tensors.items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(config.to_json() + "\n"))
    return directory


def _file_key(key: str) -> str:
    return key if key.startswith(SHARED_KEY) else PREFIX + key


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
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
    """Load one adapter folder as adapter `name`. Everything is checked before the model changes."""
    config, tensors = read_adapter(directory)
    prepared = prepare(model, config, name, initialize=False)
    expected = prepared.tensors()
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
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key].to(target.dtype))
    attach(model, prepared, trainable=trainable)
    return model


def _is_index(t: torch.Tensor) -> bool:
    return t.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _few(keys: list[str], k: int = 5) -> str:
    return "[]" if not keys else str(keys[:k]) + (f" and {len(keys) - k} more" if len(keys) > k else "")
