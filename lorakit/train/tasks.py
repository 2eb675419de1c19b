"""Tasks: how a batch is built, what the loss is, and which metrics an evaluation reports.

Evaluation sums *sufficient statistics* per batch (a confusion matrix; sums of errors and products; token
log-likelihoods), so shards evaluated on different processes combine exactly with one all-reduce.
"""
from __future__ import annotations

import functools
import inspect
import math
import re

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .devices import device_of
from .distributed import Processes, is_sharded

IGNORE = -100  # label id the loss skips (prompt and padding tokens)
MIN_SHARED_PREFIX = 8  # leading ids every row of a batch must share before they run once (`Instruct._forward`)


class Task:
    name: str
    main_metric: str
    greater_is_better: bool
    metric_names: tuple[str, ...]  # the keys of `metrics()`

    def __init__(self, tokenizer, max_length: int, num_labels: int = 0):
        self.tokenizer, self.max_length, self.num_labels = tokenizer, max_length, num_labels

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, model, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def stats(self, model, batch: dict) -> torch.Tensor:
        """Summable float64 statistics of one evaluation batch."""
        raise NotImplementedError

    def metrics(self, stats: torch.Tensor) -> dict[str, float]:
        raise NotImplementedError

    def eval_order(self, dataset, indices: list[int]) -> list[int]:
        """The order to evaluate `indices` in (statistics are sums, so any order gives the same metrics)."""
        return indices

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt"))


class Classification(Task):
    """Sequence classification. Besides `accuracy` and `f1` (binary: F1 of the positive class, label 1; more
    classes: macro F1), an evaluation reports `macro_f1`, `majority_class_rate` (the share of the split's most
    frequent gold label: the accuracy of always predicting it) and `predicted_share_<label>` (the share of examples
    predicted as each label), so a model that predicts one class shows as such."""

    name, main_metric, greater_is_better = "classification", "accuracy", True
    metric_names = ("accuracy", "f1", "macro_f1", "majority_class_rate")

    def collate(self, examples):
        batch = self._encode([e["text"] for e in examples])
        batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
        return batch

    def _logits(self, model, batch):
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits

    def loss(self, model, batch):
        return F.cross_entropy(self._logits(model, batch).float(), batch["labels"])

    def stats(self, model, batch):
        k = self.num_labels
        pred = self._logits(model, batch).argmax(-1)
        confusion = torch.bincount(batch["labels"] * k + pred, minlength=k * k)
        return confusion.double()

    def metrics(self, stats):
        return confusion_metrics(stats.view(self.num_labels, self.num_labels))


def confusion_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """Classification metrics of a k×k confusion matrix (rows: true label, columns: prediction)."""
    k = len(confusion)
    n = confusion.sum().clamp(min=1)
    tp = confusion.diag()
    precision = tp / confusion.sum(0).clamp(min=1)
    recall = tp / confusion.sum(1).clamp(min=1)
    f1 = torch.where(tp > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), 0.0)
    # macro F1 over the classes that occur in the labels or the predictions (as scikit-learn's default)
    present = (confusion.sum(0) + confusion.sum(1)) > 0
    macro = (f1[present].mean() if present.any() else f1.sum()).item()
    shares = (confusion.sum(0) / n).tolist()
    return {"accuracy": (tp.sum() / n).item(), "f1": f1[1].item() if k == 2 else macro, "macro_f1": macro,
            "majority_class_rate": (confusion.sum(1).max() / n).item(),
            **{f"predicted_share_{label}": share for label, share in enumerate(shares)}}


PREDICTED_SHARE = "predicted_share_"


def single_class_warning(results: dict, prefix: str) -> str | None:
    """A warning when the `<prefix>_*` classification metrics in `results` come from predicting one class for
    every example; None otherwise (or when there are no such metrics)."""
    start = f"{prefix}_{PREDICTED_SHARE}"
    only = [k.removeprefix(start) for k, v in results.items() if k.startswith(start) and v == 1.0]
    if not only:
        return None
    accuracy, majority = results[f"{prefix}_accuracy"], results[f"{prefix}_majority_class_rate"]
    return (f"{prefix}: the model predicts class {only[0]} for every example; {prefix}_accuracy "
            f"{format_number(accuracy)} is only that class's share of the split (majority-class rate "
            f"{format_number(majority)}) and {prefix}_f1 {format_number(results[f'{prefix}_f1'])} is a constant "
            f"predictor's")


def format_number(value) -> str:
    """A result as printed: floats with 4 significant digits and every digit of their whole part (`2e-05`,
    `0.6808`, `1235`, `12346`), anything else as is."""
    if not isinstance(value, float):
        return str(value)
    whole = len(str(int(abs(value)))) if abs(value) < 1e12 else 0  # (False for inf and nan)
    return f"{value:.{max(4, whole)}g}"


class Regression(Classification):
    name, main_metric, greater_is_better = "regression", "mse", False
    metric_names = ("mse", "pearson")

    def collate(self, examples):
        batch = self._encode([e["text"] for e in examples])
        batch["labels"] = torch.tensor([float(e["label"]) for e in examples])
        return batch

    def loss(self, model, batch):
        return F.mse_loss(self._logits(model, batch).float().squeeze(-1), batch["labels"])

    def stats(self, model, batch):
        x, y = self._logits(model, batch).double().squeeze(-1), batch["labels"].double()
        return torch.stack([torch.tensor(float(len(y)), dtype=torch.float64), ((x - y) ** 2).sum(), x.sum(),
                            y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum()])

    def metrics(self, stats):
        n, sq, sx, sy, sxx, syy, sxy = stats.tolist()
        cov, vx, vy = sxy - sx * sy / n, sxx - sx * sx / n, syy - sy * sy / n
        pearson = cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else float("nan")
        return {"mse": sq / n, "pearson": pearson}


class CausalLM(Task):
    """Prompt/completion pairs: the model reads both, the loss counts only completion tokens (and EOS)."""

    name, main_metric, greater_is_better = "causal-lm", "perplexity", False
    metric_names = ("loss", "perplexity")

    def collate(self, examples):
        tok = self.tokenizer
        rows, labels = [], []
        for e in examples:
            prompt = tok(e["prompt"], add_special_tokens=False)["input_ids"]
            completion = tok(e["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            prompt = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + prompt
            ids = (prompt + completion)[: self.max_length]
            rows.append(ids)
            labels.append(([IGNORE] * len(prompt) + completion)[: self.max_length])
        width = max(map(len, rows))
        pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
        return {"input_ids": torch.tensor([pad(r, tok.pad_token_id) for r in rows]),
                "attention_mask": torch.tensor([pad([1] * len(r), 0) for r in rows]),
                "labels": torch.tensor([pad(lab, IGNORE) for lab in labels])}

    def _token_nll(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return _nll(logits[:, :-1], batch["labels"][:, 1:])

    def loss(self, model, batch):
        nll, count = self._token_nll(model, batch)
        return nll / count.clamp(min=1)

    def stats(self, model, batch):
        nll, count = self._token_nll(model, batch)
        return torch.stack([nll.double(), count.double()])

    def metrics(self, stats):
        nll, count = stats.tolist()
        loss = nll / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700))}


class Instruct(CausalLM):
    """Chat instructions (`lorakit.data.ChatDataset`): the prompt is the conversation in the tokenizer's chat template
    with the generation prompt; the loss covers only the reply and its end-of-turn token (EOS).

    Batches are padded on the left, so every reply ends at the last position and the LM head runs only on the
    last positions that hold reply tokens (`logits_to_keep`; the head of a small LLM is a fifth of its weights).
    Position ids count real tokens only, so padding does not move a row's positions. The prompt prefix all rows of a
    batch share (system prompt, instruction, shots) runs once per batch (`share_prefix`, see `_forward`).

    With `choices` (a closed label set such as negative/positive) every model is also scored two ways:
    label scoring (`accuracy`: the choice whose tokens have the highest total log-probability after the prompt)
    and, while `generate` is set, greedy generation (`generation_accuracy`: the first choice word in the reply,
    case-insensitive; a reply with none counts as wrong and as `unparseable`). Label scoring also reports what
    classification does (`confusion_metrics`): `f1`, `macro_f1`, `majority_class_rate` (the share of the most
    frequent gold label) and `predicted_share_<k>` per choice index.
    """

    name = "instruct"
    max_new_tokens = 16
    share_prefix = True  # run the prompt prefix all rows of a batch share once (`_forward`); False: whole rows

    def __init__(self, tokenizer, max_length: int, num_labels: int = 0, choices=()):
        super().__init__(tokenizer, max_length, num_labels)
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"the instruct task needs a tokenizer with a chat template; "
                              f"{tokenizer.name_or_path!r} has none")
        self.choices = tuple(choices)
        self.generate = False  # set for a final evaluation: greedy replies too (slower)
        if self.choices:
            self.main_metric, self.greater_is_better = "accuracy", True
            self.metric_names = ("loss", "perplexity", "accuracy", "f1", "macro_f1", "majority_class_rate",
                                 "generation_accuracy", "unparseable")
            self.choice_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in self.choices]
            self._words = {c.lower(): i for i, c in enumerate(self.choices)}

    # ---- batches -----------------------------------------------------------------------------
    def prompt_ids(self, messages: list[dict]) -> list[int]:
        tok = self.tokenizer
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]

    def collate(self, examples):
        tok = self.tokenizer
        rows, labels, prompts = [], [], []
        for e in examples:
            reply = tok(e["response"], add_special_tokens=False)["input_ids"][: self.max_length - 1]
            reply.append(tok.eos_token_id)
            prompt = self.prompt_ids(e["messages"])[-(self.max_length - len(reply)):]  # keep the prompt's end
            rows.append(prompt + reply)
            labels.append([IGNORE] * len(prompt) + reply)
            prompts.append(prompt)
        batch = dict(_left_pad(rows, tok.pad_token_id), labels=_left_pad(labels, IGNORE)["input_ids"],
                     prompts=prompts)
        if self.choices:
            batch["choice"] = torch.tensor([e.get("label", -1) for e in examples])
        return batch

    def eval_order(self, dataset, indices):
        """Longest first, so batches pad little (and memory peaks at once)."""
        size = lambda j: sum(len(m["content"]) for m in dataset[j]["messages"])  # noqa: E731
        return sorted(indices, key=lambda j: -size(j))

    # ---- model calls -------------------------------------------------------------------------
    def _forward(self, model, input_ids, attention_mask, keep: int, use_cache: bool = False):
        """(logits of the last `keep` positions, the KV cache or None, the attention mask over all cached positions).

        The head runs only on those positions when the model supports it. The prompt prefix that every row shares
        (system prompt, instruction: most of a short prompt) runs once, as one row, and its keys and values are
        repeated over the rows (`_shared_length` says when); the rows' own tokens run after it. Causal attention
        makes this the same computation as the whole rows, up to floating-point summation order.
        """
        inner = getattr(model, "module", model)
        shared = self._shared_length(model, input_ids, attention_mask, keep)
        position_ids, extra = (attention_mask.cumsum(-1) - 1).clamp(min=0), {}
        if shared:
            start = int(attention_mask[0].argmax())  # every row's real tokens begin with the same `shared` ids
            cache = _cache_of(inner.get_decoder()(input_ids=input_ids[:1, start:start + shared], use_cache=True))
            cache.batch_repeat_interleave(len(input_ids))
            rest = attention_mask[:, :-shared]  # each row's tokens after the prefix, padded on the left again
            input_ids = input_ids[:, shared:].masked_fill(rest == 0, self.tokenizer.pad_token_id)
            position_ids = shared + (rest.cumsum(-1) - 1).clamp(min=0)
            attention_mask = torch.cat([rest.new_ones(len(rest), shared), rest], 1)
            extra[_cache_keyword(model)] = cache
        if _accepts(inner, "logits_to_keep"):  # as indices, so the head gets a contiguous (rows·keep, hidden) input
            width = input_ids.shape[1]  # (a slice would make matmul broadcast the head's weight over the rows)
            extra["logits_to_keep"] = torch.arange(width - keep, width, device=input_ids.device)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=use_cache or bool(shared), **extra)
        return out.logits[:, -keep:], _cache_of(out) if use_cache else None, attention_mask

    def _shared_length(self, model, input_ids, attention_mask, keep: int) -> int:
        """How many leading ids all rows share and may run once. 0 without `share_prefix`, for a single row, for a
        prefix shorter than `MIN_SHARED_PREFIX`, on a sharded (FSDP) model (every rank must make the same forward
        calls), and for training forwards whose gradient or randomness would change (active dropout; gradient
        checkpointing, which drops caches; DDP, which expects one forward per backward). At most the shortest row
        less `keep`, so the kept logits come from each row's own tokens."""
        if not self.share_prefix or len(input_ids) < 2 or not _cache_keyword(model) or is_sharded(model):
            return 0
        if torch.is_grad_enabled() and model.training and _train_forward_must_be_whole(model):
            return 0
        lengths = attention_mask.sum(-1)
        limit = int(lengths.min()) - keep
        if limit < MIN_SHARED_PREFIX:
            return 0
        starts = input_ids.shape[1] - lengths  # left padding: where each row's tokens begin
        aligned = input_ids.gather(1, starts[:, None] + torch.arange(limit, device=input_ids.device))
        shared = int((aligned == aligned[:1]).all(0).int().cumprod(0).sum())
        return shared if shared >= MIN_SHARED_PREFIX else 0

    def _last_logits(self, model, input_ids, attention_mask, keep: int):
        return self._forward(model, input_ids, attention_mask, keep)[0]

    def _reply_logits(self, model, batch):
        """(logits predicting each reply token, their targets): the last positions that hold reply tokens."""
        labels = batch["labels"]
        span = labels.shape[1] - int((labels != IGNORE).int().argmax(-1).min())  # longest reply (+ EOS)
        logits = self._last_logits(model, batch["input_ids"], batch["attention_mask"], span + 1)
        return logits[:, :-1], labels[:, -span:]

    def _token_nll(self, model, batch):
        return _nll(*self._reply_logits(model, batch))

    def _choice_scores(self, model, prompts: list[list[int]], first: torch.Tensor | None = None) -> torch.Tensor:
        """(rows, choices) total log-probability of each choice's tokens after each prompt. `first`: the logits
        at each prompt's last position, when already computed (enough when every choice is one token)."""
        if first is not None and all(len(c) == 1 for c in self.choice_ids):
            return first.float().log_softmax(-1)[:, [c[0] for c in self.choice_ids]]
        columns = []
        for ids in self.choice_ids:
            padded = _left_pad([p + ids for p in prompts], self.tokenizer.pad_token_id)
            device = device_of(model)
            logits = self._last_logits(model, padded["input_ids"].to(device), padded["attention_mask"].to(device),
                                       len(ids) + 1)
            logp = logits[:, :-1].float().log_softmax(-1)
            columns.append(logp.gather(-1, torch.tensor(ids, device=logp.device).expand(len(prompts), -1)[..., None])
                           .sum((1, 2)))
        return torch.stack(columns, 1)

    # ---- evaluation --------------------------------------------------------------------------
    def stats(self, model, batch):
        """[nll, tokens] (+ the label-scoring confusion k×k and the generation outcomes k×(k+1) with choices)."""
        if self.choices and self.generate:
            return self._generation_stats(model, batch)
        logits, target = self._reply_logits(model, batch)
        head = torch.stack([t.double() for t in _nll(logits, target)])
        if not self.choices:
            return head
        reply_len = (target != IGNORE).sum(1)  # the prompt's last position predicts the first reply token
        first = logits[torch.arange(len(target)), target.shape[1] - reply_len]
        scores = self._choice_scores(model, batch["prompts"], first)
        k = len(self.choices)
        no_generation = torch.zeros(k * (k + 1), dtype=torch.float64)
        return torch.cat([head, self._confusion(batch["choice"], scores.argmax(-1).cpu(), k), no_generation])

    def _generation_stats(self, model, batch):
        tok, k = self.tokenizer, len(self.choices)
        padded = _left_pad(batch["prompts"], tok.pad_token_id)
        device = device_of(model)
        logits, cache, mask = self._forward(model, padded["input_ids"].to(device), padded["attention_mask"].to(device),
                                            1, use_cache=True)
        scores = self._choice_scores(model, batch["prompts"], logits[:, -1])
        replies = self._greedy_replies(model, logits, cache, mask)
        parsed = torch.tensor([self.parse(r) for r in replies])
        gold = batch["choice"]
        return torch.cat([torch.zeros(2, dtype=torch.float64), self._confusion(gold, scores.argmax(-1).cpu(), k),
                          self._confusion(gold, parsed, k, k + 1)])

    def _greedy_replies(self, model, logits, cache, mask) -> list[str]:
        """Greedy replies from the prompts' last logits and KV cache (`_forward`), as transformers' `generate`
        gives them: at most `max_new_tokens`; a row ends at EOS or once it holds a whole choice word (a later token
        cannot change `parse`) and takes padding after. Ended rows leave the batch (and the cache), except on a
        sharded (FSDP) model, where every forward gathers weights from all ranks: there all ranks step together
        until none has a row left (transformers' `synced_gpus`)."""
        tok = self.tokenizer
        synced = is_sharded(model) and Processes.from_env().world_size > 1
        rows = torch.arange(len(mask), device=mask.device)  # the rows in the batch
        live = torch.ones(len(mask), dtype=torch.bool, device=mask.device)
        tokens = torch.full((len(mask), self.max_new_tokens), tok.pad_token_id, device=mask.device)
        position = mask.sum(-1, keepdim=True)
        for step in range(self.max_new_tokens):
            token = logits[:, -1].argmax(-1).masked_fill(~live, tok.pad_token_id)
            tokens[rows, step] = token
            replies = tok.batch_decode(tokens[rows, :step + 1], skip_special_tokens=True)
            live &= (token != tok.eos_token_id) & torch.tensor([not self._decided(r) for r in replies],
                                                              device=token.device)
            if step == self.max_new_tokens - 1 or not _on_any_rank(live.any(), synced):
                break
            if not synced and not live.all():
                cache.batch_select_indices(live.nonzero().squeeze(1))
                rows, token, mask, position, live = rows[live], token[live], mask[live], position[live], live[live]
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
            logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, use_cache=True,
                           **{_cache_keyword(model): cache}).logits
            position = position + 1
        return tok.batch_decode(tokens, skip_special_tokens=True)

    def parse(self, reply: str) -> int:
        """The index of the first choice word in a reply; len(choices) when there is none."""
        first = self._first_choice_word(reply)
        return self._words[first.group()] if first else len(self.choices)

    def _first_choice_word(self, reply: str):
        return next((m for m in re.finditer(r"[^\W_]+", reply.lower()) if m.group() in self._words), None)

    def _decided(self, reply: str) -> bool:
        """Whether a reply holds a whole choice word (one followed by another character)."""
        first = self._first_choice_word(reply)
        return first is not None and first.end() < len(reply)

    @staticmethod
    def _confusion(gold, pred, k, columns=None):
        """Counts of (gold, predicted) over the examples with a known gold label; `columns` predicted values
        (default k; k + 1 for generation, whose last column is unparseable)."""
        columns = columns or k
        known = gold >= 0
        return torch.bincount(gold[known] * columns + pred[known], minlength=k * columns).double()

    def metrics(self, stats):
        nll, count = stats[:2].tolist()
        out = super().metrics(stats[:2]) if count else {}
        if not self.choices:
            return out
        k = len(self.choices)
        confusion = stats[2:2 + k * k].view(k, k)
        if confusion.sum().item():  # label scoring: accuracy, F1s, majority rate, predicted shares
            out.update(confusion_metrics(confusion))
        outcomes = stats[2 + k * k:].view(k, k + 1)
        g = outcomes.sum().item()
        if g:
            out.update(generation_accuracy=outcomes[:, :k].trace().item() / g,
                       unparseable=outcomes[:, k].sum().item() / g)
        return out


def _train_forward_must_be_whole(model) -> bool:
    """Whether a training forward must run whole rows (see `Instruct._shared_length`)."""
    if hasattr(model, "module") or Processes.from_env().world_size > 1:
        return True
    return any(getattr(m, "gradient_checkpointing", False) is True  # transformers' flag on checkpointed layers
               or isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training for m in model.modules())


def _on_any_rank(flag: torch.Tensor, synced: bool) -> bool:
    """`flag`, or with `synced` whether it holds on any process."""
    if synced:
        flag = flag.to(torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag)


def _cache_keyword(model) -> str | None:
    """The forward's name for a KV cache to continue from (`cache` since transformers 5.2x); None when the model
    takes none or has no decoder to run a prefix without the head."""
    inner = getattr(model, "module", model)
    if not hasattr(inner, "get_decoder"):
        return None
    return next((name for name in ("cache", "past_key_values") if _accepts(inner, name)), None)


def _cache_of(output):
    return output["cache"] if "cache" in output else output["past_key_values"]


def _nll(logits, target):
    """(summed cross-entropy over the non-ignored targets, their count)."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), target, ignore_index=IGNORE, reduction="sum")
    return nll, (target != IGNORE).sum()


def _left_pad(rows: list[list[int]], value: int) -> dict[str, torch.Tensor]:
    width = max(map(len, rows))
    return {"input_ids": torch.tensor([[value] * (width - len(r)) + r for r in rows]),
            "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])}


@functools.lru_cache(maxsize=None)
def _forward_parameters(cls) -> frozenset:
    return frozenset(inspect.signature(cls.forward).parameters)


def _accepts(model, name: str) -> bool:
    return name in _forward_parameters(type(model))


TASKS = {t.name: t for t in (Classification, Regression, CausalLM, Instruct)}


def make_task(name: str, tokenizer, max_length: int, num_labels: int = 0, choices=()) -> Task:
    if name == "instruct":
        return Instruct(tokenizer, max_length, num_labels, choices)
    return TASKS[name](tokenizer, max_length, num_labels)
