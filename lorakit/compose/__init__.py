"""Combining adapters: merging (exact delta-space, element-wise TIES/DARE/DELLA/..., aligned LoRA-LEGO/KnOTS, PEFT's
own semantics) on a model (`merge_adapters`) or on PEFT LoRA folders (`merge_folders`)."""
from .merge import METHODS, MergeOptions, merge_adapters, merge_folders

__all__ = ["METHODS", "MergeOptions", "merge_adapters", "merge_folders"]
