"""Adapters on a model: inject, activate, disable, delete, merge, unmerge, unload, trainable params."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from .config import DEFAULT_TARGETS, AdapterConfig, is_targeted, name_matches
from .errors import AdapterNameError, MergeError, TargetError
from .hf import bind_save_pretrained, unbind_save_pretrained
from .kinds import SUPPORTED, Conv1D, is_supported, kind_for
from .layers import AdaptedLayer, TrainedCopy
from .routing import BASE, pin_in_checkpoints, unpin_checkpoints
from .variants import Variant, get_variant
from .variants.base import Shared, Site

BOOK_ATTR = "_lorakit"
SHARED_ATTR = "lorakit_shared"  # model.lorakit_shared[name]: an adapter's model-wide state (VeRA bases, ...)
SHARED_KEY = "base_model."  # file-key prefix of model-wide tensors (PEFT's, e.g. `base_model.vera_A`)


@dataclass
class _Book:
    """What lorakit keeps on a model: each adapter's config, and which adapters are active."""

    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)


def _book(model: nn.Module) -> _Book:
    if not hasattr(model, BOOK_ATTR):
        object.__setattr__(model, BOOK_ATTR, _Book())
    return getattr(model, BOOK_ATTR)


def check_name(name: str) -> None:
    bad = not isinstance(name, str) or not name or any(s in name for s in ("/", "\\", "..", ".")) or name == BASE
    if bad or name != name.strip():
        raise AdapterNameError(f"invalid adapter name {name!r}: use a non-empty name without '/', '\\\\', '.' "
                               f"or surrounding spaces, other than {BASE!r}")
    if hasattr(nn.ModuleDict(), name):  # adapters live in ModuleDicts: "training", "forward", "to", ... clash
        raise AdapterNameError(f"invalid adapter name {name!r}: it is an attribute of torch.nn.Module; pick another")


def check_names(names, what: str = "names") -> list[str]:
    """`names` as a list: a non-empty sequence of distinct strings (ConfigError naming `what` otherwise)."""
    from .errors import ConfigError

    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ConfigError(f"{what} takes a list of adapter names, got {names!r:.80}")
    if not names:
        raise ConfigError(f"{what} needs at least one adapter name, got an empty list")
    names = list(names)
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"{what} needs distinct adapter names (strings), got {names!r:.80}")
    return names


def check_free_name(model: nn.Module, name: str) -> None:
    """`name` is a valid adapter name that `model` does not have yet (else `AdapterNameError`)."""
    check_name(name)
    if name in _book(model).configs:
        raise AdapterNameError(f"an adapter named {name!r} already exists; delete it first or pick another name")


def adapter_names(model: nn.Module) -> list[str]:
    return list(_book(model).configs)


def adapter_ranks(model: nn.Module) -> dict[str, int]:
    """Each adapter's rank r, by name (one pass over the configs: routing reads it on every `route()` entry)."""
    return {name: config.r for name, config in _book(model).configs.items()}


def get_config(model: nn.Module, name: str = "default") -> AdapterConfig:
    return _book(model).configs[_known(model, name)]


def _known(model: nn.Module, name: str) -> str:
    if name not in _book(model).configs:
        raise AdapterNameError(f"no adapter named {name!r}; this model has {adapter_names(model)}")
    return name


def wrappers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for path, m in model.named_modules():
        if isinstance(m, (AdaptedLayer, TrainedCopy)):
            yield path, m


def _layers(model: nn.Module) -> list[AdaptedLayer]:
    return [w for _, w in wrappers(model) if isinstance(w, AdaptedLayer)]


# ---- targeting ---------------------------------------------------------------------------------
def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) for every module except the root and the insides of lorakit wrappers."""
    inside: Optional[str] = None
    for path, m in model.named_modules():
        if not path or (inside is not None and path.startswith(inside)) or path.split(".")[0] == SHARED_ATTR:
            continue
        if isinstance(m, (AdaptedLayer, TrainedCopy)):
            inside = path + "."
        yield path, m


def _base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdaptedLayer) else module


def _all_linear(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Every Linear / Conv1D except the output head (PEFT's "all-linear")."""
    linear = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None and config.task_type == "SEQ_CLS":
        head = getattr(model, "score", None) or getattr(model, "classifier", None)
    return [p for p, m in _candidates(model) if isinstance(_base_of(m), linear) and _base_of(m) is not head]


MIN_TARGETS_TO_SHORTEN = 20  # PEFT records short names only from this many targets on


def _stored_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """The explicit target list a config file records, as PEFT writes it: the resolved names; from 20 targets
    on, for each target its shortest dotted suffix that names no other module (kept only if the short list
    selects exactly the same modules)."""
    paths = sorted(resolve_targets(model, config))
    if len(paths) < MIN_TARGETS_TO_SHORTEN:
        return paths
    chosen = set(paths)
    others = [n for n, _ in model.named_modules() if n and n not in chosen]
    short = set()
    for path in paths:
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(o == suffix or o.endswith("." + suffix) for o in others):
                short.add(suffix)
                break
    short = sorted(short)
    planned = lambda targets: [p for p, _ in plan_targets(model, dataclasses.replace(config, target_modules=targets))]  # noqa: E731
    return short if planned(short) == planned(paths) else paths


def resolve_targets(model: nn.Module, config: AdapterConfig):
    """The `target_modules` to match with: explicit, "all-linear" expanded, or the model's default."""
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise TargetError(f"target_modules is not set and there is no default for model type {model_type!r}; "
                              f"defaults exist for {sorted(DEFAULT_TARGETS)}")
        return DEFAULT_TARGETS[model_type]
    if isinstance(targets, str) and targets.lower() == "all-linear":
        return _all_linear(model, config)
    return targets


def plan_targets(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module]]:
    """(path, module) of every module this config adapts; raises TargetError when there are none."""
    targets = resolve_targets(model, config)
    found = []
    for path, module in _candidates(model):
        if isinstance(module, TrainedCopy) or not is_targeted(config, path, targets):
            continue
        if not is_supported(_base_of(module)):
            raise TargetError(f"target {path!r} is a {type(module).__name__}, which cannot be adapted; "
                              f"supported: {SUPPORTED}")
        found.append((path, module))
    if not found:
        raise TargetError(f"target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}, "
                          f"layers_to_transform={config.layers_to_transform!r}) matched no module of "
                          f"{type(model).__name__}; module names look like {_sample_names(model)}")
    return found


def _sample_names(model: nn.Module, k: int = 6) -> list[str]:
    return [p for p, m in _candidates(model) if is_supported(_base_of(m))][:k]


# Heads PEFT appends to `modules_to_save` for these task types (so its files list names a model may lack).
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}


def _saved_modules(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module]]:
    if not config.modules_to_save:
        return []
    found = [(p, m) for p, m in _candidates(model)
             if name_matches(config.modules_to_save, p) and not isinstance(m, AdaptedLayer)]
    optional = TASK_HEADS.get(config.task_type, ())  # PEFT adds these for the task; a model has one of them
    missing = [s for s in config.modules_to_save
               if s not in optional and not any(name_matches([s], p) for p, _ in found)]
    if missing:
        raise TargetError(f"modules_to_save {missing} matched no module of {type(model).__name__}")
    return found


def _warn_fresh_heads(model: nn.Module, planned: list[tuple[str, nn.Module]]) -> None:
    """Warn when LoRA targets a task head that is not in the checkpoint the model came from (transformers marks the
    weights it loaded with `_is_hf_initialized`): a low-rank change of a random, frozen head. PEFT has the same trap."""
    heads = {h for names in TASK_HEADS.values() for h in names}
    loaded = any(getattr(p, "_is_hf_initialized", False) for p in model.parameters())
    fresh = [path for path, m in planned if path.split(".")[-1] in heads and loaded
             and not getattr(getattr(_base_of(m), "weight", None), "_is_hf_initialized", False)]
    if fresh:
        warnings.warn(f"LoRA targets {fresh}: a task head that was freshly initialised when the model was loaded "
                      f"(not in its checkpoint). The head stays random and frozen; only a low-rank change of it trains. "
                      f"Set task_type='SEQ_CLS' (or list the head in modules_to_save) to train and save the whole head, "
                      f"and leave it out of target_modules", UserWarning, stacklevel=4)


# ---- building and attaching --------------------------------------------------------------------
@dataclass
class PreparedAdapter:
    """An adapter built for a model but not yet attached: its variants and module copies by path."""

    name: str
    config: AdapterConfig
    variants: dict[str, Variant]
    copies: dict[str, nn.Module]
    shared: Optional[Shared] = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return _tensor_map(self.variants, self.copies, self.shared)


def _tensor_map(variants: dict[str, Variant], copies: dict[str, nn.Module],
                shared: Optional[Shared]) -> dict[str, torch.Tensor]:
    """Tensors by key: `<module path>.<suffix>` per layer, `base_model.<key>` for model-wide state."""
    out = {f"{p}.{k}": t for p, v in variants.items() for k, t in v.file_tensors().items()}
    out.update({f"{p}.{k}": t for p, c in copies.items() for k, t in c.state_dict(keep_vars=True).items()})
    if shared is not None:
        out.update({SHARED_KEY + k: t for k, t in shared.file_tensors().items()})
    return out


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters on half-precision bases are kept in fp32 (PEFT's autocast_adapter_dtype)."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) or not weight.is_floating_point() \
        else weight.dtype


def prepare(model: nn.Module, config: AdapterConfig, name: str, initialize: bool = True) -> PreparedAdapter:
    """Build an adapter for `model` without touching it (validates name, targets, modules_to_save)."""
    check_free_name(model, name)
    cls = get_variant(config.variant)
    config = copy.deepcopy(config)  # the adapter's own copy: build_shared may record derived options (a checksum)
    if config.target_modules is None or config.target_modules == "all-linear":
        config = dataclasses.replace(config, target_modules=_stored_targets(model, config))
    heads = [h for h in TASK_HEADS.get(config.task_type, ()) if h not in (config.modules_to_save or [])]
    if heads:  # as PEFT: a classification task trains and saves its head
        config = dataclasses.replace(config, modules_to_save=(config.modules_to_save or []) + heads)
    sites, weights = [], []
    planned = plan_targets(model, config)
    _warn_fresh_heads(model, planned)
    for path, module in planned:
        base = _base_of(module)
        kind = module.kind if isinstance(module, AdaptedLayer) else kind_for(base)
        sites.append(Site(path, kind, config.rank_for(path), config.scale_for(path)))
        weights.append(base.weight)
    shared = cls.build_shared(config, sites)
    if shared is not None:
        shared.to(device=weights[0].device, dtype=adapter_dtype(weights[0]))
        if initialize:
            shared.initialize(config.init_lora_weights)
    variants = {}
    for site, weight in zip(sites, weights):
        variant = cls(site.kind, site.r, site.scale, config.lora_dropout, config, shared=shared, path=site.path)
        variant.to(device=weight.device, dtype=adapter_dtype(weight))
        if initialize:
            variant.initialize(config.init_lora_weights)
        variants[site.path] = variant
    copies = {}
    for path, module in _saved_modules(model, config):
        copies[path] = copy.deepcopy(module.original_module if isinstance(module, TrainedCopy) else module)
    return PreparedAdapter(name, config, variants, copies, shared)


def attach(model: nn.Module, prepared: PreparedAdapter, trainable: bool = True) -> None:
    """Put a prepared adapter on the model (wrapping modules on first use); activate it if none is active.

    The base model is frozen; the new adapter's tensors get `requires_grad=trainable`; other adapters keep theirs.
    """
    adapter_ids = {id(t) for n in adapter_names(model) for t in adapter_parameters(model, n).values()}
    for p in model.parameters():
        if id(p) not in adapter_ids:
            p.requires_grad_(False)
    for t in prepared.tensors().values():
        if isinstance(t, nn.Parameter):
            t.requires_grad_(trainable and t.is_floating_point())
    modules = dict(model.named_modules())
    name = prepared.name
    for path, variant in prepared.variants.items():
        layer = modules[path]
        if not isinstance(layer, AdaptedLayer):
            layer = AdaptedLayer(layer).train(layer.training)  # new modules follow the model's mode (dropout)
            _replace(model, path, layer)
        layer.adapters[name] = variant.train(layer.training)
    for path, copy_ in prepared.copies.items():
        wrapper = modules[path]
        if not isinstance(wrapper, TrainedCopy):
            wrapper = TrainedCopy(wrapper).train(wrapper.training)
            _replace(model, path, wrapper)
        wrapper.copies[name] = copy_
    if prepared.shared is not None:
        if not hasattr(model, SHARED_ATTR):
            setattr(model, SHARED_ATTR, nn.ModuleDict())
        getattr(model, SHARED_ATTR)[name] = prepared.shared.train(model.training)
    book = _book(model)
    book.configs[name] = prepared.config
    set_active(model, book.active or [name])
    pin_in_checkpoints(model)
    bind_save_pretrained(model)  # transformers' save_pretrained / Trainer checkpoints write the adapters  # gradient checkpointing recomputes blocks with the routing of their forward


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def inject(model: nn.Module, config: AdapterConfig, name: str = "default") -> nn.Module:
    """Add adapter `name` to every module `config` targets; returns the same (mutated) model.

    The base model is frozen and the new adapter's parameters are trainable. The adapter is
    activated when no other adapter is active.
    """
    attach(model, prepare(model, config, name))
    return model


# ---- activation --------------------------------------------------------------------------------
def set_active(model: nn.Module, names: str | Iterable[str]) -> None:
    """Activate one or several adapters (their deltas are summed). Two active adapters may not both carry a trained
    copy of the same module (e.g. a classification head): there is no sum of two heads (PEFT refuses too); route
    rows to them instead (`lorakit.route`)."""
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        _known(model, n)
    for path, w in wrappers(model):
        both = [n for n in names if isinstance(w, TrainedCopy) and n in w.copies]
        if len(both) > 1:
            raise AdapterNameError(f"adapters {both} each carry a trained copy of {path!r} (modules_to_save); only "
                                   f"one of them can be active at a time (or route rows with lorakit.route)")
    _book(model).active = names
    for _, w in wrappers(model):
        w.active = list(names)


def active_adapters(model: nn.Module) -> list[str]:
    return list(_book(model).active)


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Run the base model only inside this context (merged layers are unmerged, then re-merged). Nests: leaving an
    inner context leaves the adapters disabled by an outer one."""
    merged = {layer: list(layer.merged) for layer in _layers(model) if layer.merged}
    for layer in merged:
        layer.set_merged([])
    before = {w: w.disabled for _, w in wrappers(model)}
    for w in before:
        w.disabled = True
    try:
        yield model
    finally:
        for w, was in before.items():
            w.disabled = was
        for layer, names in merged.items():
            layer.set_merged(names)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`; modules left with no adapter get their original module back."""
    _known(model, name)
    for path, w in list(wrappers(model)):
        if isinstance(w, AdaptedLayer) and name in w.merged:
            raise MergeError(f"adapter {name!r} is merged into {path}; unmerge before deleting it")
    for path, w in list(wrappers(model)):
        held = w.adapters if isinstance(w, AdaptedLayer) else w.copies
        if name in held and isinstance(w, AdaptedLayer):
            w.remove(name)
        elif name in held:
            del held[name]
        if not len(held):
            _replace(model, path, _base_of(w) if isinstance(w, AdaptedLayer) else w.original_module)
    shared = getattr(model, SHARED_ATTR, None)
    if shared is not None and name in shared:
        del shared[name]
        if not len(shared):
            delattr(model, SHARED_ATTR)
    book = _book(model)
    del book.configs[name]
    set_active(model, [n for n in book.active if n != name])
    if not book.configs:
        unbind_save_pretrained(model)


def clone_adapter(model: nn.Module, name: str, new_name: str, trainable: bool = True) -> None:
    """Add `new_name`: an exact copy of adapter `name` (same variant and config, every tensor and buffer copied);
    the active set is unchanged."""
    _known(model, name)
    prepared = prepare(model, get_config(model, name), new_name, initialize=False)
    with torch.no_grad():
        for path, w in wrappers(model):
            if isinstance(w, AdaptedLayer) and name in w.adapters:
                prepared.variants[path].load_state_dict(w.adapters[name].state_dict())
            elif isinstance(w, TrainedCopy) and name in w.copies:
                prepared.copies[path].load_state_dict(w.copies[name].state_dict())
        shared = shared_state(model, name)
        if shared is not None:
            prepared.shared.load_state_dict(shared.state_dict())
    attach(model, prepared, trainable=trainable)


# ---- merging -----------------------------------------------------------------------------------
def merge(model: nn.Module, adapter_names: Optional[list[str]] = None, safe: bool = False) -> None:
    """Fold adapters (default: the active ones) into the base weights.

    With `safe=True` a non-finite result raises MergeError and every layer is left as it was.
    """
    names = [_known(model, n) for n in (adapter_names or active_adapters(model))]
    plan = [(path, layer, list(layer.merged) + [n for n in names if n not in layer.merged])
            for path, layer in wrappers(model) if isinstance(layer, AdaptedLayer)]
    for path, layer, wanted in plan:  # check every layer before writing any
        layer.check_mergeable(wanted)
        if safe and not torch.isfinite(layer.merged_weight(wanted)[0]).all():
            raise MergeError(f"merging {names} gives non-finite weights in {path}; nothing was changed")
    for _, layer, wanted in plan:
        layer.set_merged(wanted)


def unmerge(model: nn.Module) -> None:
    """Restore every base weight (within float rounding)."""
    for layer in _layers(model):
        layer.set_merged([])


def unload(model: nn.Module) -> nn.Module:
    """Remove all adapters and give the original modules back (unmerging first)."""
    unmerge(model)
    return _strip(model, keep_copy_of=[])


def merge_and_unload(model: nn.Module, adapter_names: Optional[list[str]] = None, safe: bool = False) -> nn.Module:
    """Merge adapters (default: active) and return a plain model with no lorakit modules."""
    names = adapter_names or active_adapters(model)
    merge(model, names, safe=safe)
    return _strip(model, keep_copy_of=names)


def _strip(model: nn.Module, keep_copy_of: list[str]) -> nn.Module:
    for path, w in list(wrappers(model)):
        if isinstance(w, AdaptedLayer):
            _replace(model, path, w.base_layer)
        else:
            name = next((n for n in keep_copy_of if n in w.copies), None)
            _replace(model, path, w.copies[name] if name else w.original_module)
    if hasattr(model, SHARED_ATTR):
        delattr(model, SHARED_ATTR)
    unpin_checkpoints(model)
    if hasattr(model, BOOK_ATTR):
        object.__delattr__(model, BOOK_ATTR)
    unbind_save_pretrained(model)
    return model


# ---- trainable parameters ----------------------------------------------------------------------
def adapter_parameters(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The tensors of adapter `name` by file key (module path + PEFT key suffix), live."""
    _known(model, name)
    variants, copies = {}, {}
    for path, w in wrappers(model):
        if isinstance(w, AdaptedLayer) and name in w.adapters:
            variants[path] = w.adapters[name]
        elif isinstance(w, TrainedCopy) and name in w.copies:
            copies[path] = w.copies[name]
    return _tensor_map(variants, copies, shared_state(model, name))


def shared_state(model: nn.Module, name: str) -> Optional[Shared]:
    """Adapter `name`'s model-wide state, or None."""
    shared = getattr(model, SHARED_ATTR, None)
    return shared[name] if shared is not None and name in shared else None


def mark_trainable(model: nn.Module, names: Optional[list[str]] = None) -> None:
    """Freeze everything except the parameters of adapters `names` (default: active ones)."""
    names = names if names is not None else active_adapters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        for t in adapter_parameters(model, n).values():
            if isinstance(t, nn.Parameter) and t.is_floating_point():
                t.requires_grad_(True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared tensors counted once."""
    seen = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    return sum(p.numel() for p in seen.values() if p.requires_grad), total


def parameter_report(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
