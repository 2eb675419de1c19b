"""Adapters of a served model: disk → RAM (LRU, bounded in bytes and count, loaded on worker threads) → a step.

`inspect_adapter` checks a PEFT LoRA folder against the model from its config and the safetensors header only
(no tensor is read), so registering 1000 adapters is cheap. `load_adapter_weights` reads and fully validates one
(finite values, shapes) and lays it out for the step kernels: per layer and fused projection group, the A
factors concatenated (one shrink GEMM for q, k and v together) and each module's (s·B)ᵀ.

`AdapterPool` keeps loaded adapters in RAM under the engine's memory budget. A pinned adapter (one that an
admitted request uses) is never evicted; an unregistered one disappears once its last request finishes.
"""
from __future__ import annotations

import json
import re
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import AdapterConfig
from ..errors import AdapterFileError, AdapterNameError, ConfigError, CorruptFileError, StateDictError, \
    UnknownAdapterError
from .llama import Dims
from .merged import MERGED_NAME_RE  # merge:a=0.7,b=0.3, the name the server gives a weighted merge of adapters
from .personal import PERSONAL_NAME_RE  # user:<bank>:<hash>, the name of a RecLoRA bank's adapter for one user

GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}
GROUP_OF = {m: g for g, ms in GROUPS.items() for m in ms}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class AdapterSpec:
    """A registered adapter: where it is, its per-module ranks and scales, and its size once loaded."""

    name: str
    path: str
    ranks: dict[tuple[int, str], int]     # (layer, module) → rank
    scales: dict[tuple[int, str], float]
    nbytes: int

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values())


@dataclass
class GroupWeights:
    """One adapter's factors for one fused projection group of one layer.

    `at`: the group's A factors stacked and transposed, (in, Σr) zero-padded to the fused kernels' rank multiple
    (`lorakit.kernels.down_factor`): the one copy of A that a loaded adapter holds, so the pool's byte count is
    what it keeps. `parts`: per module (rank offset r0, r1, output columns c0, c1 of the fused output, (s·B)ᵀ of
    shape (r, out))."""

    at: torch.Tensor
    parts: list[tuple[int, int, int, int, torch.Tensor]]
    _casts: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, a: torch.Tensor, parts: list) -> "GroupWeights":
        """From the stacked A factors (Σr, in)."""
        from ..kernels import down_factor

        return cls(down_factor(a).to(a.dtype), parts)

    @property
    def a(self) -> torch.Tensor:
        """The stacked A factors (Σr, in): a view of `at`."""
        return self.at[:, :self.parts[-1][1]].T

    def cast(self, dtype: torch.dtype) -> "GroupWeights":
        """These factors in `dtype` (itself when it already is; other dtypes made once and kept)."""
        if self.at.dtype == dtype:
            return self
        if dtype not in self._casts:
            self._casts[dtype] = GroupWeights(self.at.to(dtype), [(*p[:4], p[4].to(dtype)) for p in self.parts])
        return self._casts[dtype]

    def fused(self, pairs: bool = False) -> tuple[torch.Tensor, list[tuple[int, int, int, torch.Tensor]]]:
        """These factors as the fused kernels take them (`lorakit.kernels`; `pairs`: their bf16 layout, a copy made
        once and kept): Aᵀ (in, Σr padded) and per module (columns c0, c1, rank offset r0, (s·B)ᵀ)."""
        if not pairs:
            return self.at, [(c0, c1, r0, bt) for r0, _, c0, c1, bt in self.parts]
        if "fused-pairs" not in self._casts:
            from ..kernels import down_factor, up_factor

            self._casts["fused-pairs"] = (down_factor(self.a, True), [(c0, c1, r0, up_factor(bt.T, 1.0, True))
                                                                      for r0, _, c0, c1, bt in self.parts])
        return self._casts["fused-pairs"]

    @property
    def key(self) -> tuple:
        """Adapters with equal keys stack into one bmm."""
        return tuple((r0, r1, c0, c1) for r0, r1, c0, c1, _ in self.parts)


@dataclass
class LoadedAdapter:
    spec: AdapterSpec
    groups: dict[tuple[int, str], GroupWeights]
    nbytes: int

    @property
    def name(self) -> str:
        return self.spec.name


def module_path(layer: int, module: str) -> str:
    """The transformers module path of a projection, as PEFT's keys and patterns name it."""
    return f"model.layers.{layer}.{'self_attn' if GROUP_OF[module] in ('qkv', 'o') else 'mlp'}.{module}"


def check_name(name) -> str:
    """`name` if it is a valid adapter name (or a derived merged-adapter / per-user name)."""
    if not isinstance(name, str) or not (NAME_RE.match(name) or MERGED_NAME_RE.match(name)
                                         or PERSONAL_NAME_RE.match(name)):
        raise AdapterNameError(f"adapter name {name!r} is invalid: use 1-128 letters, digits, '.', '_' or '-', "
                               f"starting with a letter or digit")
    return name


def inspect_adapter(name: str, path, dims: Dims, max_lora_rank: int, itemsize: int = 4) -> AdapterSpec:
    """Check a PEFT LoRA folder against the model from its config and tensor header (reads no tensor data).

    `itemsize`: bytes per element once loaded (the serving dtype's), for the spec's `nbytes`."""
    from safetensors import SafetensorError, safe_open

    folder = Path(path)
    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not folder.is_dir():
        raise CorruptFileError(f"adapter {name!r}: folder {str(folder)!r} does not exist")
    if not weights_path.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        raise (AdapterFileError if pickled else CorruptFileError)(
            f"adapter {name!r}: {weights_path} is missing" + (" (adapter_model.bin is a pickle, never read)" if pickled else ""))
    try:
        config = AdapterConfig.from_dict(json.loads(config_path.read_bytes().decode("utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, AttributeError) as e:
        raise CorruptFileError(f"adapter {name!r}: {config_path} is not a readable adapter config: {e}") from None
    if config.variant != "lora":
        raise ConfigError(f"adapter {name!r}: variant {config.variant!r} is not served; export it as a plain LoRA "
                          f"first (lorakit.export_lora)")
    if config.modules_to_save:
        raise ConfigError(f"adapter {name!r}: modules_to_save {config.modules_to_save} cannot be served per request")
    try:
        with safe_open(str(weights_path), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptFileError(f"adapter {name!r}: {weights_path} is not a readable safetensors file: {e}") from None
    factors: dict[tuple[int, str], dict[str, tuple]] = {}
    for key, shape in shapes.items():
        m = _KEY_RE.match(key)
        if m is None or int(m[1]) >= dims.layers or m[2] not in GROUP_OF:
            raise StateDictError(f"adapter {name!r}: tensor {key!r} is not a LoRA factor of a projection of this "
                                 f"{dims.layers}-layer model")
        factors.setdefault((int(m[1]), m[2]), {})[m[3]] = shape
    if not factors:
        raise StateDictError(f"adapter {name!r}: {weights_path} holds no LoRA factors")
    ranks, scales = {}, {}
    for (layer, module), pair in sorted(factors.items()):
        where = f"adapter {name!r}, layer {layer} {module}"
        if set(pair) != {"A", "B"}:
            raise StateDictError(f"{where}: has lora_{'/'.join(pair)} but needs both lora_A and lora_B")
        fan_in, fan_out = dims.projection_shape(module)
        r = pair["A"][0] if len(pair["A"]) == 2 else -1
        if pair["A"] != (r, fan_in) or pair["B"] != (fan_out, r):
            raise StateDictError(f"{where}: lora_A {pair['A']} and lora_B {pair['B']} do not fit a ({fan_out}, "
                                 f"{fan_in}) projection (expected (r, {fan_in}) and ({fan_out}, r))")
        path_ = module_path(layer, module)
        if config.rank_for(path_) != r:
            raise StateDictError(f"{where}: the config says rank {config.rank_for(path_)}, the tensors have {r}")
        if r > max_lora_rank:
            raise ConfigError(f"LoRA rank {r} of adapter {name!r} ({module}, layer {layer}) is greater than "
                              f"max_lora_rank {max_lora_rank}")
        ranks[layer, module], scales[layer, module] = r, config.scale_for(path_)
    return AdapterSpec(name, str(folder), ranks, scales, loaded_bytes(ranks, dims, itemsize))


def loaded_bytes(ranks: dict[tuple[int, str], int], dims: Dims, itemsize: int) -> int:
    """The bytes `load_adapter_weights` will hold for these ranks: per layer and group, Aᵀ with its ranks padded to
    the kernels' multiple, and each module's (s·B)ᵀ."""
    from ..kernels import RANK_MULTIPLE

    group_ranks: dict[tuple[int, str], int] = {}
    elements = 0
    for (layer, module), r in ranks.items():
        key = layer, GROUP_OF[module]
        group_ranks[key] = group_ranks.get(key, 0) + r
        elements += r * dims.projection_shape(module)[1]
    for (_, group), r in group_ranks.items():
        elements += -(-r // RANK_MULTIPLE) * RANK_MULTIPLE * dims.projection_shape(GROUPS[group][0])[0]
    return itemsize * elements


def load_adapter_weights(spec: AdapterSpec, dims: Dims, dtype: torch.dtype = torch.float32) -> LoadedAdapter:
    """Read and validate the tensors of a registered adapter and lay them out per fused group, in `dtype`.

    The scale is folded into B in fp32; the factors are cast to `dtype` after that."""
    from ..io.files import read_adapter

    _, tensors = read_adapter(spec.path)
    groups = {}
    for layer in range(dims.layers):
        for group, modules in GROUPS.items():
            present = [m for m in modules if (layer, m) in spec.ranks]
            if not present:
                continue
            a_parts, parts, r0, c0 = [], [], 0, 0
            for m in modules:
                width = dims.projection_shape(m)[1]
                if m in present:
                    prefix = module_path(layer, m)
                    a, b = tensors.get(prefix + ".lora_A.weight"), tensors.get(prefix + ".lora_B.weight")
                    if a is None or b is None or a.shape[0] != spec.ranks[layer, m]:
                        raise StateDictError(f"adapter {spec.name!r}: {prefix} changed on disk since it was registered")
                    r = a.shape[0]
                    a_parts.append(a.float())
                    bt = (b.float() * spec.scales[layer, m]).T.to(dtype).contiguous()
                    parts.append((r0, r0 + r, c0, c0 + width, bt))
                    r0 += r
                c0 += width
            groups[layer, group] = GroupWeights.of(torch.cat(a_parts).to(dtype), parts)
    nbytes = sum(g.at.nbytes + sum(p[4].nbytes for p in g.parts) for g in groups.values())
    return LoadedAdapter(spec, groups, nbytes)


@dataclass
class _Entry:
    spec: AdapterSpec
    loaded: LoadedAdapter | None = None
    future: Future | None = None
    error: str | None = None
    pins: int = 0
    retired: bool = False  # unregistered while pinned: dropped when the last pin goes
    load_ms: float | None = None
    started: float = field(default=0.0)


class AdapterPool:
    """Registered adapters and the loaded ones in RAM (LRU), under a byte budget shared with the KV cache.

    `free_bytes()` is asked for the room left in the shared budget (the engine's budget minus KV in use); a
    load starts only when its bytes fit after evicting idle adapters, and is counted from then on.
    """

    def __init__(self, dims: Dims, max_lora_rank: int, max_cpu_loras: int | None, free_bytes, workers: int = 2,
                 dtype: torch.dtype = torch.float32):
        self.dims, self.max_lora_rank, self.max_cpu_loras = dims, max_lora_rank, max_cpu_loras
        self.dtype = dtype
        self._free_bytes = free_bytes
        self._entries: dict[str, _Entry] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()  # loaded or loading, least recently used first
        self._retired: list[_Entry] = []
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lorakit-adapter-load") \
            if workers else None  # 0: load on the caller's thread (deterministic schedules for tests, benchmarks)
        self.hits = self.misses = self.evictions = 0
        self.load_ms: list[float] = []

    # ---- registry ------------------------------------------------------------------------------------------
    def register(self, name: str, path) -> AdapterSpec:
        check_name(name)
        if name in self._entries:
            raise AdapterNameError(f"adapter {name!r} is already registered (unload it first)")
        if any(e.spec.name == name for e in self._retired):
            raise AdapterNameError(f"adapter {name!r} was unloaded but requests still use it; retry shortly")
        spec = inspect_adapter(name, path, self.dims, self.max_lora_rank, self.dtype.itemsize)
        self._entries[name] = _Entry(spec)
        return spec

    def unregister(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        if entry is None:
            raise UnknownAdapterError(f"adapter {name!r} is not registered")
        self._lru.pop(name, None)
        if entry.pins:
            entry.retired = True
            self._retired.append(entry)
        elif entry.future is not None:
            entry.future.cancel()

    def specs(self) -> dict[str, AdapterSpec]:
        return {n: e.spec for n, e in self._entries.items()}

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    # ---- residency -----------------------------------------------------------------------------------------
    def resident_bytes(self) -> int:
        """Bytes of loaded and loading adapters (loading ones are counted from the start of the load)."""
        live = [e for e in self._entries.values() if e.loaded is not None or e.future is not None]
        return sum(e.spec.nbytes for e in live + self._retired)

    def acquire(self, name: str) -> LoadedAdapter | None:
        """The loaded adapter (marked recently used), or None while it is loading; starts a load when cold.

        Raises AdapterFileError when its file failed to load (the next call retries)."""
        entry = self._entries[name]
        self._collect(entry)
        if entry.loaded is not None:
            self._lru.move_to_end(name)
            return entry.loaded
        if entry.error is not None:
            error, entry.error = entry.error, None
            raise AdapterFileError(error)
        if entry.future is None and self._make_room(entry.spec.nbytes, count=1):
            self.misses += 1
            entry.started = time.perf_counter()
            entry.future = self._submit(entry.spec)
            self._lru[name] = None
            if self._executor is None:
                return self.acquire(name)
        return None

    def _submit(self, spec: AdapterSpec) -> Future:
        if self._executor is not None:
            return self._executor.submit(load_adapter_weights, spec, self.dims, self.dtype)
        future = Future()
        try:
            future.set_result(load_adapter_weights(spec, self.dims, self.dtype))
        except Exception as e:
            future.set_exception(e)
        return future

    def pin(self, name: str) -> None:
        self._entries[name].pins += 1

    def unpin(self, adapter: LoadedAdapter) -> None:
        entry = self._entries.get(adapter.name)
        if entry is None or entry.loaded is not adapter:  # retired
            entry = next(e for e in self._retired if e.loaded is adapter)
        entry.pins -= 1
        if entry.retired and entry.pins == 0:
            self._retired.remove(entry)

    def loaded_count(self) -> int:
        return sum(e.loaded is not None for e in self._entries.values())

    def loading(self) -> list[Future]:
        return [e.future for e in self._entries.values() if e.future is not None]

    def make_room(self, nbytes: int) -> bool:
        """Evict idle adapters (LRU first) until `nbytes` fit in the shared budget; False if they cannot."""
        return self._make_room(nbytes, count=0)

    def _make_room(self, nbytes: int, count: int) -> bool:
        def fits():
            n = len(self._lru) + count
            return self._free_bytes() >= nbytes and (self.max_cpu_loras is None or n <= self.max_cpu_loras)

        for name in list(self._lru):
            if fits():
                break
            entry = self._entries[name]
            if entry.pins == 0 and entry.loaded is not None:
                entry.loaded = None
                del self._lru[name]
                self.evictions += 1
        return fits()

    def _collect(self, entry: _Entry) -> None:
        future = entry.future
        if future is None or not future.done():
            return
        entry.future = None
        try:
            entry.loaded = future.result()
            entry.load_ms = 1000 * (time.perf_counter() - entry.started)
            self.load_ms.append(entry.load_ms)
        except Exception as e:  # a corrupt file fails its requests only
            self._lru.pop(entry.spec.name, None)
            entry.error = f"adapter {entry.spec.name!r} could not be loaded: {e}"

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
