"""Per-example test predictions of a classifier, for the paired bootstrap: `test_predictions.jsonl` in a run folder,
one line per test example in the split's order: `index`, `label`, `predicted`, `probabilities` (softmax), and, when
the run was also scored at lower ranks, `predicted_at_rank` ({rank: predicted label})."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import DataError

PREDICTIONS = "test_predictions.jsonl"


@torch.no_grad()
def classify(model, task, dataset, batch_size: int = 64) -> list[dict]:
    """index, label, predicted, probabilities of every example of `dataset` (in order), model in eval mode."""
    from ..train.devices import device_of, to_device

    was_training = model.training
    model.eval()
    device, rows = device_of(model), []
    try:
        for start in range(0, len(dataset), batch_size):
            batch = to_device(task.collate([dataset[j] for j in range(start, min(start + batch_size, len(dataset)))]),
                              device)
            labels = batch.pop("labels")
            probs = torch.softmax(model(**batch).logits.float(), -1).cpu()
            for i, (p, y) in enumerate(zip(probs, labels.tolist())):
                rows.append({"index": start + i, "label": int(y), "predicted": int(p.argmax()),
                             "probabilities": [round(float(x), 7) for x in p]})
    finally:
        model.train(was_training)
    return rows


def classify_at_ranks(model, task, dataset, ranks, batch_size: int = 64) -> list[dict]:
    """`classify`, plus `predicted_at_rank` for each rank k (the adapter at rank k, `lorakit.rank.truncate`)."""
    from ..rank.truncate import at_rank

    rows = classify(model, task, dataset, batch_size)
    for k in ranks:
        with at_rank(model, int(k)):
            for row, low in zip(rows, classify(model, task, dataset, batch_size)):
                row.setdefault("predicted_at_rank", {})[str(int(k))] = low["predicted"]
    return rows


def predict_folder(adapter_dir: str | os.PathLike, config) -> list[dict]:
    """`classify` of a saved adapter folder on the test split of `config` (a `RunConfig`), loaded as `lorakit eval`
    loads it: on the adapter's `base_model_name_or_path` when that is a local folder, else on `config.model`."""
    from .. import load_adapter
    from ..models import load_model
    from ..train.run import _texts, adapter_base, load_splits, place
    from ..train.tasks import make_task

    spec = adapter_base(adapter_dir, config)
    splits = load_splits(config)
    model, tokenizer = load_model(spec, config.task, num_labels=splits.train.num_labels, seed=config.training.seed,
                                  texts=_texts(splits.train))
    model = place(model, config)
    load_adapter(model, adapter_dir, "default")
    task = make_task(config.task, tokenizer, config.training.max_length, splits.train.num_labels)
    return classify(model, task, splits.test, config.training.per_device_eval_batch_size)


def write_predictions(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Write atomically: a present file is always complete."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
    return path


def read_predictions(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read the predictions {path}: {e}") from None
    if [r.get("index") for r in rows] != list(range(len(rows))):
        raise DataError(f"{path}: the examples are not indexed 0..{len(rows) - 1} in order")
    return rows


def accuracy(rows: list[dict], rank: int | None = None) -> float:
    if not rows:
        raise DataError("no predictions")
    pick = (lambda r: r["predicted"]) if rank is None else (lambda r: r["predicted_at_rank"][str(rank)])
    return sum(pick(r) == r["label"] for r in rows) / len(rows)
