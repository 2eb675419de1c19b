"""lorakit: low-rank adapters for any PyTorch model — create, train, shrink, combine, serve, inspect."""
from . import errors
from .config import AdapterConfig
from .hf import from_pretrained
from .init import initialize, register_init
from .io import export_lora, load_adapter, read_adapter, save_adapter
from .model import (active_adapters, adapter_names, adapter_parameters, clone_adapter, count_parameters,
                    delete_adapter, disabled, get_config, inject, mark_trainable, merge, merge_and_unload,
                    parameter_report, set_active, unload, unmerge)
from .quantize import quantize_base
from .routing import BASE, pin_routing, route
from .variants import get_variant, register_variant, variant_names

__version__ = "0.1.0"

__all__ = [
    "active_adapters", "adapter_names", "adapter_parameters", "AdapterConfig", "BASE", "clone_adapter",
    "count_parameters", "delete_adapter", "disabled", "errors", "export_lora", "from_pretrained", "get_config",
    "get_variant", "initialize", "inject", "load_adapter", "mark_trainable", "merge", "merge_and_unload",
    "parameter_report", "pin_routing", "quantize_base", "read_adapter", "register_init", "register_variant",
    "route", "save_adapter", "set_active", "unload", "unmerge", "variant_names",
]
