"""Combining adapters: exact delta-space merging (`merge_folders`)."""
from .merge import merge_folders

__all__ = ["merge_folders"]
