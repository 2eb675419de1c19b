"""Retrieving SmolLM2 adapters for a request by their weights (AutoLoRA's weight encoder) vs by their description
(MiniLM), on a pool of small task adapters.

Usage: `.venv/bin/python bench/weight_retrieval.py [--train-only] [--smoke]`. Resumable: each pool adapter is one
`lorakit train` run in `runs/adapter_pool/<family>-s<seed>/`, skipped when finished; writes
`runs/composition/weight_retrieval.md`, which `bench/composition.py` puts into `docs/composition.md`.

Pool: 13 families — polarity, intensity and format (polarity in French) on each of the four VADER domains, and source
on all domains — × 2 seeds = 26 adapters, each LoRA r 4 (α 8) on q_proj and v_proj of SmolLM2's last 4 layers
(26–29; ≈ 31k values, the small layout of the transfer issue), 60 steps × 8 examples, lr 3e-3, bf16 base. Every
family has three captions (short, medium, long). The encoder (`lorakit.compose.retrieve.WeightEncoder`, MiniLM text
side) is trained on the seed-0 adapters' (adapter, caption) pairs and tested on the seed-1 adapters, which it never
saw: for each family, its test requests (the user message of 20 test examples) are embedded with MiniLM and matched
against (a) the seed-1 adapters' weight embeddings, (b) the families' descriptions (the baseline), (c) chance.
Unseen tasks: the encoder is trained again once per task with every family of that task left out (4 folds), and
only that task's requests are scored, against all 13 test adapters.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
POOL = ROOT / "runs" / "adapter_pool"
OUT = ROOT / "runs" / "composition" / "weight_retrieval.md"
DOMAINS = ("movies", "tweets", "amazon", "nyt")
SOURCE = {"movies": "movie reviews", "tweets": "tweets", "amazon": "product reviews", "nyt": "news editorials"}
TRAIN = ["--r", "4", "--lora-alpha", "8", "--target-modules", "q_proj", "v_proj", "--layers-to-transform", "26", "27",
         "28", "29", "--max-steps", "60", "--per-device-train-batch-size", "8", "--learning-rate", "3e-3", "--bf16",
         "--group-by-length", "false", "--max-eval-samples", "32", "--disable-tqdm"]
SEEDS = (0, 1)


def families() -> dict[str, tuple[str, list[str]]]:
    """{family: (data spec, [short, medium, long caption])}."""
    out = {}
    for d in DOMAINS:
        src = SOURCE[d]
        out[f"polarity-{d}"] = (f"vader-task:polarity@{d}", [
            f"sentiment of {src}", f"Classify {src} as positive or negative.",
            f"Reads {src} and answers whether the sentiment they express is positive or negative, in one word."])
        out[f"intensity-{d}"] = (f"vader-task:intensity@{d}", [
            f"sentiment strength of {src}", f"Rate how strong the sentiment of {src} is: strong or mild.",
            f"Reads {src} and answers whether the feeling they express is strong or only mild, in one word."])
        out[f"format-{d}"] = (f"vader-task:format@{d}", [
            f"French sentiment of {src}", f"Answer in French whether {src} are positive or negative.",
            f"Reads {src} and answers in French, positif or négatif, whether their sentiment is positive or negative."])
    out["source"] = ("vader-task:source", [
        "where a text comes from", "Tell whether a text is a movie review, a tweet, a product review or news.",
        "Reads a short text and answers which kind of source it comes from: a movie review, a tweet, a product "
        "review or a news editorial."])
    return out


def run_dir(family: str, seed: int) -> Path:
    return POOL / f"{family}-s{seed}"


def train_pool(fams: dict, seeds=SEEDS) -> None:
    for seed in seeds:
        for family, (spec, _) in fams.items():
            folder = run_dir(family, seed)
            if (folder / "adapter" / "adapter_config.json").is_file():
                continue
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "lorakit", "train", "--model", "smollm2", "--task", "instruct",
                            "--data", spec, "--seed", str(seed), "--output-dir", str(folder), *TRAIN],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            print(f"[pool] {family} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)


def requests(family: str, spec: str, n: int) -> list[str]:
    from lorakit import data_tasks

    names, domain = data_tasks.parse_spec(spec)
    data = data_tasks.task_split(names[0], "test", domain, limit=n)
    return [next(m["content"] for m in data[i]["messages"] if m["role"] == "user") for i in range(len(data))]


class _Fixed:
    """A retriever over given unit embeddings (the mean-caption baseline)."""

    def __init__(self, embeddings: torch.Tensor):
        self.embeddings = embeddings

    def retrieve(self, queries, k: int):
        from lorakit.compose.retrieve import retrieve

        return retrieve(queries, self.embeddings, k)


def unseen_task_picks(fams, names, train_adapters, test_adapters, task_of, q, gold, steps) -> torch.Tensor:
    """Top-1 picks (over all test adapters) for every request, each made by an encoder trained without any adapter
    of the request's task."""
    from lorakit.compose.retrieve import WeightEncoder, WeightIndex, layout_of, train_encoder

    picks = torch.full_like(gold, -1)
    for task in task_of.unique().tolist():
        seen = [j for j in range(len(names)) if task_of[j] != task]
        encoder = WeightEncoder(layout_of(train_adapters + test_adapters))
        train_encoder(encoder, [train_adapters[j] for j in seen], [fams[names[j]][1] for j in seen], steps=steps,
                      batch=len(seen))
        asked = task_of[gold] == task
        picks[asked] = WeightIndex(names, test_adapters, encoder).retrieve(q[asked], 1)[0][:, 0]
    return picks


def evaluate(fams: dict, n_requests: int, steps: int) -> str:
    from lorakit.compose.retrieve import (DescriptionIndex, WeightEncoder, WeightIndex, adapter_layers, layout_of,
                                          text_embeddings, train_encoder)

    names = list(fams)
    train_adapters = [adapter_layers(run_dir(f, 0) / "adapter") for f in names]
    test_adapters = [adapter_layers(run_dir(f, 1) / "adapter") for f in names]
    encoder = WeightEncoder(layout_of(train_adapters + test_adapters))
    before = WeightIndex(names, test_adapters, encoder)
    started = time.perf_counter()
    losses = train_encoder(encoder, train_adapters, [fams[f][1] for f in names], steps=steps, batch=len(names))
    seconds = time.perf_counter() - started
    captions = torch.stack([text_embeddings(fams[f][1]).mean(0) for f in names])
    indexes = {"weights, before training": before,
               "weights (AutoLoRA encoder)": WeightIndex(names, test_adapters, encoder),
               "description (MiniLM, the medium caption)": DescriptionIndex(names, [fams[f][1][1] for f in names]),
               "description (MiniLM, mean of the 3 captions)": _Fixed(torch.nn.functional.normalize(captions, dim=-1))}
    queries, gold = [], []
    for j, f in enumerate(names):
        texts = requests(f, fams[f][0], n_requests)
        queries += texts
        gold += [j] * len(texts)
    q = text_embeddings(queries)
    gold = torch.tensor(gold)
    task_of = torch.tensor([["polarity", "intensity", "format", "source"].index(f.split("-")[0]) for f in names])
    rows = []
    for label, index in indexes.items():
        picks = index.retrieve(q, 1)[0][:, 0]
        rows.append(f"| {label} | {(picks == gold).float().mean():.1%} | "
                    f"{(task_of[picks] == task_of[gold]).float().mean():.1%} |")
    chance_task = sum((task_of == t).sum().item() ** 2 for t in range(4)) / len(names) ** 2
    rows.append(f"| chance | {1 / len(names):.1%} | {chance_task:.1%} |")
    unseen = unseen_task_picks(fams, names, train_adapters, test_adapters, task_of, q, gold, steps)
    rows.insert(2, f"| weights, the request's task unseen in training (4 folds) | "
                   f"{(unseen == gold).float().mean():.1%} | {(task_of[unseen] == task_of[gold]).float().mean():.1%} |")
    return f"""## Retrieval by weights vs by description (`bench/weight_retrieval.py`)

{len(names)} adapter families × 2 seeds (LoRA r 4 on q_proj / v_proj of layers 26–29, 60 steps × 8 examples); the
weight encoder (AutoLoRA: a probe per layer through the factors, 2 transformer layers, InfoNCE against frozen MiniLM
caption embeddings) trained on the seed-0 adapters with 3 captions per family ({steps} steps, {seconds:.0f} s, loss
{losses[0]:.2f} → {sum(losses[-10:]) / 10:.2f}), tested on the seed-1 adapters it never saw. Requests: the user message
of {n_requests} test examples per family, embedded with MiniLM; *family* = the request's own family's adapter picked
(top-1 of {len(names)}); *task* = an adapter of the same task picked (any domain). The "unseen" row trains the
encoder 4 more times, each time without the adapters of one task, and scores that task's requests.

| retriever | family top-1 | task top-1 |
|---|---|---|
{chr(10).join(rows)}
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    fams = families()
    train_pool(fams)
    if args.train_only:
        return
    text = evaluate(fams, args.requests, args.steps)
    print(text)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)


if __name__ == "__main__":
    main()
