"""Tasks: how a batch is built, what the loss is, and which metrics an evaluation reports.

Evaluation sums *sufficient statistics* per batch (a confusion matrix; sums of errors and products; token
log-likelihoods), so shards evaluated on different processes combine exactly with one all-reduce.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = -100  # label id the loss skips (prompt and padding tokens)


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

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt"))


class Classification(Task):
    name, main_metric, greater_is_better = "classification", "accuracy", True
    metric_names = ("accuracy", "f1")

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
        k = self.num_labels
        confusion = stats.view(k, k)  # rows: true label, columns: prediction
        tp = confusion.diag()
        precision = tp / confusion.sum(0).clamp(min=1)
        recall = tp / confusion.sum(1).clamp(min=1)
        f1 = torch.where(tp > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), 0.0)
        # binary: F1 of the positive class (label 1); more classes: macro F1 over the classes that occur in the
        # labels or the predictions (both as scikit-learn's defaults)
        present = (confusion.sum(0) + confusion.sum(1)) > 0
        macro = f1[present].mean() if present.any() else f1.sum()
        return {"accuracy": (tp.sum() / confusion.sum().clamp(min=1)).item(),
                "f1": (f1[1] if k == 2 else macro).item()}


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
        target = batch["labels"][:, 1:]
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, ignore_index=IGNORE, reduction="sum")
        return nll, (target != IGNORE).sum()

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


TASKS = {t.name: t for t in (Classification, Regression, CausalLM)}


def make_task(name: str, tokenizer, max_length: int, num_labels: int = 0) -> Task:
    return TASKS[name](tokenizer, max_length, num_labels)
