"""The registered claims, one per implemented method (or method pair), in table order.

Every setting below was fixed before the experiment ran: learning rates are the ones chosen on the validation split
by the earlier sweeps (docs/variant_comparison.md, docs/optimizer_comparison.md, docs/rank_experiments.md), or the
paper's own choice where the method was not swept. A new claim is one `Claim(...)` entry here.
"""
from __future__ import annotations

import difflib

from ..errors import ConfigError
from .experiments import ArmComparison, LoramComparison, SqueezeComparison, fewer_parameters, gates_kept
from .external import BenchRows, IntruderCounts, transfer_files
from .records import Claim
from .runs import Arm

# ---- arms (MiniLM, VADER movies; shared settings in runs.COMMON; seeds 0-2) --------------------------------------
LORA = Arm.of("lora-r8", "LoRA r 8", 1.1, r=8, lora_alpha=16, learning_rate=3e-3)
DORA = Arm.of("dora-r8", "DoRA r 8", 1.3, variant="dora", r=8, lora_alpha=16, learning_rate=3e-3)
LORA64 = Arm.of("lora-r64-a16", "LoRA r 64 (α/r)", 1.2, r=64, lora_alpha=16, learning_rate=3e-3)
RSLORA64 = Arm.of("rslora-r64-a16", "rsLoRA r 64 (α/√r)", 1.2, r=64, lora_alpha=16, use_rslora=True,
                  learning_rate=3e-3)
LORAPLUS = Arm.of("loraplus-r8", "LoRA+ r 8 (λ 16)", 1.1, r=8, lora_alpha=16, optim="loraplus", learning_rate=3e-4)
LORAPRO = Arm.of("lorapro-r8", "LoRA-Pro r 8", 1.2, r=8, lora_alpha=16, optim="lorapro", learning_rate=3e-4)
PISSA = Arm.of("pissa-r8", "PiSSA r 8", 1.2, variant="pissa", r=8, lora_alpha=8, learning_rate=1e-3)
LORA_GA = Arm.of("lora_ga-r8", "LoRA-GA r 8", 1.3, variant="lora_ga", r=8, lora_alpha=16, learning_rate=3e-4)
VERA = Arm.of("vera-r256", "VeRA r 256", 1.4, variant="vera", r=256, learning_rate=0.1)
VBLORA = Arm.of("vblora-r8", "VB-LoRA r 8", 1.2, topk=True, variant="vblora", r=8,
                options={"vector_length": 128}, learning_rate=1e-2)
UNILORA = Arm.of("unilora-r8", "Uni-LoRA r 8", 1.2, variant="unilora", r=8, options={"theta_d_length": 8192},
                 learning_rate=5e-2)
SORA = Arm.of("sora-r8", "SoRA r 8", 1.2, variant="sora", r=8, lora_alpha=16, optim="sora", learning_rate=3e-3)
TIED = Arm.of("tied_lora-r8", "Tied-LoRA r 8", 1.1, variant="tied_lora", r=8, lora_alpha=16, learning_rate=3e-3)
LORA_XS = Arm.of("lora_xs-r16", "LoRA-XS r 16", 1.1, variant="lora_xs", r=16, lora_alpha=16, learning_rate=4e-3)
LORA_SB = Arm.of("lora_sb-r8", "LoRA-SB r 8", 1.2, variant="lora_sb", r=8, learning_rate=3e-3)
LAMDA = Arm.of("lamda-r8", "LaMDA r 8", 1.1, variant="lamda", r=8, lora_alpha=16, learning_rate=1e-2)
LOLDU = Arm.of("loldu-r64", "LoLDU r 64", 1.3, variant="loldu", r=64, lora_alpha=64, learning_rate=1e-3)
SHIRA = Arm.of("shira-r8", "SHiRA (LoRA r 8's parameter count)", 1.4, variant="shira", r=8, learning_rate=3e-3)
OLORA = Arm.of("olora-r8", "OLoRA r 8", 1.2, variant="olora", r=8, lora_alpha=8, learning_rate=1e-3)
ALLORA = Arm.of("allora-r8", "ALLoRA r 8", 1.1, r=8, lora_alpha=8, optim="allora", learning_rate=3e-3)
STABLE = Arm.of("stable_lora-r8", "Stable-LoRA r 8", 1.1, r=8, lora_alpha=16, optim="stable_lora", learning_rate=3e-3)
ALTLORA = Arm.of("altlora_plus-r8", "AltLoRA+ r 8", 1.2, r=8, lora_alpha=16, optim="altlora+", learning_rate=3e-4)
LORA64_SRC = Arm.of("lora-r64-a128", "LoRA r 64", 1.2, r=64, lora_alpha=128, learning_rate=3e-3)
RANKS = (1, 2, 4, 8)
THREE_EPOCHS = dict(num_train_epochs=3, warmup_ratio=0.06, learning_rate=1e-3, r=8, lora_alpha=16)
LORA_3EP = Arm.of("lora-r8-3ep", "LoRA r 8, 3 epochs", 2.7, ranks=RANKS, **THREE_EPOCHS)
DYLORA_3EP = Arm.of("dylora-r8-3ep", "DyLoRA r 8", 2.8, ranks=RANKS, variant="dylora", **THREE_EPOCHS)
MATRYOSHKA_3EP = Arm.of("matryoshka-r8-3ep", "MatryoshkaLoRA r 8", 2.7, ranks=RANKS, variant="matryoshka_lora",
                        **THREE_EPOCHS)
HYPELORA_3EP = Arm.of("hypelora-r8-3ep", "HypeLoRA r 8", 2.3, variant="hypelora",
                      **{**THREE_EPOCHS, "learning_rate": 4e-4})
LORAM = Arm.of("loram-r8", "LoRAM", 4.5, r=8, lora_alpha=16, learning_rate=1e-3, warmup_ratio=0.06, save_steps=0)

SHARED = "r 8 α 16 on every linear layer of MiniLM, 1 epoch (63 steps of 16), seeds 0–2"
SWEPT = "each at its learning rate chosen on validation in docs/{}"
MERGE_TASKS = ("polarity", "source", "intensity", "format")
MERGING = ".venv/bin/python bench/merging.py"
MERGING_COST = "~2 h (docs/merging.md: 40 min of evaluation after ~80 min of adapter training)"
COMPOSITION = ".venv/bin/python bench/composition.py"
COMPOSITION_COST = "11 min after bench/merging.py's adapters (docs/composition.md)"
TRANSFER = ".venv/bin/python bench/transfer.py"
TRANSFER_COST = "55 min (docs/transfer.md)"
INTRUDERS = "about 1 h (two runs of 32-33 min on 2026-12-06, docs/intruders.md)"
RETAINED = ("polarity", "source", "intensity")


def _merge(treatment: str, baseline: str, labels: tuple[str, str]) -> BenchRows:
    return BenchRows.per_task("merging/eval", treatment, baseline, MERGE_TASKS, labels, MERGING, MERGING_COST)


def _compose(treatment: str, labels: tuple[str, str]) -> BenchRows:
    return BenchRows.per_task("composition/eval", treatment, "uniform", MERGE_TASKS, labels, COMPOSITION,
                              COMPOSITION_COST)


def _generated(treatment: tuple[str, ...], baseline: str, labels: tuple[str, str]) -> BenchRows:
    reps = [(f, transfer_files(f, treatment), transfer_files(f, (baseline,)), ("accuracy",))
            for f in ("intensity-amazon", "format-tweets")]
    return BenchRows(labels, reps, "held-out family", TRANSFER, TRANSFER_COST)


CLAIMS: list[Claim] = [
    Claim("dora", "DoRA", "Liu et al., ICML 2024 (arXiv 2402.09353)",
          "Adapting the direction of W with LoRA and its magnitude separately learns better than LoRA at the same "
          "rank.",
          f"DoRA vs LoRA, lr 3e-3 for both (LoRA's validation-chosen rate; the paper keeps LoRA's rate), {SHARED}.",
          "test accuracy", ArmComparison(DORA, LORA, "accuracy")),
    Claim("rslora", "rsLoRA", "Kalajdzievski, arXiv 2312.03732",
          "With the α/r scale a high rank learns no better (its update shrinks with r); α/√r keeps learning "
          "rank-stable, so a high rank trains better at the same α and learning rate.",
          "r 64, α 16, lr 3e-3: rsLoRA (scale α/√r = 2) vs LoRA (α/r = 0.25), 1 epoch, seeds 0–2.",
          "test accuracy", ArmComparison(RSLORA64, LORA64, "accuracy")),
    Claim("loraplus", "LoRA+", "Hayou, Ghosh, Yu, ICML 2024 (arXiv 2402.12354)",
          "A learning rate λ× higher for B than for A (λ = 16) fine-tunes faster (up to 2×) and better than LoRA.",
          f"LoRA+ (lr 3e-4) vs LoRA (lr 3e-3), {SWEPT.format('optimizer_comparison.md')}; {SHARED}; "
          "convergence = the mean training loss over the run (area under the loss curve).",
          "mean training loss", ArmComparison(LORAPLUS, LORA, "train_loss"), rule="replicates",
          higher_is_better=False, percent=False),
    Claim("lorapro", "LoRA-Pro", "Wang et al., ICLR 2025 (arXiv 2407.18242)",
          "Adjusting LoRA's gradients so that its equivalent gradient best approximates full fine-tuning's beats "
          "LoRA.",
          f"LoRA-Pro (lr 3e-4) vs LoRA (lr 3e-3), {SWEPT.format('optimizer_comparison.md')}; {SHARED}.",
          "test accuracy", ArmComparison(LORAPRO, LORA, "accuracy")),
    Claim("altlora", "AltLoRA+", "Yu, Wang, Chen, Xue, arXiv 2505.12455",
          "Alternating least-squares projections of the full gradient onto A and B, with the momentum kept low-rank, "
          "beat LoRA.",
          f"AltLoRA+ (lr 3e-4) vs LoRA (lr 3e-3), {SWEPT.format('optimizer_comparison.md')}; {SHARED}.",
          "test accuracy", ArmComparison(ALTLORA, LORA, "accuracy")),
    Claim("allora", "ALLoRA", "Huang, Balestriero, arXiv 2410.09692",
          "Without dropout and α scaling, a learning rate inversely proportional to each row's norm escapes B = 0 "
          "faster, so it converges faster than LoRA.",
          f"ALLoRA (α = r, lr 3e-3) vs LoRA (lr 3e-3), {SWEPT.format('optimizer_comparison.md')}; {SHARED}; "
          "convergence = the mean training loss over the run.",
          "mean training loss", ArmComparison(ALLORA, LORA, "train_loss"), rule="replicates",
          higher_is_better=False, percent=False),
    Claim("stable-lora", "Stable-LoRA", "Wu, Gao, Li, Wu, ICLR 2026 (arXiv 2603.05204)",
          "Shrinking A during the first steps removes an early instability of LoRA and fine-tunes better.",
          f"Stable-LoRA (λ 5e-4, lr 3e-3) vs LoRA (lr 3e-3), {SWEPT.format('optimizer_comparison.md')}; {SHARED}.",
          "test accuracy", ArmComparison(STABLE, LORA, "accuracy")),
    Claim("pissa", "PiSSA", "Meng, Wang, Zhang, NeurIPS 2024 (arXiv 2404.02948)",
          "Starting A and B from the principal singular components of W converges faster than LoRA's zero start.",
          f"PiSSA (α 8, lr 1e-3) vs LoRA (lr 3e-3), {SWEPT.format('variant_comparison.md')}; {SHARED}; "
          "convergence = the mean training loss over the run.",
          "mean training loss", ArmComparison(PISSA, LORA, "train_loss"), rule="replicates",
          higher_is_better=False, percent=False),
    Claim("lora-ga", "LoRA-GA", "Wang, Yu, Li, NeurIPS 2024 (arXiv 2407.05000)",
          "Starting A and B from the SVD of the first full gradient makes LoRA converge 2–4× faster.",
          f"LoRA-GA (lr 3e-4) vs LoRA (lr 3e-3), {SWEPT.format('optimizer_comparison.md')}; {SHARED}; "
          "convergence = the mean training loss over the run.",
          "mean training loss", ArmComparison(LORA_GA, LORA, "train_loss"), rule="replicates",
          higher_is_better=False, percent=False),
    Claim("olora", "OLoRA", "Büyükakyüz, arXiv 2406.01775",
          "Starting A and B from the QR factors of W (orthonormal) makes LoRA converge faster.",
          f"OLoRA (α 8, lr 1e-3) vs LoRA (lr 3e-3), {SWEPT.format('variant_comparison.md')}; {SHARED}; "
          "convergence = the mean training loss over the run.",
          "mean training loss", ArmComparison(OLORA, LORA, "train_loss"), rule="replicates",
          higher_is_better=False, percent=False),
    Claim("vera", "VeRA", "Kopiczko, Blankevoort, Asano, ICLR 2024 (arXiv 2310.11454)",
          "Frozen shared random matrices with trained scaling vectors match LoRA with 10× fewer trainable "
          "parameters.",
          f"VeRA (r 256, lr 0.1) vs LoRA (r 8, lr 3e-3), {SWEPT.format('variant_comparison.md')}; 1 epoch, "
          "seeds 0–2; matching = at most 2 points below; condition: ≤ 10 % of LoRA's trainable adapter parameters.",
          "test accuracy", ArmComparison(VERA, LORA, "accuracy", [fewer_parameters(0.10)]), kind="no_worse",
          margin=0.02),
    Claim("vblora", "VB-LoRA", "Li, Han, Ji, NeurIPS 2024 (arXiv 2405.15179)",
          "Building every LoRA factor from one shared bank of vectors (top-2 mixtures) matches LoRA while storing a "
          "small fraction of its parameters (0.4 % on Llama2-13B).",
          f"VB-LoRA (r 8, 256 vectors of 128, lr 1e-2) vs LoRA (lr 3e-3), {SWEPT.format('variant_comparison.md')}; "
          "1 epoch, seeds 0–2; matching = at most 2 points below; condition: its compact top-k file stores ≤ 10 % of "
          "LoRA's numbers.",
          "test accuracy",
          ArmComparison(VBLORA, LORA, "accuracy", [fewer_parameters(0.10, topk=True, what="numbers stored (top-k)")]),
          kind="no_worse", margin=0.02),
    Claim("unilora", "Uni-LoRA", "Li et al., arXiv 2506.00799",
          "One trained vector, projected isometrically onto every LoRA parameter, matches LoRA with a tiny fraction "
          "of its trainable parameters.",
          f"Uni-LoRA (r 8, d 8,192, lr 5e-2) vs LoRA (lr 3e-3), {SWEPT.format('variant_comparison.md')}; 1 epoch, "
          "seeds 0–2; matching = at most 2 points below; condition: ≤ 10 % of LoRA's trainable adapter parameters.",
          "test accuracy", ArmComparison(UNILORA, LORA, "accuracy", [fewer_parameters(0.10)]), kind="no_worse",
          margin=0.02),
    Claim("tied-lora", "Tied-LoRA", "Renduchintala, Konuk, Kuchaiev, NAACL 2024 (arXiv 2311.09578)",
          "One LoRA pair shared by all layers, with per-layer scaling vectors, matches LoRA with a fraction of its "
          "parameters.",
          f"Tied-LoRA vs LoRA, lr 3e-3 for both, {SWEPT.format('variant_comparison.md')}; {SHARED}; matching = at "
          "most 2 points below.",
          "test accuracy", ArmComparison(TIED, LORA, "accuracy"), kind="no_worse", margin=0.02),
    Claim("lora-xs", "LoRA-XS", "Bałazy et al., arXiv 2405.17604",
          "Training only a small r×r matrix between frozen SVD factors of W matches LoRA with over 100× fewer "
          "trainable parameters (on 7B models).",
          f"LoRA-XS (r 16, lr 4e-3) vs LoRA (r 8, lr 3e-3), {SWEPT.format('variant_comparison.md')}; 1 epoch, seeds "
          "0–2; matching = at most 2 points below.",
          "test accuracy", ArmComparison(LORA_XS, LORA, "accuracy"), kind="no_worse", margin=0.02),
    Claim("lora-sb", "LoRA-SB", "arXiv 2411.19557",
          "Starting LoRA-XS's r×r core from the SVD of an approximate first full fine-tuning step matches LoRA with "
          "far fewer parameters.",
          f"LoRA-SB (r 8, lr 3e-3) vs LoRA (lr 3e-3), {SWEPT.format('variant_comparison.md')}; 1 epoch, seeds 0–2; "
          "matching = at most 2 points below.",
          "test accuracy", ArmComparison(LORA_SB, LORA, "accuracy"), kind="no_worse", margin=0.02),
    Claim("lamda", "LaMDA", "Azizi, Kundu, Pedram, EMNLP Findings 2024 (arXiv 2406.12832)",
          "Freezing the first projection, training an r×r core and gradually freezing the second projection matches "
          "LoRA with far fewer trainable parameters.",
          f"LaMDA (lr 1e-2) vs LoRA (lr 3e-3), {SWEPT.format('variant_comparison.md')}; {SHARED}; matching = at "
          "most 2 points below.",
          "test accuracy", ArmComparison(LAMDA, LORA, "accuracy"), kind="no_worse", margin=0.02),
    Claim("loldu", "LoLDU", "Shi et al., arXiv 2410.13618",
          "Training only the diagonal of an LDU factorisation of W (a tiny fraction of LoRA's parameters) matches "
          "LoRA.",
          f"LoLDU (r 64, lr 1e-3) vs LoRA (r 8, lr 3e-3), {SWEPT.format('variant_comparison.md')}; 1 epoch, seeds "
          "0–2; matching = at most 2 points below.",
          "test accuracy", ArmComparison(LOLDU, LORA, "accuracy"), kind="no_worse", margin=0.02),
    Claim("shira", "SHiRA", "Bhardwaj et al., NeurIPS 2024 (arXiv 2406.13175)",
          "Training a fixed sparse subset of W's own entries (a high-rank update) beats LoRA with as many trainable "
          "parameters.",
          f"SHiRA (random mask, r (m + n) entries per layer, lr 3e-3) vs LoRA r 8 (lr 3e-3), "
          f"{SWEPT.format('variant_comparison.md')}; 1 epoch, seeds 0–2.",
          "test accuracy", ArmComparison(SHIRA, LORA, "accuracy")),
    Claim("dylora", "DyLoRA", "Valipour et al., EACL 2023 (arXiv 2210.07558)",
          "Training on a randomly drawn rank each step gives one adapter that works at every rank ≤ r, better than "
          "a LoRA cut to that rank.",
          "DyLoRA (frozen mode) vs LoRA cut to its first k components, r 8 α 16, 3 epochs (189 steps), lr 1e-3 "
          "(chosen on validation for both in docs/rank_experiments.md), warm-up 6 %, seeds 0–2.",
          "AURAC v1 of test accuracy at ranks 1, 2, 4, 8", ArmComparison(DYLORA_3EP, LORA_3EP, "aurac")),
    Claim("matryoshka", "MatryoshkaLoRA", "Modoranu, Safaryan, Alistarh, arXiv 2605.07850",
          "Training all nested ranks at once gives a higher area under the accuracy-vs-rank curve (AURAC) than LoRA.",
          "MatryoshkaLoRA (its rank-k form) vs LoRA cut to its first k components, r 8 α 16, 3 epochs, lr 1e-3 "
          "(docs/rank_experiments.md), warm-up 6 %, seeds 0–2.",
          "AURAC v1 of test accuracy at ranks 1, 2, 4, 8", ArmComparison(MATRYOSHKA_3EP, LORA_3EP, "aurac")),
    Claim("squeeze", "LoRA-Squeeze", "Vulić et al., arXiv 2602.10993",
          "Training at a high rank and compressing to the target rank beats training at the target rank directly.",
          "LoRA r 64 (α 128) squeezed to r 8 (exact QR route, no further training) vs LoRA r 8 (α 16); lr 3e-3, "
          "1 epoch, seeds 0–2.",
          "test accuracy", SqueezeComparison(LORA64_SRC, LORA, 8)),
    Claim("sora", "SoRA", "Ding et al., EMNLP 2023 (arXiv 2311.11696)",
          "A gate with a proximal L1 step prunes LoRA ranks during training and still matches LoRA with ~70 % of "
          "the parameters kept.",
          f"SoRA (its optimizer's defaults: λ 10, λ₂ 3e-4) vs LoRA, lr 3e-3 for both; {SHARED}; matching = at most 2 "
          "points below; condition: ≤ 70 % of the rank gates non-zero at the end.",
          "test accuracy", ArmComparison(SORA, LORA, "accuracy", [gates_kept(0.70)]), kind="no_worse", margin=0.02),
    Claim("loram", "LoRAM", "Zhang et al., ICLR 2025 (arXiv 2502.13533)",
          "Train small, infer large: a LoRA trained on a pruned, aligned model and recovered into the full model "
          "does better than the pruned model it was trained on.",
          "MiniLM with 50 % of the heads and MLP channels of layers 0–4 pruned (magnitude), aligned for 1 epoch on "
          "4,000 VADER tweets / amazon / nyt texts; LoRA r 8, lr 1e-3, warm-up 6 %, 1 epoch on it; the full model "
          "with the recovered LoRA merged vs the pruned model with its LoRA; seeds 0–2.",
          "test accuracy", LoramComparison(LORAM), rule="replicates"),
    Claim("hypelora", "HypeLoRA", "Trojan, Gębala, arXiv 2603.19278",
          "LoRA factors generated by one shared hypernetwork give better-calibrated models (lower ECE) than LoRA.",
          "HypeLoRA (the reference's settings, lr 4e-4 as its CoLA runs) vs LoRA (lr 1e-3), r 8 α 16, 3 epochs, "
          "warm-up 6 %, seeds 0–2; ECE on max-softmax confidence, 10 equal-width bins.",
          "test ECE", ArmComparison(HYPELORA_3EP, LORA_3EP, "ece"), higher_is_better=False),
    Claim("intruders-full", "Intruder dimensions", "Shuttleworth et al., NeurIPS 2025 (arXiv 2410.21228)",
          "LoRA introduces intruder dimensions (new top singular vectors unlike any of W₀'s); full fine-tuning "
          "does not.",
          "bench/intruders.py: SmolLM2 on the VADER source task (instruct), 80 steps; LoRA r 8 vs full fine-tuning; "
          "intruders among the top 10 singular vectors (ε 0.5) of each of the 210 linear layers.",
          "intruder dimensions per layer",
          IntruderCounts("lora-r8", "full", ("LoRA r 8", "full fine-tuning"), INTRUDERS), percent=False),
    Claim("intruders-rank", "Intruder dimensions vs rank", "Shuttleworth et al., NeurIPS 2025 (arXiv 2410.21228)",
          "LoRA at a low rank shows more intruder dimensions than at a high rank.",
          "bench/intruders.py, as above: LoRA r 8 (α 16) vs LoRA r 64 (α 128).",
          "intruder dimensions per layer",
          IntruderCounts("lora-r8", "lora-r64", ("LoRA r 8", "LoRA r 64"), INTRUDERS), percent=False),
    Claim("ties", "TIES-Merging", "Yadav et al., NeurIPS 2023 (arXiv 2306.01708)",
          "Trimming, electing signs and merging only agreeing entries reduces interference: TIES beats task "
          "arithmetic.",
          "bench/merging.py: four SmolLM2 task adapters merged by TIES (density 0.2) vs task arithmetic (exact "
          "Σ ΔW); 300 test examples per task; the 4 tasks are the replicates.",
          "test accuracy", _merge("ties", "cat", ("TIES", "task arithmetic")), rule="replicates"),
    Claim("dare", "DARE", "Yu et al., ICML 2024 (arXiv 2311.03099)",
          "Dropping most delta parameters and rescaling the rest keeps the merged model's ability.",
          "bench/merging.py: DARE (p 0.5) then Σ vs task arithmetic, 4 tasks as replicates; keeping = at most 2 "
          "points below.",
          "test accuracy", _merge("dare_linear", "cat", ("DARE", "task arithmetic")), rule="replicates",
          kind="no_worse", margin=0.02),
    Claim("knots", "KnOTS", "Stoica et al., ICLR 2025 (arXiv 2410.19735)",
          "Aligning the LoRA updates in one shared SVD basis before merging beats merging them directly (TIES).",
          "bench/merging.py: KnOTS (TIES on the coefficients in the shared basis) vs TIES on ΔW, 4 tasks as "
          "replicates.",
          "test accuracy", _merge("knots", "ties", ("KnOTS", "TIES")), rule="replicates"),
    Claim("lora-lego", "LoRA-LEGO", "Zhao et al., ICLR 2025 (arXiv 2409.16167)",
          "Clustering the rank-1 units of several LoRAs merges them better than existing merging methods.",
          "bench/merging.py: LoRA-LEGO (16 clusters of the 64 units) vs task arithmetic, 4 tasks as replicates.",
          "test accuracy", _merge("lego", "cat", ("LoRA-LEGO", "task arithmetic")), rule="replicates"),
    Claim("maat", "MAAT", "Yagnik et al., arXiv 2605.30514",
          "Projected gradient ascent plus repair unlearns a task with less damage to the other tasks than plain "
          "gradient ascent.",
          "bench/merging_unlearn.py: unlearn `format` from the SmolLM2 multi-task adapter; MAAT vs gradient ascent "
          "on the 3 retained tasks (the replicates), 300 test examples each.",
          "test accuracy (retained tasks)",
          BenchRows.per_task("merging/unlearn/eval", "maat", "gradient-ascent", RETAINED,
                             ("MAAT", "gradient ascent"), ".venv/bin/python bench/merging_unlearn.py --n-eval 300",
                             "not documented (after bench/merging.py's multi-task adapter)"),
          rule="replicates"),
    Claim("lorahub", "LoraHub", "Huang et al., COLM 2024 (arXiv 2307.13269)",
          "A gradient-free search of combination weights over existing LoRAs, from a few examples, beats the "
          "zero-shot base on an unseen task.",
          "bench/merging_learned.py: targets format and intensity (their own adapters left out of the pool), 32 "
          "examples, 40 evaluations; LoraHub vs the base; the 2 targets are the replicates.",
          "test accuracy",
          BenchRows(("LoraHub", "base"),
                    [(t, [f"merging/learned/{t}/lorahub.json"], [f"merging/learned/{t}/base.json"], ("accuracy",))
                     for t in ("format", "intensity")], "target task",
                    ".venv/bin/python bench/merging_learned.py --target <format|intensity> --n 300",
                    "not documented (after bench/merging.py's adapters)"),
          rule="replicates"),
    Claim("arrow", "Arrow routing", "Ostapenko et al., ICML 2024 (arXiv 2405.11157)",
          "Routing each token zero-shot to library adapters by their SVD prototypes beats uniform merging.",
          "bench/composition.py: the four SmolLM2 task adapters; Arrow top-2 vs the uniform run-time mixture, 4 tasks "
          "as replicates.",
          "test accuracy", _compose("arrow-top2", ("Arrow top-2", "uniform mixture")), rule="replicates"),
    Claim("lora-flow", "LoRA-Flow", "Wang et al., ACL 2024 (arXiv 2402.11455)",
          "A small gate trained on a few examples to weight the LoRAs per layer and token beats fixed weights.",
          "bench/composition.py: LoRA-Flow gate (256 examples, 32 steps) vs the uniform mixture, 4 tasks as "
          "replicates.",
          "test accuracy", _compose("lora-flow", ("LoRA-Flow gate", "uniform mixture")), rule="replicates"),
    Claim("mole", "MoLE", "Wu, Huang, Wei, ICLR 2024 (arXiv 2404.13628)",
          "A learned gate over the LoRAs' outputs per layer beats their linear (fixed-weight) composition.",
          "bench/composition.py: MoLE gate (trained as LoRA-Flow's) vs the uniform mixture, 4 tasks as replicates.",
          "test accuracy", _compose("mole", ("MoLE gate", "uniform mixture")), rule="replicates"),
    Claim("trans-lora", "Trans-LoRA", "Wang et al., NeurIPS 2024 (arXiv 2405.17258)",
          "Distilling the source adapter on discriminator-filtered synthetic data moves it to a new base model "
          "better than training on the few seed examples.",
          "bench/transfer.py: tasks intensity and source onto a pruned and a 4-bit SmolLM2; Trans-LoRA vs a LoRA on "
          "the 5 seed examples; the 4 task × target pairs are the replicates.",
          "test accuracy",
          BenchRows(("Trans-LoRA", "LoRA on the 5 seeds"),
                    [(f"{task}, {target}", [f"transfer/trans/{task}/eval/{target}-trans-lora.json"],
                      [f"transfer/trans/{task}/eval/{target}-seeds.json"], ("accuracy",))
                     for task in ("intensity", "source") for target in ("pruned", "q4")],
                    "task × target pair", TRANSFER, TRANSFER_COST),
          rule="replicates"),
    Claim("sg-lora", "SG-LoRA", "Li et al., CVPR 2026 (arXiv 2509.10535)",
          "A CVAE conditioned on the task's fused description generates adapters for unseen tasks that beat fusing "
          "the expert adapters directly.",
          "bench/transfer.py: held-out families intensity-amazon and format-tweets; SG-LoRA (β 1, mean of 2 samples) "
          "vs the mixture of the same top-4 experts; the 2 families are the replicates.",
          "test accuracy", _generated(("sg-beta1-s0", "sg-beta1-s1"), "mixture", ("SG-LoRA", "expert mixture")),
          rule="replicates"),
    Claim("icm-lora", "ICM-LoRA", "Shao et al., IJCAI 2025",
          "A CVAE conditioned on an in-context task vector generates adapters that match adapters trained on the "
          "task.",
          "bench/transfer.py: held-out families intensity-amazon and format-tweets; ICM-LoRA (β 0.005, mean of 2 "
          "samples) vs the family's own adapter (480 examples); matching = at most 2 points below; 2 families.",
          "test accuracy", _generated(("icm-beta0.005-s0", "icm-beta0.005-s1"), "own", ("ICM-LoRA", "own adapter")),
          rule="replicates", kind="no_worse", margin=0.02),
]


def claim_keys() -> list[str]:
    return [c.key for c in CLAIMS]


def select(keys: str | None, claims: list[Claim] | None = None) -> list[Claim]:
    """The claims named in a comma-separated `keys` (all when empty); an unknown key names the nearest ones."""
    claims = CLAIMS if claims is None else claims
    if not keys:
        return list(claims)
    by_key = {c.key: c for c in claims}
    wanted = [k.strip() for k in keys.split(",") if k.strip()]
    for k in wanted:
        if k not in by_key:
            near = difflib.get_close_matches(k, list(by_key), n=3)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise ConfigError(f"unknown claim {k!r}{hint}; claims: {', '.join(by_key)}")
    return [by_key[k] for k in wanted]


def _check_unique() -> None:
    keys = claim_keys()
    if len(set(keys)) != len(keys):
        raise ConfigError(f"claim keys must be unique: {keys}")


_check_unique()
