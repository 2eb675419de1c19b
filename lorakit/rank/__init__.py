"""Rank tools: run an adapter at a lower rank, compress it (LoRA-Squeeze), anneal ranks during training, prune a
model with LoRA gradients (LoRAPrune) and train on a pruned model then recover the adapter (LoRAM)."""
from .anneal import RankAnnealer, replace_in_optimizer
from .loram import loram_experiment, prune_structured, pruned_copy, recover_adapter
from .prune import LoRAPrune, PruningRecord, cubic_sparsity, load_pruned, prune_experiment, save_pruned
from .squeeze import (cont_squeeze, dense_svd, energy_rank, factor_svd, squeeze, squeeze_adapter, squeeze_folder,
                      split_factors)
from .truncate import at_rank, evaluate_at_ranks

__all__ = ["squeeze", "factor_svd", "dense_svd", "energy_rank", "split_factors", "squeeze_adapter", "squeeze_folder",
           "cont_squeeze", "RankAnnealer", "replace_in_optimizer", "at_rank", "evaluate_at_ranks", "LoRAPrune",
           "PruningRecord", "cubic_sparsity", "save_pruned", "load_pruned", "prune_experiment", "prune_structured",
           "pruned_copy", "recover_adapter", "loram_experiment"]
