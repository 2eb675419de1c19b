"""Transferring and generating adapters without task data (issue 20), on SmolLM2 and the VADER instruct tasks.

Part 1, Trans-LoRA: the source is SmolLM2 with a task adapter of `docs/merging.md` (r 16 on all linear layers). Two
targets: SmolLM2 with 20 % of the MLP channels of layers 3–28 removed at random (`lorakit.rank.loram`; magnitude
scores break SmolLM2: see docs/transfer.md), and SmolLM2 with every decoder weight rounded to 4 bits (symmetric, one
absmax scale per 32 weights: llama.cpp's Q4_0 grid, stored dequantized). From 5 seed examples, SmolLM2 writes 288
inputs of the task's kind (`compose.transfer.synthesize`); a discriminator LoRA on the source learns the seeds vs 96
of them and keeps the real-like share of the other 192; the source + adapter labels the kept inputs; a LoRA on each
target learns them. Compared with the target alone, the source adapter carried over (sliced to the kept channels;
used as is on the 4-bit copy), a LoRA on the 5 seeds, and on the pruned target also the same distillation without
the filter and a LoRA on as many real examples (the upper bound).

Part 2, generators: the 13-family pool of `bench/transfer_pool.py` (r 4 on q / v of the last 4 layers, 30,720
values) with two families held out; ICM-LoRA (condition: the base model's task vector on 3-shot prompts) and
SG-LoRA (condition: the fused MiniLM embedding of the top-4 experts' descriptions) generate adapters for them, from
CVAEs trained on the other 11 families' trajectories (steps 30–60, 6 points each), at the authors' β = 0.005 and at
β = 1. Compared with the base, the nearest expert by description, the mixture of the top-4 experts (SG-LoRA's
weights), a LoRA on 32 examples (in the pool's shape and recipe, and with the students' recipe of part 1), and the
family's own adapter (480 real examples).

Usage: `.venv/bin/python bench/transfer.py [--parts trans,generate] [--n 300] [--no-write]`. Resumable: every
trained adapter, generated text set and evaluation is cached under `runs/transfer/`; writes `docs/transfer.md`.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merging_common as C  # noqa: E402
import transfer_pool as P  # noqa: E402
from weight_retrieval import families  # noqa: E402

import lorakit  # noqa: E402
from lorakit import data_tasks  # noqa: E402
from lorakit.data import ChatDataset  # noqa: E402

OUT = C.ROOT / "runs" / "transfer"
TRANS_TASKS = ("intensity", "source")
SPARSITY = 0.2
N_SEEDS, N_DISC, N_CAND = 5, 96, 192
QUANT_BITS, QUANT_GROUP = 4, 32
STUDENT = dict(r=16, alpha=32, steps=40, batch=8, lr=1e-3)  # every LoRA trained on the target
DISCRIMINATOR = dict(r=8, alpha=16, steps=40, batch=8, lr=1e-3)
POOL_RECIPE = dict(r=4, alpha=8, steps=60, batch=8, lr=3e-3, layers=[26, 27, 28, 29])  # the pool's (generated shape)
HELD_OUT = ("intensity-amazon", "format-tweets")  # class-balanced test sets (intensity-nyt: 94 % mild)
CVAE_STEPS, SAMPLES, BETAS = 250, 2, (0.005, 1.0)
SHOTS, TASK_PROMPTS = 3, 8


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def cached(path: Path, compute):
    """JSON `compute()` saved at `path`, reused on a rerun."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1, ensure_ascii=False))
    return value


def sentence(messages) -> str:
    """The input text of a VADER task chat (every instruction ends with a blank line and the text)."""
    return messages[-1]["content"].rsplit("\n\n", 1)[-1]


# ---- training and evaluating on a model ---------------------------------------------------------------------------
def train_lora(model, data: ChatDataset, task, folder: Path, recipe: dict, targets=None, seed: int = 0) -> Path:
    """A fresh LoRA trained on `data` with lorakit's Trainer (`task`: an instruct task object), saved to `folder` and
    removed from the model again; skipped when `folder` holds one."""
    from lorakit.train.args import TrainingArguments
    from lorakit.train.trainer import Trainer

    if (folder / "adapter_config.json").is_file():
        return folder
    targets = targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = lorakit.AdapterConfig(r=recipe["r"], lora_alpha=recipe["alpha"], target_modules=targets,
                                   layers_to_transform=recipe.get("layers"))
    before = lorakit.active_adapters(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lorakit.inject(model, config, "student")
    lorakit.set_active(model, ["student"])
    started = time.perf_counter()
    try:
        args = TrainingArguments(output_dir=str(folder.parent / f"{folder.name}-run"), disable_tqdm=True, save_steps=0,
                                 bf16=True, max_steps=recipe["steps"], per_device_train_batch_size=recipe["batch"],
                                 learning_rate=recipe["lr"], seed=seed)
        Trainer(model, task, args, data).train()
        lorakit.save_adapter(model, folder, "student")
    finally:
        lorakit.delete_adapter(model, "student")
        if before:
            lorakit.set_active(model, before)
    log(f"[train] {folder.relative_to(OUT)}: {len(data)} examples, {time.perf_counter() - started:.0f} s")
    return folder


def evaluate(model, folder: Path | None, task: str, data: ChatDataset, path: Path) -> dict:
    """Label-scoring accuracy of `model` with the adapter in `folder` (None: none) on `data` (cached at `path`)."""
    def compute():
        if folder is None:
            with lorakit.disabled(model) if lorakit.adapter_names(model) else contextlib.nullcontext():
                return C.score_choices(model, C.make_task(task), data)
        before = lorakit.active_adapters(model)
        lorakit.load_adapter(model, folder, name="scored")
        lorakit.set_active(model, ["scored"])
        try:
            return C.score_choices(model, C.make_task(task), data)
        finally:
            lorakit.delete_adapter(model, "scored")
            if before:
                lorakit.set_active(model, before)
    result = cached(path, compute)
    log(f"[eval] {path.relative_to(OUT)}: {result['accuracy']:.3f}")
    return result


# ---- part 1: Trans-LoRA -------------------------------------------------------------------------------------------
def pruned_target(base):
    """(target model, pruning record): a copy of `base` with SPARSITY of the MLP channels removed at random."""
    from lorakit.rank.loram import prune_structured

    target = copy.deepcopy(base)
    record = prune_structured(target, sparsity=SPARSITY, metric="random", heads=False, seed=0)
    return target, record


def slice_onto(base, record, folder: Path, out: Path) -> Path:
    """The source adapter restricted to the target's kept channels (A's kept input columns, B's kept output rows):
    loaded on a copy of the source base, which is then pruned by the target's record (`pruned_copy`)."""
    from lorakit.rank.loram import pruned_copy

    if (out / "adapter_config.json").is_file():
        return out
    full = copy.deepcopy(base)
    lorakit.load_adapter(full, folder)
    return Path(lorakit.save_adapter(pruned_copy(full, record), out))


def quantized_target(base):
    """A copy of `base` with every decoder-layer linear weight rounded to QUANT_BITS-bit integers with one absmax
    scale per QUANT_GROUP consecutive weights of a row (symmetric round-to-nearest, Q4_0's grid), kept dequantized."""
    target = copy.deepcopy(base)
    top = 2 ** (QUANT_BITS - 1) - 1
    with torch.no_grad():
        for name, module in target.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
                w = module.weight.float().reshape(-1, QUANT_GROUP)
                step = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / top
                grid = (w / step).round().clamp(-top - 1, top) * step
                module.weight.copy_(grid.reshape(module.weight.shape))
    return target


def transfer_data(base, tok, task: str) -> dict:
    """Trans-LoRA's data for `task`, shared by every target: the seeds, the synthetic inputs, the discriminator's
    P(real) and kept inputs, and the teacher's labels (cached)."""
    from lorakit.compose.transfer import (DISCRIMINATOR_CHOICES, discriminator_data, keep_real, realness,
                                          synthesize, teacher_labels)
    from lorakit.train.tasks import make_task

    spec = data_tasks.TASKS[task]
    root = OUT / "trans" / task
    seeds = data_tasks.task_split(task, "train", limit=N_SEEDS)
    seed_texts = [sentence(m) for m in seeds.messages]

    def generate():
        base.config.use_cache = True
        started = time.perf_counter()
        try:
            texts = synthesize(base, tok, seed_texts, N_DISC + N_CAND, seed=0)
        finally:
            base.config.use_cache = False
        return {"texts": texts, "seconds": round(time.perf_counter() - started)}
    synthetic = cached(root / "synthetic.json", generate)
    texts = synthetic["texts"]
    for_disc, candidates = texts[:N_DISC], texts[N_DISC:]
    judge = make_task("instruct", tok, C.MAX_LENGTH, len(DISCRIMINATOR_CHOICES), DISCRIMINATOR_CHOICES)
    disc = train_lora(base, discriminator_data(seed_texts, for_disc), judge, root / "discriminator", DISCRIMINATOR,
                      targets=["q_proj", "v_proj"])

    def filtered():
        lorakit.load_adapter(base, disc, name="disc")
        lorakit.set_active(base, ["disc"])
        try:
            p = realness(base, tok, candidates)
        finally:
            lorakit.delete_adapter(base, "disc")
        kept = keep_real(candidates, p)
        lorakit.load_adapter(base, C.ensure_adapter(task), name="teacher")
        lorakit.set_active(base, ["teacher"])
        try:
            labels = teacher_labels(base, tok, candidates, spec.instruction, spec.choices)
        finally:
            lorakit.delete_adapter(base, "teacher")
        by_text = dict(zip(candidates, labels))
        return {"p_real": p.tolist(), "kept": kept, "labels": labels, "kept_labels": [by_text[t] for t in kept]}
    f = cached(root / "filtered.json", filtered)
    return {"seeds": seeds, "seed_texts": seed_texts, "texts": texts, "candidates": candidates,
            "seconds": synthetic["seconds"], **f}


def trans_lora(base, target, task: str, data: dict, carried: Path, n: int, name: str, students: tuple) -> dict:
    """Rows of one target for `task`: the source (on the source base), the target alone, the source adapter
    `carried` over, and a LoRA on the target for each of `students` (seeds, trans-lora, unfiltered, real)."""
    spec = data_tasks.TASKS[task]
    root = OUT / "trans" / task / name

    def chats(texts_, labels_):
        return ChatDataset.from_texts(list(texts_), list(labels_), spec.choices, spec.instruction)
    sources = {"seeds": lambda: data["seeds"], "trans-lora": lambda: chats(data["kept"], data["kept_labels"]),
               "unfiltered": lambda: chats(data["candidates"], data["labels"]),
               "real": lambda: data_tasks.task_split(task, "train", limit=len(data["kept"]))}
    student = C.make_task(task)
    folders = {k: train_lora(target, sources[k](), student, root / f"student-{k}", STUDENT) for k in students}
    test = C.test_set(task, n)
    ev = OUT / "trans" / task / "eval"
    rows = {"source": evaluate(base, C.ensure_adapter(task), task, test, ev / "source.json"),
            "source-base": evaluate(base, None, task, test, ev / "source-base.json"),
            "target": evaluate(target, None, task, test, ev / f"{name}-target.json"),
            "carried": evaluate(target, carried, task, test, ev / f"{name}-carried.json")}
    rows.update({k: evaluate(target, folder, task, test, ev / f"{name}-{k}.json") for k, folder in folders.items()})
    return rows


def trans_part(base, tok, n: int) -> dict:
    """Part 1 for every task: the shared data, then the pruned and the 4-bit target."""
    pruned, record = pruned_target(base)
    quantized = quantized_target(base)
    out = {}
    for task in TRANS_TASKS:
        data = transfer_data(base, tok, task)
        sliced = slice_onto(base, record, C.ensure_adapter(task), OUT / "trans" / task / "source-sliced")
        rows = {"pruned": trans_lora(base, pruned, task, data, sliced, n, "pruned",
                                     ("seeds", "trans-lora", "unfiltered", "real")),
                "q4": trans_lora(base, quantized, task, data, C.ensure_adapter(task), n, "q4", ("seeds", "trans-lora"))}
        kept = set(data["kept"])
        out[task] = {"rows": rows, "kept": len(kept), "candidates": len(data["candidates"]),
                     "generated": len(data["texts"]), "seconds": data["seconds"], "examples": data["kept"][:3],
                     "rejected": [t for t in data["candidates"] if t not in kept][:3],
                     "teacher_share": [data["labels"].count(k) / len(data["labels"])
                                       for k in range(len(data_tasks.TASKS[task].choices))],
                     "p_real_mean": sum(data["p_real"]) / len(data["p_real"])}
    return out


# ---- part 2: generators -------------------------------------------------------------------------------------------
def family_data(family: str, split: str, limit: int | None = None) -> ChatDataset:
    spec = families()[family][0]
    names, domain = data_tasks.parse_spec(spec)
    return data_tasks.task_split(names[0], split, domain, limit=limit)


def family_task(family: str) -> str:
    return family.split("-")[0]


def icl_prompts(tok, family: str) -> list[str]:
    """TASK_PROMPTS chat prompts of `family`, each with SHOTS answered training examples before a new one."""
    train = family_data(family, "train", limit=SHOTS * TASK_PROMPTS + TASK_PROMPTS)
    out = []
    for i in range(TASK_PROMPTS):
        shots = train.subset(list(range(i * SHOTS, (i + 1) * SHOTS)))
        query = train.subset([SHOTS * TASK_PROMPTS + i]).with_shots(shots)
        out.append(tok.apply_chat_template(query.messages[0], add_generation_prompt=True, tokenize=False))
    return out


def task_vectors(base, tok, names: list[str]) -> torch.Tensor:
    from lorakit.compose.generate import task_vector

    def compute():
        return {f: task_vector(base, tok, icl_prompts(tok, f)).tolist() for f in names}
    return torch.tensor([cached(OUT / "generate" / "task_vectors.json", compute)[f] for f in names])


def train_cvae(kind: str, beta: float, z: torch.Tensor, conds: torch.Tensor):
    from lorakit.compose.generate import ConvCVAE, fit_cvae

    path = OUT / "generate" / f"cvae-{kind}-beta{beta:g}.pt"
    torch.manual_seed(0)
    model = ConvCVAE(z.shape[1], conds.shape[1], kld_weight=beta)
    if path.is_file():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(path)))
        model.eval()
        return model, json.loads(path.with_suffix(".json").read_text())
    from safetensors.torch import save_file

    started = time.perf_counter()
    losses = fit_cvae(model, z, conds, steps=CVAE_STEPS, batch=8)
    head, tail = losses[:20], losses[-20:]
    info = {"seconds": round(time.perf_counter() - started), "first": sum(head) / len(head),
            "last": sum(tail) / len(tail)}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps(info))
    log(f"[cvae] {kind} β={beta:g}: {info}")
    return model, info


def generators(base, tok, n: int) -> dict:
    from lorakit.compose.flat import FlatAdapter, Standardiser, read, unflatten
    from lorakit.compose.generate import fuse, semantic_weights
    from lorakit.compose.retrieve import text_embeddings

    fams = families()
    P.train_pool(fams)
    names = list(fams)
    train = [f for f in names if f not in HELD_OUT]
    layout, _ = read(P.adapter_dir(train[0]))
    points = {f: P.trajectory(f, layout) for f in train}
    x = torch.cat([points[f] for f in train])
    std = Standardiser.pooled(layout, x)
    z = std.standardise(x).float()
    owner = torch.tensor([i for i, f in enumerate(train) for _ in range(len(points[f]))])
    tv = task_vectors(base, tok, names)
    tv_mean, tv_std = tv[[names.index(f) for f in train]].mean(0), tv[[names.index(f) for f in train]].std(0) + 1e-6
    icm_cond = {f: (tv[names.index(f)] - tv_mean) / tv_std for f in names}  # [U] conditions z-scored per dimension
    captions = text_embeddings([fams[f][1][1] for f in names])
    caption = {f: captions[names.index(f)] for f in names}
    expert_caps = torch.stack([caption[f] for f in train])
    finals = torch.stack([read(P.adapter_dir(f))[1] for f in train])
    cvaes = {}
    for beta in BETAS:
        cvaes[("icm", beta)] = train_cvae("icm", beta, z, torch.stack([icm_cond[train[i]] for i in owner]))
        cvaes[("sg", beta)] = train_cvae("sg", beta, z, expert_caps[owner])
    out = {}
    for h in HELD_OUT:
        task = family_task(h)
        root = OUT / "generate" / h
        test = family_data(h, "test", limit=n)
        ev = root / "eval"
        weights = semantic_weights(caption[h], expert_caps, k=4)
        nearest = train[int((expert_caps @ caption[h]).argmax())]
        rows = {"base": evaluate(base, None, task, test, ev / "base.json"),
                "own": evaluate(base, P.adapter_dir(h), task, test, ev / "own.json"),
                "nearest": evaluate(base, P.adapter_dir(nearest), task, test, ev / "nearest.json")}
        mixture = root / "mixture"
        if not (mixture / "adapter_config.json").is_file():
            unflatten(FlatAdapter(std.standardise(fuse(weights.double(), finals)), std), mixture)
        rows["mixture"] = evaluate(base, mixture, task, test, ev / "mixture.json")
        few = train_lora(base, family_data(h, "train", limit=32), C.make_task(task), root / "lora-32", STUDENT)
        rows["lora-32"] = evaluate(base, few, task, test, ev / "lora-32.json")
        few = train_lora(base, family_data(h, "train", limit=32), C.make_task(task), root / "lora-32-pool", POOL_RECIPE,
                         targets=["q_proj", "v_proj"])
        rows["lora-32-pool"] = evaluate(base, few, task, test, ev / "lora-32-pool.json")
        conds = {"icm": icm_cond[h][None], "sg": fuse(weights, expert_caps)[None]}
        for (kind, beta), (cvae, _) in cvaes.items():
            accs = []
            for s in range(SAMPLES):
                folder = root / f"{kind}-beta{beta:g}-s{s}"
                if not (folder / "adapter_config.json").is_file():
                    vec = cvae.sample(conds[kind], torch.Generator().manual_seed(s))[0].double()
                    unflatten(FlatAdapter(vec, std), folder)
                accs.append(evaluate(base, folder, task, test, ev / f"{kind}-beta{beta:g}-s{s}.json")["accuracy"])
            rows[f"{kind}-beta{beta:g}"] = {"accuracy": sum(accs) / len(accs), "samples": accs}
        out[h] = {"rows": rows, "nearest": nearest, "weights": {train[i]: round(float(w), 3)
                                                                  for i, w in enumerate(weights) if w > 0}}
    out["cvae"] = {f"{k}-beta{b:g}": info for (k, b), (_, info) in cvaes.items()}
    out["points"] = int(x.shape[0])
    return out


# ---- the document -------------------------------------------------------------------------------------------------
def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def trans_table(results: dict, target: str, labels: dict) -> str:
    lines = ["| row | " + " | ".join(TRANS_TASKS) + " |", "|---|" + "---|" * len(TRANS_TASKS)]
    for row, label in labels.items():
        lines.append(f"| {label} | " + " | ".join(pct(results[t]["rows"][target][row]["accuracy"])
                                                 for t in TRANS_TASKS) + " |")
    return "\n".join(lines)


def trans_section(results: dict, n: int) -> str:
    source = {"source": "source: SmolLM2 + the task adapter (teacher)", "source-base": "source base, no adapter"}
    pruned = trans_table(results, "pruned", {
        **source, "target": "target (pruned SmolLM2), no adapter",
        "carried": "target + the source adapter sliced to its kept channels",
        "seeds": f"target + LoRA on the {N_SEEDS} seed examples",
        "unfiltered": f"target + distilled on all {N_CAND} synthetic inputs (no discriminator)",
        "trans-lora": "**target + Trans-LoRA** (distilled on the discriminator's real-like inputs)",
        "real": "target + LoRA on as many real examples (upper bound)"})
    quantized = trans_table(results, "q4", {
        **source, "target": f"target ({QUANT_BITS}-bit SmolLM2), no adapter",
        "carried": "target + the source adapter as is",
        "seeds": f"target + LoRA on the {N_SEEDS} seed examples",
        "trans-lora": "**target + Trans-LoRA** (the same distillation set as above)"})
    notes = []
    for t in TRANS_TASKS:
        r = results[t]
        notes.append(f"- {t}: {r['generated']} synthetic inputs in {r['seconds']} s; the discriminator kept "
                     f"{r['kept']} of {r['candidates']} (mean P(real) {r['p_real_mean']:.2f}); teacher labels "
                     f"{', '.join(f'{s:.0%}' for s in r['teacher_share'])} over "
                     f"{', '.join(data_tasks.TASKS[t].choices)}. Kept, e.g.: "
                     + " · ".join(f"“{e[:80]}”" for e in r["examples"]) + ". Rejected, e.g.: "
                     + (" · ".join(f"“{e[:80]}”" for e in r["rejected"]) or "none"))
    return f"""## Trans-LoRA: a task adapter moved to a pruned and to a 4-bit SmolLM2

Accuracy (%) by label scoring on {n} class-balanced test examples per task (chance: intensity 50, source 25). Every
LoRA on a target: r {STUDENT['r']}, α {STUDENT['alpha']} on all linear layers, {STUDENT['steps']} steps ×
{STUDENT['batch']}, lr {STUDENT['lr']}, bf16; the discriminator: r {DISCRIMINATOR['r']} on q / v of the source,
{DISCRIMINATOR['steps']} steps.

**Pruned target**: {100 - 100 * SPARSITY:.0f} % of the MLP channels of layers 3–28 kept (random choice, seed 0;
120.7 M of 134.5 M parameters).

{pruned}

**{QUANT_BITS}-bit target**: every decoder weight rounded to {QUANT_BITS} bits with one absmax scale per
{QUANT_GROUP} weights (round to nearest, llama.cpp's Q4_0 grid), held dequantized in bf16. The distillation set and
teacher labels are those of the pruned target.

{quantized}

{chr(10).join(notes)}
"""


def generate_section(results: dict, n: int) -> str:
    labels = {"base": "base, no adapter", "nearest": "nearest expert by description (MiniLM)",
              "mixture": "mixture of the top-4 experts (SG-LoRA's weights, averaged factors)",
              **{f"icm-beta{b:g}": f"**ICM-LoRA**, β = {b:g} (mean of {SAMPLES} samples)" for b in BETAS},
              **{f"sg-beta{b:g}": f"**SG-LoRA**, β = {b:g} (mean of {SAMPLES} samples)" for b in BETAS},
              "lora-32-pool": "LoRA trained on 32 examples of the family in the pool's shape and recipe",
              "lora-32": f"LoRA trained on 32 examples of the family (r {STUDENT['r']}, all linear layers)",
              "own": "the family's own adapter (480 examples; upper bound)"}
    lines = ["| row | " + " | ".join(HELD_OUT) + " |", "|---|" + "---|" * len(HELD_OUT)]
    for row, label in labels.items():
        cells = []
        for h in HELD_OUT:
            r = results[h]["rows"][row]
            cells.append(pct(r["accuracy"]) + (" (" + " / ".join(pct(a) for a in r["samples"]) + ")"
                                                 if "samples" in r else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    picks = "; ".join(f"{h}: nearest {results[h]['nearest']}, top-4 weights {results[h]['weights']}"
                      for h in HELD_OUT)
    cvae = "; ".join(f"{k}: {v['seconds']} s, loss {v['first']:.3f} → {v['last']:.3f}"
                     for k, v in results["cvae"].items())
    return f"""## Generated adapters for held-out families: ICM-LoRA and SG-LoRA

Accuracy (%) on {n} test examples of each held-out family (chance 50). The generators learned from
{results['points']} checkpoints of the 11 other families (`bench/transfer_pool.py`); each CVAE ran {CVAE_STEPS}
steps × 8 ({cvae}). {picks}.

{chr(10).join(lines)}
"""


def write_doc(trans: dict | None, gen: dict | None, n: int, seconds: float, path: Path) -> None:
    doc = f"""# Transferring and generating adapters without task data (SmolLM2-135M-Instruct, VADER instruct tasks)

Regenerate: `.venv/bin/python bench/transfer.py` ({datetime.date.today()}; this run took {seconds / 60:.0f} min on 2
CPU cores; results cached in `runs/transfer/` are reused). One seed per row: with {n} test examples a row's standard
error is up to {50 / n ** 0.5:.1f} points, so differences under ~{100 / n ** 0.5:.0f} points are noise.

"""
    if trans:
        doc += trans_section(trans, n) + "\n"
    if gen:
        doc += generate_section(gen, n) + "\n"
    marker = "<!-- findings: written by hand, kept when the tables above are regenerated -->"
    kept = path.read_text().split(marker, 1)[1] if path.is_file() and marker in path.read_text() else "\n"
    path.write_text(doc + marker + kept)
    log(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="trans,generate")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, all output in runs/transfer-smoke")
    args = ap.parse_args()
    if args.smoke:
        global OUT, N_DISC, N_CAND, CVAE_STEPS, SAMPLES
        OUT, N_DISC, N_CAND, CVAE_STEPS, SAMPLES = C.ROOT / "runs" / "transfer-smoke", 8, 16, 3, 1
        STUDENT.update(steps=2)
        DISCRIMINATOR.update(steps=2)
        args.n = 16
    began = time.perf_counter()
    torch.set_num_threads(2)
    base, tok = C.load_base()
    trans = gen = None
    if "generate" in args.parts:
        gen = generators(base, tok, args.n)
    if "trans" in args.parts:
        trans = trans_part(base, tok, args.n)
    if not args.no_write:
        doc = OUT / "transfer.md" if args.smoke else C.ROOT / "docs" / "transfer.md"
        write_doc(trans, gen, args.n, time.perf_counter() - began, doc)


if __name__ == "__main__":
    main()
