"""Run settings: `TrainingArguments` (HF names), `RunConfig` (model + data + adapter + training), YAML and flags.

A run is described by one flat mapping, the same in a YAML file and on the command line: every key is a field of
`RunConfig`, of `AdapterConfig` or of `TrainingArguments` (`--learning-rate` = `learning_rate:`).
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..config import AdapterConfig
from ..errors import ConfigError

SCHEDULES = ("linear", "cosine", "constant")
REPORT_TO = ("none", "tensorboard", "wandb")
# transformers' `optim` names for what lorakit's optimizers do (the run records lorakit's name)
OPTIM_ALIASES = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw"}
FULL = "full"  # `variant: full`: full fine-tuning, no adapter (RunConfig.full_finetune; lorakit.train.full)
# Settings a task changes when the run does not set them: instruction tuning an LLM wants all-linear adapters,
# longer sequences and a step budget that fits a CPU (the acceptance run: under 15 minutes on 2 cores, fp32).
TASK_DEFAULTS = {"instruct": dict(target_modules="all-linear", r=16, lora_alpha=32, learning_rate=1e-3,
                                  max_steps=80, warmup_ratio=0.1, max_length=256, group_by_length=True)}


@dataclass
class TrainingArguments:
    """How to train. Names and meanings follow transformers' `TrainingArguments` where it has the setting."""

    output_dir: str = "out"
    learning_rate: float = 5e-4
    num_train_epochs: float = 1.0
    max_steps: int = -1                      # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: str = "linear"        # linear | cosine | constant
    warmup_ratio: float = 0.0
    warmup_steps: int = 0                    # > 0 overrides warmup_ratio
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    optim: str = "adamw"                     # a `lorakit.optim` name (adamw, sgd, ...) or a transformers alias
                                             # (adamw_torch, adamw_torch_fused, adamw_hf); or pass any optimizer
    optim_args: dict = field(default_factory=dict)  # the optimizer's own options (e.g. {loraplus_lr_ratio: 16})
    max_grad_norm: float = 1.0               # 0 disables clipping
    logging_steps: int = 1                   # metrics.jsonl gets a line every this many steps
    eval_steps: int = 0                      # 0: evaluate at the end of each epoch only
    save_steps: int = 50                     # checkpoint every this many steps (0: only at the end)
    save_total_limit: int = 1                # checkpoints kept in output_dir/checkpoints, oldest deleted (0: all)
    early_stopping_patience: int = 0         # evaluations without improvement before stopping (0: never)
    metric_for_best_model: Optional[str] = None  # default: the task's main metric
    load_best_model_at_end: bool = True
    seed: int = 0
    max_length: int = 128                    # tokens per example, longer ones are truncated
    dataloader_drop_last: bool = False
    group_by_length: bool = False            # batches of similar length (less padding, faster); order stays seeded
    disable_tqdm: bool = False
    report_to: str = "none"                  # none | tensorboard (<output_dir>/runs) | wandb (offline mode)
    bf16: bool = False                       # the base runs in bfloat16 (adapters and optimizer state stay fp32)
    fp16: bool = False                       # the base runs in float16 (same)
    device: str = "auto"                     # auto (CUDA when present) | cpu | cuda | cuda:N
    gradient_checkpointing: bool = False     # recompute each decoder layer in backward (less activation memory)
    fsdp: str = ""                           # "full_shard": under torchrun, shard the model (torch's fully_shard
                                             # per decoder layer, as transformers' "full_shard auto_wrap") instead
                                             # of DDP; "" = DDP. No effect in a single process
    attention_logit_every: int = 0           # every N steps log the largest attention logit per decoder layer
                                             # (attn_logit_max/<layer>, lorakit.analysis.attention_logits); 0: off

    def __post_init__(self):
        _check_types(self)
        _check_choice("lr_scheduler_type", self.lr_scheduler_type, SCHEDULES)
        self.optim = _optimizer_name(self.optim)
        _check_choice("report_to", self.report_to, REPORT_TO)
        from .reporting import check_installed

        check_installed(self.report_to)
        if not isinstance(self.optim_args, dict):
            raise ConfigError(f"optim_args must be a mapping of option names to values, got {self.optim_args!r}")
        positive = ("learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
                    "gradient_accumulation_steps", "max_length")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("num_train_epochs", "warmup_steps", "weight_decay", "max_grad_norm", "logging_steps",
                     "eval_steps", "save_steps", "save_total_limit", "early_stopping_patience",
                     "attention_logit_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.bf16 and self.fp16:
            raise ConfigError("choose one of bf16 and fp16")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")
                and self.device[5:].isdigit()):
            raise ConfigError(f"device={self.device!r} is not one of auto, cpu, cuda, cuda:N")
        fsdp = set(self.fsdp.split())
        if fsdp and (fsdp - {"full_shard", "auto_wrap"} or "full_shard" not in fsdp):
            raise ConfigError(f"fsdp={self.fsdp!r} is not supported; use 'full_shard' (each decoder layer is wrapped, "
                              f"as transformers' 'full_shard auto_wrap') or '' for DDP")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("set num_train_epochs > 0 or max_steps > 0")


FSDP_OPTIMIZERS = ("adamw", "sgd", "loraplus")  # element-wise updates: each process can update its own shard


@dataclass
class RunConfig:
    """One training run: which model, which data, which task, plus the adapter and the training settings."""

    model: str = "minilm"                    # smollm2 | minilm | tiny-llama | a local transformers model directory
    data: str = "vader:movies"               # vader:<domain> | a .csv/.jsonl file | a directory of splits
    task: str = "classification"             # classification | regression | causal-lm | instruct
    text_column: str = "text"
    label_column: str = "label"
    max_train_samples: int = 0               # > 0: a seeded subset of the training split (quick runs, sweeps)
    max_eval_samples: int = 0                # > 0: the same for validation and test
    split_seed: int = 0                      # draws the data split and subsets; `seed` (training) leaves them alone
    init: str = ""                           # a `lorakit.initialize` method run on the adapter first (e.g. "eva")
    init_args: dict = field(default_factory=dict)  # its options
    init_batches: int = 8                    # training batches for a data-driven init (`init`, LoRA-SB, SHiRA masks)
    quantize: str = ""                       # frozen base stored quantized: nf4 | fp4 | int8 (bitsandbytes); "" = none
    baselines: bool = False                  # also score the base k-shot (instruct; zero-shot is always scored)
    shots: int = 4                           # k of the k-shot baseline
    eval_ranks: list = field(default_factory=list)  # also test the adapter at these ranks (+ AURAC), e.g. [1, 2, 4, 8]
    full_finetune: bool = False              # `variant: full` in the flat settings: train every base parameter
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    training: TrainingArguments = field(default_factory=TrainingArguments)

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> "RunConfig":
        """Build from one flat mapping; an unknown key is an error naming the nearest valid keys."""
        run_keys, adapter_keys, training_keys = _keys(cls), _keys(AdapterConfig), _keys(TrainingArguments)
        valid = run_keys | adapter_keys | training_keys
        for key in values:
            if key not in valid:
                near = difflib.get_close_matches(str(key), sorted(valid), n=3)
                hint = f"did you mean {', '.join(near)}? " if near else ""
                raise ConfigError(f"unknown setting {key!r}; {hint}valid settings: {', '.join(sorted(valid))}")
        values = {**TASK_DEFAULTS.get(values.get("task", cls.task), {}), **values}
        full = values.get("variant") == FULL  # the adapter settings stay valid values, unused
        values = {k: v for k, v in values.items() if k != "variant"} if full else values
        pick = lambda keys: {k: v for k, v in values.items() if k in keys}  # noqa: E731
        return cls(**pick(run_keys), adapter=AdapterConfig(**pick(adapter_keys)),
                   training=TrainingArguments(**pick(training_keys)), full_finetune=full)

    def to_flat(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in _keys(RunConfig)}
        out.update(dataclasses.asdict(self.training))
        out.update({k: v for k, v in dataclasses.asdict(self.adapter).items() if k in _keys(AdapterConfig)})
        if self.full_finetune:
            out["variant"] = FULL
        return out

    def __post_init__(self):
        from ..data import TASKS

        _check_choice("task", self.task, TASKS)
        for name in ("max_train_samples", "max_eval_samples", "split_seed", "init_batches", "shots"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        ranks = self.eval_ranks if isinstance(self.eval_ranks, (list, tuple)) else [self.eval_ranks]
        try:  # "1,2,4,8", [1, 2, 4, 8] or a single rank
            self.eval_ranks = sorted({int(p) for r in ranks for p in str(r).split(",") if p.strip()})
        except (TypeError, ValueError):
            raise ConfigError(f"eval_ranks must be positive integers, got {self.eval_ranks!r}") from None
        if any(r < 1 for r in self.eval_ranks):
            raise ConfigError(f"eval_ranks must be positive integers, got {self.eval_ranks!r}")
        if self.training.fsdp:
            self._check_fsdp()
        if self.full_finetune:
            from .full import check

            check(self)

    def _check_fsdp(self) -> None:
        """FSDP shards each tensor over the processes: refuse what needs whole tensors on every process."""
        args = self.training
        if args.optim not in FSDP_OPTIMIZERS:
            raise ConfigError(f"optim={args.optim!r} works on whole matrices and does not run under fsdp; choose one "
                              f"of {', '.join(FSDP_OPTIMIZERS)} (element-wise updates), or train with DDP (fsdp '')")
        for name, reason in (("quantize", "bitsandbytes' quantized weights cannot be sharded"),
                             ("eval_ranks", "rank truncation needs the whole adapter")):
            if getattr(self, name, None) or getattr(args, name, None):
                raise ConfigError(f"{name} does not run under fsdp ({reason}); train with DDP (fsdp '') instead")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A flat mapping of settings from a YAML file (safe loader: plain data only)."""
    import yaml

    try:
        values = yaml.load(Path(path).read_text(), Loader=_loader())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {what}{where}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of settings, got {type(values).__name__}")
    return values


def _loader():
    """PyYAML's safe loader, reading `1e-3` as a number as YAML 1.2 does (YAML 1.1 makes it a string)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
        r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))
    return Loader


# AdapterConfig fields that describe a saved file, not a choice a user makes for a run
_FILE_ONLY = {"base_model_name_or_path", "revision", "inference_mode", "use_dora", "fan_in_fan_out"}


def _keys(cls) -> set[str]:
    keys = {f.name for f in dataclasses.fields(cls) if f.name not in ("adapter", "training", "full_finetune")}
    return keys - _FILE_ONLY if cls is AdapterConfig else keys


def _optimizer_name(name: str) -> str:
    """lorakit's optimizer for `name`: a registered name, or a transformers alias of one."""
    from ..optim import optimizer_names

    name = OPTIM_ALIASES.get(name, name)
    if name not in optimizer_names():
        aliases = ", ".join(OPTIM_ALIASES)
        _check_choice("optim", name, optimizer_names(), note=f" (transformers' {aliases} mean adamw)")
    return name


def _check_choice(name: str, value, choices, note: str = "") -> None:
    """ConfigError naming the value, the nearest choice and every choice, unless `value` is one of them."""
    if value not in choices:
        near = difflib.get_close_matches(str(value), list(map(str, choices)), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}{note}{hint}")


def _check_types(obj) -> None:
    """Coerce ints to floats where a float is expected; refuse anything of the wrong type, naming the field."""
    for f in dataclasses.fields(obj):
        value, default = getattr(obj, f.name), f.default
        if default is None or default is dataclasses.MISSING or value is None and f.type.startswith("Optional"):
            continue  # (fields with a default factory check their own type)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            setattr(obj, f.name, float(value))
        elif type(value) is not type(default):
            raise ConfigError(f"{f.name} must be {type(default).__name__}, got {value!r}")
