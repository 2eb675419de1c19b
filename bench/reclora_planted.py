"""RecLoRA on a synthetic planted per-user task: one shared LoRA, one LoRA per user, and a bank of N < K meta-LoRAs
mixed per user by a router (issue 19, item 5).

SYNTHETIC data, nothing real: K = 8 users, inputs x ~ N(0, I_32). User k has a planted "taste", a fixed random linear
map of the features: label = 1[v_kᵀx/‖v_k‖ + b_k > 0] (v_k ~ N(0, I), b_k ~ U(−0.5, 0.5), so classes are not exactly
balanced). Each example carries a description of its user, u = u_k + noise (u_k ~ N(0, I_16) fixed per user, noise
N(0, 0.5²) drawn per example, also on the test set). The frozen base is a random MLP 32 → 128 → 128 → 2 (GELU);
every method adapts its three Linear layers at r = 4, α = 8, and trains on the same batches with the same optimizer
(AdamW lr 3e-3, wd 0, batch 256, cross-entropy):
- shared LoRA: one weight set for everyone, blind to the user;
- per-user LoRA: K weight sets, each row of a batch routed to its user's adapter (`lorakit.route(adapter_names=)`):
  the per-user upper bound, with K times the parameters;
- RecLoRA: a bank of N = 4 meta-LoRAs per layer plus the per-layer gate (card defaults: hidden 60, dropout 0.1,
  τ = 1), fed u through `lorakit.route(conditions={"user": u})`; no user has a weight set of its own.
Reported on held-out examples: per-user accuracy (mean over users, and the worst user), trainable parameters and
weight sets, beside the majority-class baseline (each user's majority label in its training set).

Usage: `OMP_NUM_THREADS=1 .venv/bin/python bench/reclora_planted.py` (seeds 0 1 2, a few minutes at most on 2 cores);
`--smoke` for a ~20 s check (one seed, fewer examples and steps). Prints a Markdown table; writes nothing.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from common import markdown_table  # noqa: E402

import lorakit  # noqa: E402

K, D_X, HIDDEN, D_U, BANK, R, ALPHA = 8, 32, 128, 16, 4, 4, 8
NOISE, LR, BATCH = 0.5, 3e-3, 256
TARGETS = ["fc1", "fc2", "head"]


class Base(nn.Module):
    """The frozen random base: 32 → 128 → 128 → 2 logits."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(D_X, HIDDEN), nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, 2)

    def forward(self, x):
        return self.head(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


def base(seed: int) -> nn.Module:
    torch.manual_seed(1000 + seed)
    return Base()


def task(seed: int, n_train: int, n_test: int) -> dict:
    """Per-user tastes and descriptions, and train/test sets (x, user, u, label), users interleaved."""
    g = torch.Generator().manual_seed(seed)
    v, b = torch.randn(K, D_X, generator=g), torch.rand(K, generator=g) - 0.5
    v = v / v.norm(dim=1, keepdim=True)
    u_user = torch.randn(K, D_U, generator=g)

    def split(n):
        user = torch.arange(K).repeat(n)[torch.randperm(K * n, generator=g)]
        x = torch.randn(K * n, D_X, generator=g)
        label = ((x * v[user]).sum(1) + b[user] > 0).long()
        u = u_user[user] + NOISE * torch.randn(K * n, D_U, generator=g)
        return dict(x=x, user=user, u=u, label=label)
    return dict(train=split(n_train), test=split(n_test))


def config(variant="lora", **options):
    return lorakit.AdapterConfig(r=R, lora_alpha=ALPHA, variant=variant, target_modules=TARGETS, options=options)


class Method:
    """A model with its adapters and how a batch is routed through it."""

    def __init__(self, kind: str, seed: int):
        self.kind, self.model = kind, base(seed)
        torch.manual_seed(seed)
        if kind == "shared":
            lorakit.inject(self.model, config())
        elif kind == "per_user":
            for k in range(K):
                lorakit.inject(self.model, config(), f"user{k}")
        else:
            lorakit.inject(self.model, config("reclora", user_dim=D_U, bank_size=BANK))
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def __call__(self, batch: dict) -> torch.Tensor:
        if self.kind == "shared":
            return self.model(batch["x"])
        if self.kind == "per_user":
            with lorakit.route(self.model, [f"user{k}" for k in batch["user"].tolist()]):
                return self.model(batch["x"])
        with lorakit.route(self.model, conditions={"user": batch["u"]}):  # one user row per example
            return self.model(batch["x"])


def rows(data: dict, index) -> dict:
    return {k: t[index] for k, t in data.items()}


def per_user_accuracy(pred: torch.Tensor, data: dict) -> list[float]:
    right = (pred == data["label"]).float()
    return [right[data["user"] == k].mean().item() for k in range(K)]


def train_and_eval(kind: str, data: dict, seed: int, steps: int) -> tuple[list[float], int, float, Method]:
    method = Method(kind, seed)
    opt = torch.optim.AdamW(method.params, lr=LR, weight_decay=0.0)
    train, n = data["train"], data["train"]["x"].shape[0]
    g = torch.Generator().manual_seed(seed + 1)  # the same batches for every method
    order, at = torch.randperm(n, generator=g), 0
    method.model.train()
    start = time.perf_counter()
    for _ in range(steps):
        if at + BATCH > n:
            order, at = torch.randperm(n, generator=g), 0
        batch = rows(train, order[at:at + BATCH])
        at += BATCH
        loss = F.cross_entropy(method(batch), batch["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    method.model.eval()
    with torch.no_grad():
        pred = method(data["test"]).argmax(-1)
    return per_user_accuracy(pred, data["test"]), sum(p.numel() for p in method.params), seconds, method


def router_table(method: Method, test: dict) -> str:
    gate = method.model.fc1.adapters["default"]
    with torch.no_grad():
        w = gate.gate_weights(test["u"])
    rows_ = [[f"user {k}", *(f"{x:.2f}" for x in w[test["user"] == k].mean(0).tolist())] for k in range(K)]
    return markdown_table(["user", *(f"w_{j + 1}" for j in range(BANK))], rows_)


def majority(data: dict) -> list[float]:
    train, test = data["train"], data["test"]
    label = torch.stack([train["label"][train["user"] == k].float().mean() >= 0.5 for k in range(K)]).long()
    return per_user_accuracy(label[test["user"]], test)


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one seed, fewer examples and steps (~20 s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = args.seeds or ([0] if args.smoke else [0, 1, 2])
    n_train, n_test, steps = (256, 300, 500) if args.smoke else (512, 500, 1200)
    kinds = {"shared": "shared LoRA (user-blind)", "per_user": f"per-user LoRA ({K} weight sets, upper bound)",
             "reclora": f"RecLoRA: bank of N = {BANK} meta-LoRAs + router"}
    results = {k: ([], [], 0, 0.0) for k in ("majority", *kinds)}  # (mean accs, min accs, params, seconds)
    started = time.perf_counter()
    for seed in seeds:
        data = task(seed, n_train, n_test)
        accs = majority(data)
        results["majority"][0].append(statistics.mean(accs))
        results["majority"][1].append(min(accs))
        for kind in kinds:
            accs, params, seconds, method = train_and_eval(kind, data, seed, steps)
            if kind == "reclora":
                router = router_table(method, data["test"])
            means, mins, _, total = results[kind]
            means.append(statistics.mean(accs))
            mins.append(min(accs))
            results[kind] = (means, mins, params, total + seconds)
    table = [["majority class (per user)", "—", 0, mean_sd(results["majority"][0]), mean_sd(results["majority"][1]),
              "—"]]
    for kind, label in kinds.items():
        means, mins, params, seconds = results[kind]
        sets = K if kind == "per_user" else 1 if kind == "shared" else f"1 bank of {BANK}"
        table.append([label, sets, f"{params:,}", mean_sd(means), mean_sd(mins), f"{seconds / len(seeds):.1f}"])
    print(f"### RecLoRA on a SYNTHETIC planted per-user task{' (smoke run)' if args.smoke else ''}\n")
    print(f"K = {K} users with planted random linear tastes over {D_X} features; u = user embedding (d_u = {D_U}) + "
          f"noise σ = {NOISE}; frozen random MLP {D_X}→{HIDDEN}→{HIDDEN}→2, LoRA r = {R}, α = {ALPHA} on fc1, fc2, "
          f"head; {n_train} training and {n_test} held-out examples per user; {steps} AdamW steps (lr {LR}, batch "
          f"{BATCH}); seeds {seeds}{' (mean ± sd over seeds)' if len(seeds) > 1 else ''}.\n")
    print(markdown_table(["method", "weight sets", "trainable params", "held-out acc %, mean over users",
                          "held-out acc %, worst user", "train s / seed"], table))
    print(f"\nRouter output on fc1 (seed {seeds[-1]}): each user's mixing weights over the {BANK} meta-LoRAs, mean "
          f"over its held-out examples (what a server would apply per request):\n")
    print(router)
    print(f"\nTotal {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
