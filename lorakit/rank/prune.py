"""LoRAPrune (Zhang et al. 2024): structured pruning of attention heads and MLP channels scored from LoRA gradients.

The weight gradient is estimated from the adapter alone, Ĝ = ∇B·A + B·∇A − ∇B·∇A (no ∇W is computed or stored),
and a weight's importance is I = |Ĝ ⊙ (W + s·B·A)|. Importance is summed over each group (one attention head, or
one kv group of heads under GQA; one MLP channel), L2-normalised per module, summed over the modules of a block
(q, k, v and o_proj's input columns share one score per head; gate, up and down_proj's input columns one score per
channel; BERT: query/key/value/attention.output.dense and intermediate.dense/output.dense) and smoothed with an EMA
Ī ← 0.9·Ī + 0.1·I. Sparsity follows the cubic ramp of `cubic_sparsity`; every `prune_every` steps the lowest-Ī
groups of each block are masked ("local" pruning). Masks act on the input of o_proj/down_proj (the head's or
channel's whole contribution), so the masked model equals the physically pruned one. `finalize()` removes the
masked rows/columns: smaller Linear weights, adapters' A/B sliced, per-module head counts updated.

Choices where the card is silent or the sources differ (documented here):
- GQA (Llama with fewer kv heads): a group is one kv head with the query heads that read it, so the
  heads-per-kv ratio stays valid; with plain multi-head attention a group is one head. With a single kv head
  (multi-query attention) no head can be pruned (at least one group is kept), only MLP channels.
- L2 normalisation is per module (as the reference code does), before the per-block sum.
- A pruned group stays pruned (masks only shrink); at least one group per block is always kept.
- Metrics: "lora" (the estimator above), "magnitude" (I = |W + s·B·A|, |W| without an adapter) and "random"
  (fixed seeded scores), all at the same per-block counts. The reference's "grad" metric needs ∇W: not offered.
- Layers skipped (never pruned): the first int(0.1·L) and the last (`skip_first`, `skip_last`).
- Only plain-LoRA adapters (lora_A/lora_B, e.g. variant "lora", "pissa") on nn.Linear can be sliced.
- The pruned model keeps heterogeneous per-layer sizes: the per-layer sizes are written to
  `model.config.lorakit_pruned_layers`; `intermediate_size` changes when every layer has the same size; global
  head counts never change (BERT and Llama derive the head size from them). `save_pruned`/`load_pruned` store
  and rebuild a pruned base (original architecture from the config, then the record); plain `from_pretrained`
  cannot load it.
After `finalize()`, make a new optimizer: parameters were replaced.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError, ModelError, UnsupportedFeatureError
from ..kinds import kind_for
from ..layers import AdaptedLayer

METRICS = ("lora", "magnitude", "random")


def cubic_sparsity(step: int, total: int, final: float, initial: float = 0.0, initial_warmup: float = 0.1,
                   final_warmup: float = 0.1) -> float:
    """Sparsity at `step` of `total`: `initial` for the first `initial_warmup` fraction, `final` for the last
    `final_warmup` fraction, in between final + (initial − final)·(1 − progress)³ (LoRAPrune's schedule)."""
    if step <= initial_warmup * total:
        return initial
    if step > total - final_warmup * total:
        return final
    span = total - (initial_warmup + final_warmup) * total
    progress = (step - initial_warmup * total) / span
    return final + (initial - final) * (1 - progress) ** 3


@dataclass
class Block:
    """One prunable block: `groups` heads (or kv groups) or MLP channels shared by several Linear modules.

    `members`: (module path, "out" | "in", unit): the module's output rows or input columns, `unit` consecutive
    ones per group. The mask acts on the input of the "in" members.
    """

    name: str
    layer: int
    kind: str  # "heads" | "channels"
    groups: int
    members: list[tuple[str, str, int]]
    owner: str  # module whose head-count attributes change (BERT self-attention), or ""


@dataclass
class PruningRecord:
    """What was removed: per module path the kept output rows and/or input columns and the original shape."""

    modules: dict[str, dict] = field(default_factory=dict)  # path → {"out": [...]|None, "in": [...]|None, "shape"}
    layers: dict[int, dict] = field(default_factory=dict)  # layer → sizes after pruning

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PruningRecord":
        return cls({k: dict(v) for k, v in d["modules"].items()}, {int(k): v for k, v in d.get("layers", {}).items()})


def _linear(module: nn.Module) -> nn.Linear:
    base = module.base_layer if isinstance(module, AdaptedLayer) else module
    if type(base) is not nn.Linear:
        raise UnsupportedFeatureError(f"structured pruning supports nn.Linear only, got {type(base).__name__}")
    return base


def find_blocks(model: nn.Module) -> list[Block]:
    """The attention and MLP blocks of every Llama-style decoder layer or BERT encoder layer, in model order."""
    blocks: list[Block] = []
    layer = 0
    for path, m in model.named_modules():
        p = path + "." if path else ""
        if hasattr(m, "self_attn") and hasattr(m, "mlp") and all(hasattr(m.self_attn, a) for a in (
                "q_proj", "k_proj", "v_proj", "o_proj")):
            attn, hd = m.self_attn, m.self_attn.head_dim
            q, k = _linear(attn.q_proj), _linear(attn.k_proj)
            heads, kv = q.out_features // hd, k.out_features // hd
            g = heads // kv
            a = p + "self_attn."
            blocks.append(Block(a[:-1], layer, "heads", kv, [(a + "q_proj", "out", g * hd), (a + "k_proj", "out", hd),
                                                              (a + "v_proj", "out", hd), (a + "o_proj", "in", g * hd)],
                                ""))
            f = p + "mlp."
            names = ["gate_proj", "up_proj"] if hasattr(m.mlp, "gate_proj") else ["up_proj"]
            blocks.append(Block(f[:-1], layer, "channels", _linear(getattr(m.mlp, names[-1])).out_features,
                                [(f + n, "out", 1) for n in names] + [(f + "down_proj", "in", 1)], ""))
            layer += 1
        elif hasattr(m, "attention") and hasattr(m, "intermediate") and hasattr(m, "output") \
                and hasattr(getattr(m.attention, "self", None), "query"):
            sa, hd = m.attention.self, m.attention.self.attention_head_size
            a = p + "attention."
            blocks.append(Block(a + "self", layer, "heads", _linear(sa.query).out_features // hd,
                                [(a + "self.query", "out", hd), (a + "self.key", "out", hd),
                                 (a + "self.value", "out", hd), (a + "output.dense", "in", hd)], a + "self"))
            blocks.append(Block(p + "intermediate", layer, "channels", _linear(m.intermediate.dense).out_features,
                                [(p + "intermediate.dense", "out", 1), (p + "output.dense", "in", 1)], ""))
            layer += 1
    if not blocks:
        raise ModelError("no Llama-style decoder layers or BERT encoder layers found to prune")
    return blocks


def _plain_lora(variant) -> bool:
    names = {n for n, _ in variant.named_parameters()}
    return names <= {"lora_A", "lora_B"} and hasattr(variant, "lora_A") and not list(variant.buffers())


def estimated_weight_grad(variant) -> Optional[torch.Tensor]:
    """Ĝ = ∇B·A + B·∇A − ∇B·∇A from the adapter's own gradients (None before any backward)."""
    a, b = variant.lora_A, variant.lora_B
    if a.grad is None or b.grad is None:
        return None
    return b.grad @ a + b @ a.grad - b.grad @ a.grad


def weight_importance(module: nn.Module, adapter: str, metric: str = "lora") -> Optional[torch.Tensor]:
    """Element importance (out, in): "lora": |Ĝ ⊙ (W + s·B·A)|; "magnitude": |W + s·B·A|; None if unavailable."""
    lin = _linear(module)
    w = lin.weight.detach()
    v = module.adapters[adapter] if isinstance(module, AdaptedLayer) and adapter in module.adapters else None
    if v is None:
        return w.abs() if metric == "magnitude" else None
    a, b = v.lora_A.detach(), v.lora_B.detach()
    merged = adapter in module.merged
    eff = w if merged else w + v.scale * (b @ a)
    if metric == "magnitude":
        return eff.abs()
    g = estimated_weight_grad(v)
    return None if g is None else (g * eff).abs()


def group_scores(importance: torch.Tensor, axis: str, groups: int, unit: int) -> torch.Tensor:
    """Sum of `importance` per group of `unit` consecutive rows ("out") or columns ("in")."""
    per = importance.sum(1) if axis == "out" else importance.sum(0)
    return per.view(groups, unit).sum(1)


class LoRAPrune:
    """Iterative structured pruning during LoRA fine-tuning; a trainer step hook (`Trainer(hooks=[pruner])`).

    From a plain loop: after `loss.backward()` call `pruner.step(step, total_steps)` before `optimizer.step()`;
    at the end `record = pruner.finalize()`. `prune_now(sparsity)` prunes one-shot from the current scores.
    """

    def __init__(self, model: nn.Module, adapter: str = "default", sparsity: float = 0.5, metric: str = "lora",
                 prune_every: int = 10, ema: float = 0.9, initial_warmup: float = 0.1, final_warmup: float = 0.1,
                 skip_first: float = 0.1, skip_last: bool = True, heads: bool = True, channels: bool = True,
                 normalize: bool = True, seed: int = 0):
        if not 0 <= sparsity < 1:
            raise ConfigError(f"option sparsity must be in [0, 1), got {sparsity}")
        if metric not in METRICS:
            raise ConfigError(f"option metric must be one of {METRICS}, got {metric!r}")
        if prune_every < 1:
            raise ConfigError(f"option prune_every must be >= 1, got {prune_every}")
        if not 0 <= ema < 1:
            raise ConfigError(f"option ema must be in [0, 1), got {ema}")
        self.model, self.adapter, self.sparsity, self.metric = model, adapter, sparsity, metric
        self.prune_every, self.ema, self.normalize = prune_every, ema, normalize
        self.initial_warmup, self.final_warmup = initial_warmup, final_warmup
        blocks = [b for b in find_blocks(model) if (b.kind == "heads" and heads) or (b.kind == "channels" and channels)]
        n_layers = 1 + max(b.layer for b in find_blocks(model))
        skipped = set(range(int(n_layers * skip_first))) | ({n_layers - 1} if skip_last else set())
        self.blocks = [b for b in blocks if b.layer not in skipped]
        if not self.blocks:
            raise ConfigError(f"no block left to prune: all {n_layers} layers are skipped (skip_first={skip_first}, "
                              f"skip_last={skip_last})")
        modules = dict(model.named_modules())
        self._modules = {path: modules[path] for b in self.blocks for path, _, _ in b.members}
        if metric == "lora":
            for b in self.blocks:
                if not any(isinstance(self._modules[p], AdaptedLayer) and adapter in self._modules[p].adapters
                           for p, _, _ in b.members):
                    raise ConfigError(f"metric 'lora' needs adapter {adapter!r} on a module of {b.name}; "
                                      f"target {['.'.join(p.split('.')[-2:]) for p, _, _ in b.members]} (e.g. all-linear)")
        for m in self._modules.values():
            if isinstance(m, AdaptedLayer) and adapter in m.adapters and not _plain_lora(m.adapters[adapter]):
                raise UnsupportedFeatureError(f"LoRAPrune needs a plain LoRA adapter (lora_A, lora_B), got "
                                              f"{m.adapters[adapter].name!r}")
        ref = next(iter(self._modules.values())).weight
        gen = torch.Generator().manual_seed(seed)
        self.scores = {b.name: (torch.rand(b.groups, generator=gen) if metric == "random" else
                                torch.zeros(b.groups)).to(ref.device) for b in self.blocks}
        self.masks = {b.name: torch.ones(b.groups, dtype=torch.bool, device=ref.device) for b in self.blocks}
        self._hooks = []
        for b in self.blocks:
            for path, axis, unit in b.members:
                if axis == "in":
                    self._hooks.append(self._modules[path].register_forward_pre_hook(self._mask_hook(b.name, unit)))

    # ---- masks -----------------------------------------------------------------------------------
    def _mask_hook(self, name: str, unit: int):
        def hook(module, args):
            m = self.masks[name]
            if bool(m.all()):
                return None
            x = args[0]
            return (x * m.repeat_interleave(unit).to(x.dtype), *args[1:])
        return hook

    def detach(self) -> None:
        """Remove the mask hooks (the model computes unmasked again)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def sparsity_at(self, step: int, total: int) -> float:
        return cubic_sparsity(step, total, self.sparsity, 0.0, self.initial_warmup, self.final_warmup)

    @property
    def pruned_fraction(self) -> float:
        """Fraction of groups masked over the prunable blocks."""
        return 1 - sum(int(m.sum()) for m in self.masks.values()) / sum(m.numel() for m in self.masks.values())

    # ---- importance ----------------------------------------------------------------------------
    @torch.no_grad()
    def block_importance(self) -> dict[str, torch.Tensor]:
        """This step's score per group of each block (summed over its modules, each L2-normalised)."""
        out = {}
        for b in self.blocks:
            total = torch.zeros(b.groups, dtype=torch.float32, device=self.scores[b.name].device)
            for path, axis, unit in b.members:
                imp = weight_importance(self._modules[path], self.adapter, self.metric)
                if imp is None:
                    continue
                s = group_scores(imp.float(), axis, b.groups, unit)
                total += s / (torch.linalg.norm(s) + 1e-8) if self.normalize else s
            out[b.name] = total
        return out

    @torch.no_grad()
    def accumulate(self) -> None:
        """EMA update Ī ← ema·Ī + (1 − ema)·I from the current gradients (skipped if any score is NaN)."""
        if self.metric == "random":
            return
        new = self.block_importance()
        if any(torch.isnan(v).any() for v in new.values()):
            return
        for k, v in new.items():
            self.scores[k].mul_(self.ema).add_(v, alpha=1 - self.ema)

    @torch.no_grad()
    def update_masks(self, ratio: float) -> None:
        """Mask the int(groups·ratio) lowest-scored groups of each block (already masked ones count first)."""
        for b in self.blocks:
            n = min(int(b.groups * ratio), b.groups - 1)
            old = self.masks[b.name]
            if n <= int((~old).sum()):
                continue
            s = self.scores[b.name].clone().float()
            s[~old] = -math.inf
            new = torch.ones_like(old)
            new[torch.argsort(s, stable=True)[:n]] = False
            self.masks[b.name] = new & old

    def step(self, step: int, total: int) -> None:
        """Training step `step` (0-based, gradients present): EMA update; every `prune_every` steps and at the last
        step, re-mask at the schedule's sparsity after `step + 1` steps (so the last step reaches the target)."""
        self.accumulate()
        if step % self.prune_every == 0 or step == total - 1:
            self.update_masks(self.sparsity_at(step + 1, total))

    def before_optimizer_step(self, trainer) -> None:
        self.step(trainer.step, trainer.total_steps)

    def prune_now(self, sparsity: Optional[float] = None) -> None:
        """One-shot masking at `sparsity` (default the target) from the current scores (magnitude/random: fresh)."""
        if self.metric == "magnitude":
            self.scores = self.block_importance()
        elif self.metric == "lora" and all(bool((s == 0).all()) for s in self.scores.values()):
            self.accumulate()
        self.update_masks(self.sparsity if sparsity is None else sparsity)

    # ---- physical removal ------------------------------------------------------------------------
    def finalize(self) -> PruningRecord:
        """Remove the masked heads/channels physically, drop the hooks, and return what was kept."""
        record = PruningRecord()
        for b in self.blocks:
            keep = torch.nonzero(self.masks[b.name]).flatten().tolist()
            for path, axis, unit in b.members:
                entry = record.modules.setdefault(path, {"out": None, "in": None,
                                                         "shape": list(_linear(self._modules[path]).weight.shape)})
                entry[axis] = [g * unit + i for g in keep for i in range(unit)]
        self.detach()
        apply_record(self.model, record)
        return record


def _slice_param(p: nn.Parameter, idx: torch.Tensor, dim: int) -> nn.Parameter:
    return nn.Parameter(p.detach().index_select(dim, idx).clone(), requires_grad=p.requires_grad)


@torch.no_grad()
def _slice_module(module: nn.Module, out_idx: Optional[list], in_idx: Optional[list]) -> None:
    lin = _linear(module)
    if isinstance(module, AdaptedLayer) and module.merged:
        raise ModelError(f"cannot prune a layer with merged adapters {list(module.merged)}; unmerge first")
    dev = lin.weight.device
    if out_idx is not None:
        idx = torch.tensor(out_idx, dtype=torch.long, device=dev)
        lin.weight = _slice_param(lin.weight, idx, 0)
        if lin.bias is not None:
            lin.bias = _slice_param(lin.bias, idx, 0)
        lin.out_features = len(out_idx)
    if in_idx is not None:
        idx = torch.tensor(in_idx, dtype=torch.long, device=dev)
        lin.weight = _slice_param(lin.weight, idx, 1)
        lin.in_features = len(in_idx)
    if isinstance(module, AdaptedLayer):
        module.kind = kind_for(lin)
        for name, v in module.adapters.items():
            if not _plain_lora(v):
                raise UnsupportedFeatureError(f"cannot slice adapter {name!r} ({v.name}): plain LoRA only")
            v.kind = module.kind
            if out_idx is not None:
                v.lora_B = _slice_param(v.lora_B, torch.tensor(out_idx, device=v.lora_B.device), 0)
            if in_idx is not None:
                v.lora_A = _slice_param(v.lora_A, torch.tensor(in_idx, device=v.lora_A.device), 1)
        module._stacks.clear()


def apply_record(model: nn.Module, record: PruningRecord) -> PruningRecord:
    """Prune `model` (unpruned, same architecture as the record's) in place exactly as `record` says; updates
    per-module head counts and `config.lorakit_pruned_layers`. Returns the record with per-layer sizes filled."""
    modules = dict(model.named_modules())
    for path, entry in record.modules.items():
        if path not in modules:
            raise ModelError(f"pruning record names {path!r}, which this model does not have")
        shape = list(_linear(modules[path]).weight.shape)
        if shape != list(entry["shape"]):
            raise ModelError(f"{path}: weight shape {shape} differs from the record's {entry['shape']} "
                             "(already pruned?)")
        _slice_module(modules[path], entry.get("out"), entry.get("in"))
    layers = {}
    for b in find_blocks(model):
        sizes = layers.setdefault(b.layer, {})
        first = _linear(dict(model.named_modules())[b.members[0][0]])
        if b.kind == "heads":
            if b.owner:  # BERT self-attention keeps its own counts
                sa = dict(model.named_modules())[b.owner]
                sa.num_attention_heads = first.out_features // sa.attention_head_size
                sa.all_head_size = first.out_features
                sizes["num_attention_heads"] = sa.num_attention_heads
            else:
                hd = dict(model.named_modules())[b.name].head_dim
                sizes["num_attention_heads"] = first.out_features // hd
                sizes["num_key_value_heads"] = _linear(dict(model.named_modules())[b.members[1][0]]).out_features // hd
        else:
            sizes["intermediate_size"] = first.out_features
    record.layers = layers
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cfg.lorakit_pruned_layers = {str(k): v for k, v in layers.items()}
        sizes = {v["intermediate_size"] for v in layers.values() if "intermediate_size" in v}
        if len(sizes) == 1 and hasattr(cfg, "intermediate_size"):
            cfg.intermediate_size = sizes.pop()
    return record


def parameter_count(model: nn.Module) -> int:
    """Number of parameter elements (the physical size of the model)."""
    return sum(p.numel() for p in model.parameters())


# ---- experiment entry point (movies task: LoRAPrune vs random / magnitude at equal structured sparsity) -----------
def _run_setup(config):
    """(splits, model with the run's adapter injected, task) for a `RunConfig`, as `lorakit.train.run.train` does."""
    import dataclasses as dc

    from ..model import inject
    from ..models import PEFT_TASK_TYPES, load_model
    from ..train.run import _texts, load_splits
    from ..train.tasks import make_task

    args = config.training
    splits = load_splits(config)
    model, tokenizer = load_model(config.model, config.task, num_labels=splits.train.num_labels, seed=args.seed,
                                  texts=_texts(splits.train))
    adapter = dc.replace(config.adapter, task_type=config.adapter.task_type or PEFT_TASK_TYPES[config.task])
    task = make_task(config.task, tokenizer, args.max_length, splits.train.num_labels)
    return splits, model, tokenizer, adapter, task, inject


def _timed_eval(trainer, dataset, prefix: str) -> dict:
    import time

    started = time.perf_counter()
    out = trainer.evaluate(dataset, prefix)
    out[prefix + "_seconds"] = round(time.perf_counter() - started, 3)
    return out


def prune_experiment(config, metric: str = "lora", sparsity: float = 0.5, prune_every: int = 10, **options) -> dict:
    """Train the run's LoRA with LoRAPrune (`metric` "lora", or the "magnitude"/"random" baselines on the same
    schedule), then remove the pruned structure; returns test metrics of the masked and of the physically pruned
    model, their evaluation times and parameter counts. `config`: a `lorakit.train.args.RunConfig`; metric "lora"
    needs the adapter on the attention and MLP modules (e.g. `target_modules: all-linear`)."""
    from ..train.trainer import Trainer

    splits, model, _, adapter, task, inject = _run_setup(config)
    torch.manual_seed(config.training.seed)
    inject(model, adapter, "default")
    pruner = LoRAPrune(model, sparsity=sparsity, metric=metric, prune_every=prune_every, seed=config.training.seed,
                       **options)
    trainer = Trainer(model, task, config.training, splits.train, splits.validation, hooks=[pruner])
    trainer.train()
    results = {"metric": metric, "sparsity": sparsity, "pruned_group_fraction": round(pruner.pruned_fraction, 4),
               "parameters_before": parameter_count(model), **_timed_eval(trainer, splits.test, "masked_test")}
    record = pruner.finalize()
    results.update(parameters_after=parameter_count(model), layers=record.layers,
                   **_timed_eval(trainer, splits.test, "test"))
    return results


# ---- saving a pruned base model ------------------------------------------------------------------------------------
RECORD_FILE = "pruning_record.json"


def save_pruned(model: nn.Module, record: PruningRecord, directory: str, tokenizer=None) -> None:
    """Write a pruned transformers model without adapters (`save_pretrained`), its record and, when given, its
    tokenizer; `load_pruned` and `lorakit.models.load_model` (so `lorakit train --model DIR`) read it back."""
    import json
    import os

    if any(isinstance(m, AdaptedLayer) for m in model.modules()):
        raise ModelError("save_pruned writes a base model: merge_and_unload or unload the adapters first")
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    with open(os.path.join(directory, RECORD_FILE), "w") as f:
        json.dump(record.to_dict(), f)


def is_pruned_dir(directory: str) -> bool:
    """Whether `directory` holds a model written by `save_pruned`."""
    import os

    return os.path.isfile(os.path.join(directory, RECORD_FILE))


def load_pruned(directory: str, model_class=None, **config_overrides) -> tuple[nn.Module, PruningRecord]:
    """(model, record) from `save_pruned`: the original architecture is built from the config, pruned by the
    record, then filled from the saved weights. `model_class` (a model class or a transformers Auto class, e.g.
    `AutoModelForSequenceClassification`) defaults to the saved architecture; with another class, weights outside
    the backbone that the file lacks (a new head) keep their fresh initialisation, as `from_pretrained` does.
    `config_overrides` (e.g. num_labels) update the saved config first."""
    import json
    import os

    import transformers
    from safetensors.torch import load_file

    from transformers import AutoConfig

    with open(os.path.join(directory, RECORD_FILE)) as f:
        record = PruningRecord.from_dict(json.load(f))
    config = AutoConfig.from_pretrained(directory, **config_overrides)
    for path, entry in record.modules.items():  # the unpruned MLP width (config.intermediate_size may be pruned)
        if path.endswith(("intermediate.dense", "up_proj")):
            config.intermediate_size = entry["shape"][0]
            break
    cls = model_class or getattr(transformers, config.architectures[0])
    with torch.random.fork_rng(devices=[]):
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    apply_record(model, record)
    state = load_file(os.path.join(directory, "model.safetensors"))
    prefix = getattr(model, "base_model_prefix", "")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if model_class is not None:  # a head the file does not have stays freshly initialised
        missing = [k for k in missing if prefix and k.startswith(prefix + ".")]
        unexpected = [k for k in unexpected if prefix and k.startswith(prefix + ".")]
    if unexpected or missing:
        raise ModelError(f"{directory}: saved weights do not fit the pruned model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return model.eval(), record
