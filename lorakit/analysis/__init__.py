"""Looking inside adapters: per-layer ranks, sizes and norms (spectra and more arrive with later issues)."""
from .inspect import describe_adapter, layer_table

__all__ = ["describe_adapter", "layer_table"]
