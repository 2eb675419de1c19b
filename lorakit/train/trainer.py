"""The training loop: one function a reader can follow from the first batch to the last checkpoint.

Per optimizer step: accumulate gradients over `gradient_accumulation_steps` micro-batches, refuse a non-finite
loss, clip, set the scheduled learning rate, run the step hooks around `optimizer.step()`, log, evaluate,
checkpoint. Data order is a seeded permutation per epoch, so the step number alone says where the data stands.

Under `torchrun` the model is replicated with DistributedDataParallel, or with `fsdp="full_shard"` sharded with
torch's `fully_shard` (FSDP2: each decoder block, found by transformers' `_no_split_modules`, then the root; frozen
base weights are sharded too, so a base too big for one device trains on several):

    torchrun --nproc_per_node 2 -m lorakit -- train --config run.yaml --fsdp full_shard

Checkpoints, the best weights and the saved adapter hold whole tensors (gathered from the shards), the same files
a single process writes. In a single process `fsdp` changes nothing. Under FSDP the optimizer sees DTensor shards:
AdamW and SGD are tested; optimizers or step hooks that work on whole weight matrices (GaLore, LoRA-Pro), rank
evaluations and quantized bases are not supported.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Optional, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError, TrainingError
from . import checkpoint
from .args import TrainingArguments
from .devices import device_of, to_device
from .distributed import Processes, full_tensor, is_sharded, lockstep_batches, shard_model
from .reporting import Reporter
from .tasks import Task, format_number


class StepHook(Protocol):
    """Called once when training (re)starts, around each optimizer step, and once when training ends (normally or
    by an error). Variants (as adapter modules) and user objects may implement any of these. A hook may add numbers
    to the record of the step being taken with `trainer.add_step_metrics` (that record is then always logged)."""

    def before_training(self, trainer: "Trainer") -> None: ...

    def before_optimizer_step(self, trainer: "Trainer") -> None: ...

    def after_optimizer_step(self, trainer: "Trainer") -> None: ...

    def after_training(self, trainer: "Trainer") -> None: ...


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at `step` (0-based), as transformers' schedules."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return max(0.0, 1.0 - progress)


def default_optimizer(model: nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
    """`args.optim` (a registered name, `lorakit.optim`) with `args.optim_args`, over the trainable parameters."""
    from ..optim import make_optimizer

    return make_optimizer(args.optim, model, args, **args.optim_args)


def text_length(row) -> int:
    """Characters of every string in an example, nested ones included (a chat's messages, not only its reply:
    measuring the reply alone sorted instruct batches by answer, i.e. by class)."""
    if isinstance(row, str):
        return len(row)
    if isinstance(row, dict):
        return sum(text_length(v) for v in row.values())
    if isinstance(row, (list, tuple)):
        return sum(text_length(v) for v in row)
    return 0


class Trainer:
    """Trains the trainable parameters of `model` (adapters, saved heads) on `train_data` for a `task`.

    `optimizer`: any torch optimizer over the trainable parameters (default AdamW from `args`); each param
    group's own `lr` is the base its schedule scales. `hooks`: extra `StepHook`s; adapter modules that define
    `before_training`/`before_optimizer_step`/`after_optimizer_step`/`after_training` are registered automatically;
    `args.attention_logit_every` adds an `AttentionLogitMonitor` (`lorakit.analysis.attention_logits`).
    """

    def __init__(self, model: nn.Module, task: Task, args: TrainingArguments, train_data, eval_data=None,
                 optimizer: Optional[torch.optim.Optimizer] = None, hooks: Iterable[StepHook] = ()):
        self.model, self.task, self.args = model, task, args
        self.train_data, self.eval_data = train_data, eval_data
        self.procs = Processes.from_env()
        self.wrapped = model  # the DistributedDataParallel wrapper under DDP, made when training starts
        self.device = device_of(model)
        self.optimizer = optimizer or default_optimizer(model, args)
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.hooks = list(hooks) + [m for m in model.modules() if _is_hook(m)]
        if _is_hook(self.optimizer):  # an optimizer that acts around each step (projector refresh, ...)
            self.hooks.append(self.optimizer)
        if args.attention_logit_every:  # --attention-logit-every N
            from ..analysis.attention_logits import AttentionLogitMonitor

            self.hooks.append(AttentionLogitMonitor(args.attention_logit_every))
        self._step_metrics: dict[str, float] = {}  # what hooks add to the record of the step being taken
        self.output_dir = Path(args.output_dir)
        self.reporter = Reporter(args.report_to, self.output_dir)  # reporting hook (--report-to): reporting.py
        self.metric, self.greater_is_better = _best_model_metric(args.metric_for_best_model, task)
        self.step, self.best, self.best_state, self.evals_without_gain = 0, None, None, 0
        self.history: list[dict] = []
        self.evaluated: dict[str, float] = {}  # eval_* metrics of the weights the model holds now, when known
        self._best_metrics: dict[str, float] = {}
        self._order: tuple[Optional[int], list[int]] = (None, [])  # (epoch, its example order)

    # ---- data order --------------------------------------------------------------------------
    @property
    def micro_batch(self) -> int:
        return self.args.per_device_train_batch_size * self.procs.world_size

    @property
    def usable_examples(self) -> int:
        """Examples per epoch: all, or only full micro-batches (always under DDP, so shards stay equal)."""
        n = len(self.train_data)
        drop_last = self.args.dataloader_drop_last or self.procs.world_size > 1
        return n // self.micro_batch * self.micro_batch if drop_last else n

    @property
    def steps_per_epoch(self) -> int:
        n = len(self.train_data)
        micro = math.ceil(self.usable_examples / self.micro_batch)
        if micro == 0:
            raise TrainingError(f"{n} training examples make no full batch of {self.micro_batch}")
        return math.ceil(micro / self.args.gradient_accumulation_steps)

    @property
    def total_steps(self) -> int:
        if self.args.max_steps > 0:
            return self.args.max_steps
        return max(1, math.ceil(self.args.num_train_epochs * self.steps_per_epoch))

    @property
    def warmup_steps(self) -> int:
        return self.args.warmup_steps or math.ceil(self.args.warmup_ratio * self.total_steps)

    def epoch_order(self, epoch: int) -> list[int]:
        """A seeded permutation of the training examples; with `group_by_length`, each run of 50 micro-batches
        is sorted by length (longest first), as transformers' length-grouped sampler, so batches pad less."""
        if self._order[0] == epoch:  # asked for at every step; drawn once per epoch
            return self._order[1]
        order = torch.randperm(len(self.train_data), generator=torch.Generator().manual_seed(
            self.args.seed * 100_003 + epoch)).tolist()
        if self.args.group_by_length:
            lengths = [text_length(self.train_data[i]) for i in range(len(self.train_data))]
            mega = 50 * self.micro_batch
            order = [i for start in range(0, len(order), mega)
                     for i in sorted(order[start:start + mega], key=lambda j: -lengths[j])]
        self._order = (epoch, order)
        return order

    def micro_batches(self, step: int) -> list[list[int]]:
        """This process's example indices for each micro-batch of optimizer step `step`."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        accum, size, per = self.args.gradient_accumulation_steps, self.micro_batch, \
            self.args.per_device_train_batch_size
        usable = self.usable_examples
        out = []
        for m in range(within * accum, (within + 1) * accum):
            chunk = order[m * size: min((m + 1) * size, usable)]
            if chunk:
                out.append(chunk[self.procs.rank * per: (self.procs.rank + 1) * per])
        return out

    # ---- training ----------------------------------------------------------------------------
    def add_step_metrics(self, values: dict[str, float]) -> None:
        """Numbers a step hook adds to the record of the step being taken (logged with it, whatever logging_steps
        says)."""
        self._step_metrics.update(values)

    def train(self, resume: bool = False) -> list[dict]:
        """Run to `total_steps` (from the newest checkpoint when `resume`); returns the logged history. Every hook's
        `after_training` runs at the end, also when training stops with an error."""
        try:
            return self._train(resume)
        finally:
            for hook in self.hooks:
                getattr(hook, "after_training", _noop)(self)

    def _train(self, resume: bool) -> list[dict]:
        args, procs = self.args, self.procs
        if procs.world_size > 1 and self.wrapped is self.model and not is_sharded(self.model):
            if args.fsdp:
                self._shard()
            else:
                self.wrapped = nn.parallel.DistributedDataParallel(self.model)
        if resume:
            self._resume()
        else:
            torch.manual_seed(args.seed)
            if procs.is_main:
                self._write_metrics([])
        total = self.total_steps
        warmup = self.warmup_steps
        bar = tqdm(total=total, initial=self.step, desc="training", unit="step", dynamic_ncols=True,
                   disable=args.disable_tqdm or not procs.is_main)
        self.wrapped.train()
        for hook in self.hooks:  # e.g. DyLoRA draws the rank of the step a (resumed) run starts at
            getattr(hook, "before_training", _noop)(self)
        patience = args.early_stopping_patience
        stop = bool(patience) and self.evals_without_gain >= patience  # a resumed run that had stopped early
        while self.step < total and not stop:
            started = time.perf_counter()
            loss, examples = self._accumulate(self.micro_batches(self.step))
            grad_norm = self._clip()
            if not math.isfinite(loss) or not math.isfinite(grad_norm):
                last = checkpoint.latest(self.output_dir / "checkpoints")
                raise TrainingError(f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at "
                                    f"step {self.step + 1} (loss={loss}); parameters were not updated. Last good "
                                    f"checkpoint: {last or 'none yet'}. Try a lower learning rate.")
            factor = lr_factor(self.step, total, warmup, args.lr_scheduler_type)
            for group in self.optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
            for hook in self.hooks:
                getattr(hook, "before_optimizer_step", _noop)(self)
            self.optimizer.step()
            for hook in self.hooks:
                getattr(hook, "after_optimizer_step", _noop)(self)
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            seconds = time.perf_counter() - started
            record = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), "loss": loss,
                      "learning_rate": self.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                      "seconds": round(seconds, 4), "examples_per_second": round(examples / seconds, 2),
                      **self._step_metrics}
            from_hooks, self._step_metrics = bool(self._step_metrics), {}
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['learning_rate']:.2e}",
                            ex_s=f"{record['examples_per_second']:.0f}")
            if self._eval_due(total):
                metrics = self.evaluate(self.eval_data, prefix="eval")
                record.update(metrics)
                stop = self._track_best(metrics)
                self.wrapped.train()
            logging_due = args.logging_steps and self.step % args.logging_steps == 0  # 0: evaluations and the end
            if logging_due or from_hooks or "eval_" + self.metric in record or self.step == total:
                self._log(record)
            if stop or self.step == total or (args.save_steps and self.step % args.save_steps == 0):
                self.save_checkpoint()
        bar.close()
        self.reporter.close()  # reporting hook (--report-to)
        last_eval = self.history[-1] if self.history and "eval_" + self.metric in self.history[-1] else {}
        self.evaluated = {k: v for k, v in last_eval.items() if k.startswith("eval_")} \
            if last_eval.get("step") == self.step else {}
        if args.load_best_model_at_end and self.best_state is not None:
            checkpoint.load_trainable_state(self.model, self.optimizer, self.best_state)
            self.evaluated = self._best_metrics  # (empty after a resume: the best run's metrics are not saved)
        self.wrapped.eval()
        return self.history

    def _accumulate(self, micro: list[list[int]]) -> tuple[float, int]:
        total_loss, examples = 0.0, 0
        for i, indices in enumerate(micro):
            batch = to_device(self.task.collate([self.train_data[j] for j in indices]), self.device)
            last = i == len(micro) - 1
            sync = contextlib.nullcontext() if last or self.procs.world_size == 1 else self._no_sync()
            with sync:
                loss = self.task.loss(self.wrapped, batch)
                (loss / len(micro)).backward()
            total_loss += loss.item() / len(micro)
            examples += len(indices)
        return self.procs.mean(total_loss), int(self.procs.sum(torch.tensor([examples])).item())

    def _no_sync(self):
        """Skip the gradient all-reduce of a micro-batch that is not the step's last (DDP); FSDP reduce-scatters
        every micro-batch's gradients into the shards."""
        return contextlib.nullcontext() if is_sharded(self.model) else self.wrapped.no_sync()

    def _shard(self) -> None:
        """FSDP: shard the model in place, then point the optimizer at the sharded parameters (same names)."""
        if self.optimizer.state:
            raise TrainingError("fsdp: the model must be sharded before the optimizer's first step")
        names = {id(p): n for n, p in self.model.named_parameters()}
        shard_model(self.model)
        sharded = dict(self.model.named_parameters())
        for group in self.optimizer.param_groups:
            group["params"] = [sharded[names[id(p)]] for p in group["params"]]

    def _clip(self) -> float:
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return 0.0
        norm = full_tensor(torch.nn.utils.get_total_norm([p.grad for p in params]))  # (FSDP: over all shards)
        torch.nn.utils.clip_grads_with_norm_(params, self.args.max_grad_norm or float("inf"), norm)
        return float(norm)

    def _eval_due(self, total: int) -> bool:
        if self.eval_data is None:
            return False
        every = self.args.eval_steps or self.steps_per_epoch
        return self.step % every == 0 or self.step == total

    def _track_best(self, metrics: dict[str, float]) -> bool:
        """Remember the best evaluation; True when early stopping says stop."""
        value = metrics["eval_" + self.metric]
        better = self.best is None or (value > self.best if self.greater_is_better else value < self.best)
        if better:
            self.best, self.evals_without_gain = value, 0
            self.best_state = checkpoint.trainable_state(self.model, self.optimizer)
            self._best_metrics = dict(metrics)
        else:
            self.evals_without_gain += 1
        patience = self.args.early_stopping_patience
        return bool(patience) and self.evals_without_gain >= patience

    def evaluate(self, dataset, prefix: str = "eval") -> dict[str, float]:
        return evaluate(self.model, self.task, dataset, self.args.per_device_eval_batch_size, prefix, self.procs,
                        progress=not self.args.disable_tqdm)

    # ---- files ---------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        trainable = checkpoint.trainable_state(self.model, self.optimizer)  # every rank: FSDP gathers the shards
        optimizer = checkpoint.optimizer_state(self.optimizer)
        if self.procs.is_main:
            progress = {"step": self.step, "best": self.best, "evals_without_gain": self.evals_without_gain}
            checkpoint.save(self.output_dir / "checkpoints", trainable, optimizer, progress, self.best_state,
                            keep=self.args.save_total_limit)  # --save-total-limit
        self.procs.barrier()

    def _resume(self) -> None:
        found = checkpoint.latest(self.output_dir / "checkpoints")
        if found is None:
            raise TrainingError(f"--resume: no checkpoint under {self.output_dir / 'checkpoints'}")
        progress, self.best_state = checkpoint.restore(found, self.model, self.optimizer)
        self.step, self.best = progress["step"], progress["best"]
        self.evals_without_gain = progress["evals_without_gain"]
        self.history = [r for r in read_metrics(self.metrics_path) if r["step"] <= self.step]
        if self.procs.is_main:  # lines logged after the checkpoint will be logged again
            self._write_metrics(self.history)

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    def _log(self, record: dict) -> None:
        """Keep a step's record, append it to `metrics.jsonl` and, without a progress bar, print it on stderr."""
        self.history.append(record)
        if self.procs.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.args.disable_tqdm:
                print(progress_line(record, self.total_steps), file=sys.stderr, flush=True)
            self.reporter.log(record)  # reporting hook (--report-to)

    def _write_metrics(self, records: list[dict]) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, self.metrics_path)


def progress_line(record: dict, total: int) -> str:
    """A logged step as one line: step, loss, learning rate, and the evaluation's metrics when it made one."""
    parts = [f"step {record['step']}/{total}", f"loss {format_number(record['loss'])}",
             f"lr {format_number(record['learning_rate'])}"]
    parts += [f"{k} {format_number(v)}" for k, v in record.items() if k.startswith("eval_")]
    return "  ".join(parts)


def read_metrics(path: Path) -> list[dict]:
    """The records of a `metrics.jsonl`, stopping at a line cut short by a kill."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, dataset, batch_size: int = 64, prefix: str = "eval",
             procs: Processes = Processes(), progress: bool = False) -> dict[str, float]:
    """Metrics of `model` on `dataset`, each process evaluating a shard; keys are `<prefix>_<metric>`.
    `progress`: a progress bar (main process, evaluations of more than one batch; it vanishes when done)."""
    was_training = model.training
    model.eval()
    mine = task.eval_order(dataset, list(range(procs.rank, len(dataset), procs.world_size)))
    device = device_of(model)
    stats = None
    extra = lockstep_batches(model, math.ceil(len(mine) / batch_size), procs)  # FSDP: every rank as many forwards
    starts = range(0, len(mine), batch_size)
    bar = tqdm(starts, desc=prefix, unit="batch", leave=False, dynamic_ncols=True,
               disable=not progress or not procs.is_main or len(starts) < 2)
    for start in bar:
        batch = to_device(task.collate([dataset[j] for j in mine[start:start + batch_size]]), device)
        s = task.stats(model, batch).cpu()
        stats = s if stats is None else stats + s
    for _ in range(extra):
        s = torch.zeros_like(task.stats(model, to_device(task.collate([dataset[0]]), device)).cpu())
        stats = s if stats is None else stats
    if stats is None:  # an empty shard contributes zeros of the right shape
        stats = torch.zeros_like(task.stats(model, to_device(task.collate([dataset[0]]), device)).cpu())
    model.train(was_training)
    return {f"{prefix}_{k}": v for k, v in task.metrics(procs.sum(stats)).items()}



LOWER_IS_BETTER = ("loss", "mse", "perplexity")


def _best_model_metric(name: Optional[str], task: Task) -> tuple[str, bool]:
    """(metric, greater_is_better) for early stopping and the best model; `name` may carry the `eval_` prefix."""
    metric = (name or task.main_metric).removeprefix("eval_")
    names = getattr(task, "metric_names", (task.main_metric,))
    if metric not in names:
        raise ConfigError(f"metric_for_best_model={name!r} is not a {task.name} metric; "
                            f"choose one of {', '.join(names)}")
    return metric, task.greater_is_better if metric == task.main_metric else metric not in LOWER_IS_BETTER


def _is_hook(obj) -> bool:
    return any(callable(getattr(obj, name, None))
               for name in ("before_training", "before_optimizer_step", "after_optimizer_step", "after_training"))


def _noop(trainer: Trainer) -> None:
    pass
