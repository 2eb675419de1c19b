"""lorakit.train.Trainer in-process: schedules, accumulation, clipping, hooks, early stopping, metrics, checkpoints.

Every run uses the tiny seeded Llama (no dropout of its own) with a trained BPE tokenizer and a LoRA adapter whose
B starts non-zero, so each step changes the loss.
"""
import json
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.data import CompletionDataset, TextDataset
from lorakit.errors import ConfigError, TrainingError
from lorakit.models import tiny_llama, train_tokenizer
from lorakit.train import checkpoint
from lorakit.train.args import TrainingArguments
from lorakit.train.distributed import Processes
from lorakit.train.tasks import IGNORE, Classification, Regression, make_task
from lorakit.train.trainer import Trainer, evaluate, lr_factor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_rng = random.Random(0)
_GOOD, _BAD = ["good", "great", "lovely", "superb", "warm"], ["bad", "awful", "dull", "grim", "cold"]
_NOUNS = ["film", "plot", "actor", "story", "scene", "music", "ending"]
TEXTS = [f"the {_rng.choice(_NOUNS)} was {_rng.choice(_GOOD if i % 2 else _BAD)}" + " very" * (i % 4)
         for i in range(48)]
LABELS = [i % 2 for i in range(48)]
TOKENIZER = train_tokenizer(TEXTS + ["prompt: ", " answer"], vocab_size=300)


def build(task="classification", num_labels=2, dropout=0.0, seed=0, r=4, adapter_seed=None):
    """A tiny Llama for `task` (weights from `seed`) with a non-zero LoRA adapter on q/v (+ the head to train)."""
    tok = TOKENIZER
    model = tiny_llama(len(tok), task, num_labels, seed, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed + 1 if adapter_seed is None else adapter_seed)
    lorakit.inject(model, lorakit.AdapterConfig(r=r, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                                                task_type="CAUSAL_LM" if task == "causal-lm" else "SEQ_CLS"))
    return model


def data(n=32, task="classification"):
    if task == "regression":
        return TextDataset(TEXTS[:n], [float(y) * 2 - 1 + 0.1 * i / n for i, y in enumerate(LABELS[:n])],
                           "regression", 1)
    return TextDataset(TEXTS[:n], LABELS[:n])


def targs(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), disable_tqdm=True, save_steps=0, per_device_train_batch_size=8,
                learning_rate=1e-2, max_steps=4)
    return TrainingArguments(**{**base, **kw})


def trainer_for(tmp_path, model=None, task="classification", train=None, eval_data=None, **kw):
    model = model if model is not None else build(task)
    t = make_task(task, TOKENIZER, 32, 2 if task == "classification" else 1)
    return Trainer(model, t, targs(tmp_path, **kw), train if train is not None else data(task=task), eval_data)


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def same(a, b, tol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= tol * max(1.0, b[k].abs().max().item()), k


class Recorder:
    """A StepHook logging the learning rates and calls it sees."""

    def __init__(self, log=None, tag="r"):
        self.log, self.tag, self.lrs, self.trainers = log if log is not None else [], tag, [], []

    def before_optimizer_step(self, trainer):
        self.trainers.append(trainer)
        self.lrs.append([g["lr"] for g in trainer.optimizer.param_groups])
        self.log.append(("before", self.tag, trainer.step))

    def after_optimizer_step(self, trainer):
        self.log.append(("after", self.tag, trainer.step))


# ---- learning-rate schedules --------------------------------------------------------------------
def _hf_schedule(name, warmup, total):
    from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                              get_linear_schedule_with_warmup)

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    make = {"linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup,
            "constant": get_constant_schedule_with_warmup}[name]
    sched = make(opt, warmup, total) if name != "constant" else make(opt, warmup)
    out = []
    for _ in range(total):  # the lr each optimizer step uses
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("name", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup,total", [(0, 1), (0, 7), (3, 10), (10, 10), (4, 25)])
def test_lr_factor_matches_transformers(name, warmup, total):
    ours = [lr_factor(s, total, warmup, name) for s in range(total)]
    assert ours == pytest.approx(_hf_schedule(name, warmup, total), abs=1e-12)


@pytest.mark.parametrize("name", ["linear", "cosine", "constant"])
def test_trainer_applies_schedule_over_a_run(tmp_path, name):
    rec = Recorder()
    tr = trainer_for(tmp_path, lr_scheduler_type=name, warmup_ratio=0.3, max_steps=9, learning_rate=2e-3)
    tr.hooks.insert(0, rec)
    history = tr.train()
    expected = [2e-3 * f for f in _hf_schedule(name, math.ceil(0.3 * 9), 9)]
    assert [lrs[0] for lrs in rec.lrs] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert [r["learning_rate"] for r in history] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert [r["step"] for r in history] == list(range(1, 10))


def test_user_optimizer_keeps_per_group_base_lrs(tmp_path):
    """A LoRA+-style SGD with B at 8x the lr of A: each group's lr is its own base times the schedule."""
    model = build()
    params = dict(model.named_parameters())
    a = [p for n, p in params.items() if p.requires_grad and "lora_A" in n]
    rest = [p for n, p in params.items() if p.requires_grad and "lora_A" not in n]
    opt = torch.optim.SGD([{"params": a, "lr": 0.01}, {"params": rest, "lr": 0.08}], lr=0.5, momentum=0.9)
    rec = Recorder()
    task = make_task("classification", TOKENIZER, 32, 2)
    tr = Trainer(model, task, targs(tmp_path, lr_scheduler_type="cosine", warmup_steps=2, max_steps=6), data(),
                 optimizer=opt, hooks=[rec])
    before = trainable(model)
    tr.train()
    for step, lrs in enumerate(rec.lrs):
        f = lr_factor(step, 6, 2, "cosine")
        assert lrs == pytest.approx([0.01 * f, 0.08 * f], rel=1e-12, abs=1e-15)
    assert tr.optimizer is opt and opt.state  # the given optimizer did the stepping (momentum buffers)
    assert any(not torch.equal(before[n], p) for n, p in trainable(model).items())


# ---- accumulation, clipping, non-finite losses --------------------------------------------------
def test_gradient_accumulation_equals_big_batch(tmp_path):
    big = trainer_for(tmp_path / "big", per_device_train_batch_size=16, max_steps=4)
    acc = trainer_for(tmp_path / "acc", per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=4)
    h_big, h_acc = big.train(), acc.train()
    assert big.steps_per_epoch == acc.steps_per_epoch == 2
    assert [r["loss"] for r in h_acc] == pytest.approx([r["loss"] for r in h_big], abs=1e-5)
    assert [r["grad_norm"] for r in h_acc] == pytest.approx([r["grad_norm"] for r in h_big], rel=1e-4)
    same(trainable(acc.model), trainable(big.model), tol=1e-5)
    assert len({r["loss"] for r in h_big}) == 4  # the loss moved: the comparison is not of constants


def test_accumulation_with_a_short_last_micro_batch(tmp_path):
    """36 examples, micro-batches of 8, accumulation 2: 5 micro-batches per epoch → 3 steps, the last of one."""
    tr = trainer_for(tmp_path, train=data(36), per_device_train_batch_size=8, gradient_accumulation_steps=2,
                     max_steps=3)
    assert tr.steps_per_epoch == 3
    sizes = [[len(m) for m in tr.micro_batches(s)] for s in range(3)]
    assert sizes == [[8, 8], [8, 8], [4]]
    seen = sorted(i for s in range(3) for m in tr.micro_batches(s) for i in m)
    assert seen == list(range(36))
    assert tr.micro_batches(3) != tr.micro_batches(0)  # a new epoch is a new permutation


def test_ddp_shards_partition_the_single_process_batch(tmp_path):
    """Under 2 processes each rank takes its half of the same global micro-batch (incomplete ones dropped)."""
    single = trainer_for(tmp_path, train=data(36), per_device_train_batch_size=8, dataloader_drop_last=True)
    ranks = [trainer_for(tmp_path, train=data(36), per_device_train_batch_size=4) for _ in range(2)]
    for rank, tr in enumerate(ranks):
        tr.procs = Processes(rank, 2)
    assert single.steps_per_epoch == ranks[0].steps_per_epoch == 4
    for step in range(8):
        one = single.micro_batches(step)
        two = [r.micro_batches(step) for r in ranks]
        assert [a + b for a, b in zip(*two)] == one


def test_clipping_caps_the_grad_norm(tmp_path):
    norms = []

    class Norm:
        def before_optimizer_step(self, trainer):
            grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    tr = trainer_for(tmp_path / "clip", max_grad_norm=0.05)
    tr.hooks.append(Norm())
    history = tr.train()
    assert all(r["grad_norm"] > 0.05 for r in history)  # logged: the norm before clipping
    assert norms == pytest.approx([0.05] * 4, rel=1e-4)
    norms.clear()
    tr = trainer_for(tmp_path / "free", max_grad_norm=0.0)
    tr.hooks.append(Norm())
    history = tr.train()
    assert norms == pytest.approx([r["grad_norm"] for r in history], rel=1e-5)
    assert max(norms) > 0.05


class Poisoned(Classification):
    """Classification whose loss becomes `value` from the `at`-th call on."""

    def __init__(self, at, value):
        super().__init__(TOKENIZER, 32, 2)
        self.at, self.value, self.calls = at, value, 0

    def loss(self, model, batch):
        self.calls += 1
        loss = super().loss(model, batch)
        return loss * self.value if self.calls >= self.at else loss


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_loss_stops_with_state_intact(tmp_path, value):
    model = build()
    snapshots = {}

    class Snap:
        def after_optimizer_step(self, trainer):
            snapshots[trainer.step + 1] = trainable(trainer.model)

    tr = Trainer(model, Poisoned(at=4, value=value), targs(tmp_path, save_steps=2, max_steps=8), data(),
                 hooks=[Snap()])
    with pytest.raises(TrainingError, match=r"non-finite loss at step 4\b.*checkpoint-2"):
        tr.train()
    assert tr.step == 3 and sorted(snapshots) == [1, 2, 3]
    same(trainable(model), snapshots[3])  # the failed step changed nothing
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "checkpoints")] == ["checkpoint-2"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in lines)
    fresh = build(adapter_seed=5)
    resumed = Trainer(fresh, make_task("classification", TOKENIZER, 32, 2), targs(tmp_path, max_steps=8), data())
    resumed._resume()
    assert resumed.step == 2
    same(trainable(fresh), snapshots[2])


# ---- hooks ----------------------------------------------------------------------------------------
def test_step_hooks_run_in_order_around_the_optimizer_step(tmp_path):
    log = []
    model = build()

    class Hooked(type(next(m for m in model.modules() if isinstance(m, lorakit.variants.Variant)))):
        def after_optimizer_step(self, trainer):
            log.append(("after", "variant", trainer.step))

    variants = [m for m in model.modules() if isinstance(m, lorakit.variants.Variant)]
    assert len(variants) == 4  # q_proj and v_proj in 2 layers
    variants[0].__class__ = Hooked  # an adapter module defining the hook is registered without being passed
    first, second = Recorder(log, "first"), Recorder(log, "second")
    tr = Trainer(model, make_task("classification", TOKENIZER, 32, 2), targs(tmp_path, max_steps=2), data(),
                 hooks=[first, second])
    step = tr.optimizer.step
    seen = []

    def spy(*a, **kw):
        seen.append(trainable(model))
        log.append(("optimizer.step", None, tr.step))
        return step(*a, **kw)

    tr.optimizer.step = spy
    params = []
    first.before_optimizer_step = lambda t, f=first.before_optimizer_step: (params.append(trainable(t.model)), f(t))
    tr.train()
    per_step = [("before", "first"), ("before", "second"), ("optimizer.step", None), ("after", "first"),
                ("after", "second"), ("after", "variant")]
    assert log == [(*e, s) for s in range(2) for e in per_step]
    assert all(t is tr for t in first.trainers + second.trainers)
    for p, s in zip(params, seen):  # before-hooks see the parameters the optimizer is about to update
        same(p, s)
    assert any(not torch.equal(params[1][n], params[0][n]) for n in params[0])


# ---- evaluation, early stopping, best model -------------------------------------------------------
def _scripted(base, values, key=None):
    """A task of class `base` whose evaluations report `values` in turn for metric `key` (default: the main one)."""

    class Scripted(base):
        calls = 0

        def metrics(self, stats):
            out = super().metrics(stats)
            out[key or self.main_metric] = values[Scripted.calls]
            Scripted.calls += 1
            return out

    return Scripted(TOKENIZER, 32, 2 if base is Classification else 1)


@pytest.mark.parametrize("task,values", [("classification", [0.5, 0.8, 0.6, 0.8, 0.79, 0.9, 0.95]),
                                         ("regression", [0.5, 0.2, 0.4, 0.2, 0.21, 0.1, 0.05])])
@pytest.mark.parametrize("load_best", [True, False])
def test_early_stopping_and_best_model(tmp_path, task, values, load_best):
    """Patience 3: best at evaluation 2, no gain at 3, 4 (a tie) and 5 → stop after step 5, best restored."""
    model = build(task, num_labels=2 if task == "classification" else 1)
    snapshots = {}

    class Snap:
        def after_optimizer_step(self, trainer):
            snapshots[trainer.step + 1] = trainable(trainer.model)

    t = _scripted(Classification if task == "classification" else Regression, values)
    tr = Trainer(model, t, targs(tmp_path, max_steps=20, eval_steps=1, early_stopping_patience=3,
                                 load_best_model_at_end=load_best, logging_steps=2), data(task=task),
                 data(8, task), hooks=[Snap()])
    history = tr.train()
    metric = "eval_" + t.main_metric
    assert tr.step == 5 and [r[metric] for r in history] == values[:5]
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5]  # evaluation steps are logged whatever logging_steps
    assert tr.best == values[1]
    same(trainable(model), snapshots[2] if load_best else snapshots[5])
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "checkpoints")] == ["checkpoint-5"]
    again = Trainer(build(task, num_labels=2 if task == "classification" else 1), t, tr.args, data(task=task),
                    data(8, task))
    assert again.train(resume=True) == history and again.step == 5  # a resumed early stop stays stopped


def test_best_model_metric_sets_its_own_direction(tmp_path):
    """Regression with metric_for_best_model=pearson: higher is better, though the task's own mse is lower-better."""
    values = [0.1, 0.6, 0.3, 0.2, 0.5]
    model = build("regression", num_labels=1)
    snapshots = {}

    class Snap:
        def after_optimizer_step(self, trainer):
            snapshots[trainer.step + 1] = trainable(trainer.model)

    tr = Trainer(model, _scripted(Regression, values, "pearson"),
                 targs(tmp_path, max_steps=5, eval_steps=1, metric_for_best_model="eval_pearson"),
                 data(task="regression"), data(8, "regression"), hooks=[Snap()])
    tr.train()
    assert tr.best == 0.6 and tr.evals_without_gain == 3
    same(trainable(model), snapshots[2])
    with pytest.raises(ConfigError, match="metric_for_best_model='acc'.*accuracy, f1"):
        trainer_for(tmp_path, metric_for_best_model="acc")


def test_best_state_survives_resume(tmp_path):
    values = [0.5, 0.8, 0.6, 0.6, 0.6, 0.6]
    model = build()
    tr = Trainer(model, _scripted(Classification, values), targs(tmp_path, max_steps=4, eval_steps=1,
                                                                  save_steps=3, early_stopping_patience=3),
                 data(), data(8))

    class Crash:
        def after_optimizer_step(self, trainer):
            if trainer.step == 3:
                raise KeyboardInterrupt

    tr.hooks.append(Crash())
    with pytest.raises(KeyboardInterrupt):
        tr.train()
    t2 = _scripted(Classification, values[3:])
    resumed = Trainer(build(adapter_seed=3), t2, tr.args, data(), data(8))
    resumed.train(resume=True)
    assert resumed.best == 0.8 and resumed.step == 4 and resumed.evals_without_gain == 2
    same(trainable(resumed.model), tr.best_state)


def _rows(model, ids_list):
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([ids])).logits for ids in ids_list])


@pytest.mark.parametrize("k", [2, 3])
def test_classification_metrics_match_a_hand_count(k):
    model = build("classification", num_labels=k, seed=k)
    n = 23
    labels = [(i * 7) % k for i in range(n)]
    ds = TextDataset(TEXTS[:n], labels, num_labels=k)
    got = evaluate(model, make_task("classification", TOKENIZER, 32, k), ds, batch_size=5, prefix="val")
    pred = _rows(model, [TOKENIZER(t)["input_ids"] for t in TEXTS[:n]]).argmax(-1).tolist()
    assert len(set(pred)) > 1, "degenerate predictions make a weak test"
    f1 = []
    for c in range(k):
        tp = sum(p == c and y == c for p, y in zip(pred, labels))
        fp = sum(p == c and y != c for p, y in zip(pred, labels))
        fn = sum(p != c and y == c for p, y in zip(pred, labels))
        f1.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    assert got["val_accuracy"] == pytest.approx(sum(p == y for p, y in zip(pred, labels)) / n, abs=1e-12)
    assert got["val_f1"] == pytest.approx(f1[1] if k == 2 else sum(f1) / k, abs=1e-12)
    assert not model.training


def test_macro_f1_averages_over_classes_that_occur():
    """As scikit-learn: a class absent from both labels and predictions does not count in the macro mean."""
    task = Classification(TOKENIZER, 32, 3)
    confusion = torch.tensor([[3, 1, 0], [2, 4, 0], [0, 0, 0]], dtype=torch.float64)  # rows: true, cols: pred
    f1 = [2 * 3 / (6 + 2 + 1), 2 * 4 / (8 + 1 + 2)]
    got = task.metrics(confusion.flatten())
    assert got["f1"] == pytest.approx(sum(f1) / 2) and got["accuracy"] == pytest.approx(7 / 10)


def test_regression_metrics_match_numpy():
    model = build("regression", num_labels=1, seed=2)
    n = 21
    targets = [math.sin(i) * 2 for i in range(n)]
    ds = TextDataset(TEXTS[:n], targets, "regression", 1)
    got = evaluate(model, make_task("regression", TOKENIZER, 32, 1), ds, batch_size=4)
    pred = _rows(model, [TOKENIZER(t)["input_ids"] for t in TEXTS[:n]]).squeeze(-1).double().numpy()
    y = np.array(targets)
    assert got["eval_mse"] == pytest.approx(float(np.mean((pred - y) ** 2)), rel=1e-5)
    assert got["eval_pearson"] == pytest.approx(float(np.corrcoef(pred, y)[0, 1]), rel=1e-4, abs=1e-5)


def test_perplexity_is_exp_mean_completion_nll():
    model = build("causal-lm")
    prompts = ["prompt: the film was", "prompt: a", "prompt: the plot was dull and the music"]
    completions = [" answer good", " answer great story very very", " answer bad"]
    ds = CompletionDataset(prompts * 3, completions[::-1] * 3)
    task = make_task("causal-lm", TOKENIZER, 64)
    got = evaluate(model, task, ds, batch_size=4)
    nll, count = 0.0, 0
    for p, c in zip(ds.prompts, ds.completions):
        prompt = [TOKENIZER.bos_token_id] + TOKENIZER(p, add_special_tokens=False)["input_ids"]
        target = TOKENIZER(c, add_special_tokens=False)["input_ids"] + [TOKENIZER.eos_token_id]
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=torch.tensor([prompt + target])).logits[0].double(), -1)
        for i, tok in enumerate(target):  # position len(prompt)-1+i predicts target[i]; prompt tokens not scored
            nll -= logp[len(prompt) - 1 + i, tok].item()
        count += len(target)
    assert got["eval_loss"] == pytest.approx(nll / count, rel=1e-5)
    assert got["eval_perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    batch = task.collate([ds[0]])  # the loss the trainer minimises is the same masked mean
    n_prompt = len(TOKENIZER(prompts[0], add_special_tokens=False)["input_ids"]) + 1
    assert (batch["labels"][0, :n_prompt] == IGNORE).all() and (batch["labels"][0, n_prompt:] != IGNORE).all()


# ---- checkpoints and resume ---------------------------------------------------------------------
def test_in_process_resume_matches_an_uninterrupted_run(tmp_path):
    """With lora_dropout 0.1 the restored RNG decides the dropout masks: the resumed curve must be identical."""

    def run(out, crash_at=None):
        model = build(dropout=0.1)
        tr = Trainer(model, make_task("classification", TOKENIZER, 32, 2),
                     targs(out, max_steps=7, save_steps=2, lr_scheduler_type="cosine", warmup_steps=2),
                     data(), data(8))

        class Crash:
            def after_optimizer_step(self, trainer):
                if trainer.step == crash_at:
                    raise KeyboardInterrupt

        tr.hooks.append(Crash())
        try:
            tr.train()
        except KeyboardInterrupt:
            torch.manual_seed(1234)  # the process's RNG moves on; resume must not depend on it
            tr = Trainer(build(dropout=0.1, adapter_seed=9), tr.task, tr.args, data(), data(8))
            tr.train(resume=True)
        return tr

    # dies in step 6: checkpoint-4 is the newest, metrics.jsonl already has step 5, which is redone
    full, resumed = run(tmp_path / "full"), run(tmp_path / "cut", crash_at=5)
    a, b = ([json.loads(x) for x in (t.output_dir / "metrics.jsonl").read_text().splitlines()] for t in (full, resumed))
    assert [r["step"] for r in b] == list(range(1, 8))
    for ra, rb in zip(a, b):
        assert rb["loss"] == ra["loss"] and rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-6)
        assert rb.get("eval_accuracy") == ra.get("eval_accuracy")
    same(trainable(resumed.model), trainable(full.model))


def test_resume_restores_optimizer_state(tmp_path):
    tr = trainer_for(tmp_path, max_steps=3, save_steps=3)
    tr.train()
    fresh = trainer_for(tmp_path, model=build(adapter_seed=4), max_steps=3)
    fresh._resume()
    a, b = tr.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a["state"][i][key], b["state"][i][key])


@pytest.fixture
def finished(tmp_path):
    """A run that stopped at step 2 with checkpoint-2 on disk."""
    trainer_for(tmp_path, max_steps=2, save_steps=1).train()
    assert [p.name for p in checkpoint.checkpoints(tmp_path / "checkpoints")] == ["checkpoint-2"]
    return tmp_path


@pytest.mark.parametrize("name,damage", [("trainable.safetensors", "truncate"), ("optimizer.pt", "truncate"),
                                         ("rng.safetensors", "garble"), ("progress.json", "truncate"),
                                         ("trainable.safetensors", "delete"), ("optimizer.pt", "garble"),
                                         ("trainable.safetensors", "garble"), ("progress.json", "garble")])
def test_damaged_checkpoint_is_a_training_error(finished, name, damage):
    path = finished / "checkpoints" / "checkpoint-2" / name
    if damage == "delete":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 3: len(raw) // 3 + 64] = b"\xff" * 64
        path.write_bytes(bytes(raw))
    tr = trainer_for(finished, max_steps=4)
    with pytest.raises(TrainingError, match="checkpoint-2"):
        tr.train(resume=True)


def test_checkpoint_of_another_adapter_shape_is_a_training_error(finished):
    other = build(r=2)
    with pytest.raises(TrainingError, match="shape"):
        trainer_for(finished, model=other, max_steps=4).train(resume=True)


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(TrainingError, match="no checkpoint under"):
        trainer_for(tmp_path / "nothing", max_steps=2).train(resume=True)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(TEXTS, LABELS)))
    from lorakit.cli import main

    code = main(["train", "--model", "tiny-llama", "--data", str(path), "--output-dir", str(tmp_path / "o"),
                 "--max-steps", "2", "--disable-tqdm", "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "--resume" in err and "no checkpoint" in err


def test_checkpoints_are_atomic(tmp_path, monkeypatch):
    tr = trainer_for(tmp_path, max_steps=2, save_steps=1)
    tr.train()
    ckpts = tmp_path / "checkpoints"
    (ckpts / ".tmp-checkpoint-x1y2").mkdir()  # what a kill during a save leaves behind
    (ckpts / ".tmp-checkpoint-x1y2" / "trainable.safetensors").write_bytes(b"partial")
    (ckpts / "checkpoint-7.tmp").mkdir()
    assert checkpoint.latest(ckpts).name == "checkpoint-2"
    # a save that fails half-way leaves no checkpoint-3 and no temporary folder, and checkpoint-2 intact
    import lorakit.train.checkpoint as ck

    real = ck.save_file
    calls = []

    def failing(tensors, path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(tensors, path, *a, **kw)

    monkeypatch.setattr(ck, "save_file", failing)
    before = {p.name for p in ckpts.iterdir()}
    tr.step = 3
    with pytest.raises(OSError, match="disk full"):
        tr.save_checkpoint()
    assert {p.name for p in ckpts.iterdir()} == before
    monkeypatch.undo()
    resumed = trainer_for(tmp_path, model=build(adapter_seed=7), max_steps=3)
    resumed.train(resume=True)
    assert resumed.step == 3 and checkpoint.latest(ckpts).name == "checkpoint-3"


@pytest.mark.parametrize("every,logged", [(3, [3, 5, 6, 7]), (0, [5, 7])])
def test_logging_steps_and_metrics_file(tmp_path, every, logged):
    """Lines every `logging_steps` (0: none), plus each evaluation and the last step."""
    tr = trainer_for(tmp_path, max_steps=7, logging_steps=every, eval_steps=5, eval_data=data(8))
    history = tr.train()
    assert [r["step"] for r in history] == logged
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == json.loads(json.dumps(history))
    assert ["eval_accuracy" in r for r in lines] == [r["step"] in (5, 7) for r in lines]
    assert all(math.isfinite(r["loss"]) and r["seconds"] > 0 for r in lines)


def test_group_by_length_sorts_within_megabatches_and_keeps_every_example(tmp_path):
    texts = [("word " * random.Random(i).randint(1, 40)).strip() for i in range(300)]
    train = TextDataset(texts, [i % 2 for i in range(300)])
    grouped = trainer_for(tmp_path, train=train, per_device_train_batch_size=2, group_by_length=True)
    plain = trainer_for(tmp_path, train=train, per_device_train_batch_size=2)
    for epoch in (0, 1):
        order = grouped.epoch_order(epoch)
        assert sorted(order) == list(range(300))  # each example exactly once per epoch
        mega = 50 * 2
        for start in range(0, 300, mega):
            chunk = order[start:start + mega]
            assert [len(texts[i]) for i in chunk] == sorted((len(texts[i]) for i in chunk), reverse=True)
            assert set(chunk) == set(plain.epoch_order(epoch)[start:start + mega])  # same seeded draw, reordered
    assert grouped.epoch_order(0) != grouped.epoch_order(1)


def test_group_by_length_measures_a_chat_by_its_messages_not_its_reply(tmp_path):
    """Instruct rows: the length is the whole conversation; by the reply alone, batches sorted by answer (class)."""
    from lorakit.data import ChatDataset
    from lorakit.train.trainer import text_length

    rng = random.Random(0)
    texts = [("word " * rng.randint(1, 40)).strip() for _ in range(200)]
    chats = ChatDataset.from_texts(texts, [i % 2 for i in range(200)], ("no", "absolutely"))
    grouped = trainer_for(tmp_path, train=chats, per_device_train_batch_size=2, group_by_length=True)
    order = grouped.epoch_order(0)
    assert sorted(order) == list(range(200))
    whole = [text_length(chats[i]) for i in order[:100]]
    assert whole == sorted(whole, reverse=True)
    assert text_length(chats[0]) > len(texts[0]) + len(chats[0]["response"])  # instruction + sentence + reply
    labels = [chats.labels[i] for i in order[:100]]
    assert 0 < sum(labels) < 100 and labels != sorted(labels, reverse=True)  # not grouped by answer


@pytest.mark.parametrize("quiet", [True, False])
def test_without_a_progress_bar_each_logged_step_prints_a_line(tmp_path, capsys, quiet):
    """`disable_tqdm`: one stderr line per logged step (step, loss, lr; the evaluation's metrics when it made one)."""
    tr = trainer_for(tmp_path, max_steps=7, logging_steps=3, eval_steps=5, eval_data=data(8), disable_tqdm=quiet,
                     learning_rate=2e-5)
    history = tr.train()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    if not quiet:
        assert lines == []
        return
    assert [line.split()[1] for line in lines] == ["3/7", "5/7", "6/7", "7/7"]
    for line, record in zip(lines, history):
        words = line.split()
        assert words[2:6] == ["loss", f"{record['loss']:.4g}", "lr", f"{record['learning_rate']:.4g}"]
        assert ("eval_accuracy" in words) == ("eval_accuracy" in record)
        if "eval_accuracy" in record:
            assert words[words.index("eval_macro_f1") + 1] == f"{record['eval_macro_f1']:.4g}"
