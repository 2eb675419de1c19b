"""Adapter files in PEFT's format (safetensors + adapter_config.json); never pickles."""
from .export import export_lora
from .files import CONFIG_NAME, WEIGHTS_NAME, load_adapter, read_adapter, save_adapter

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "export_lora", "load_adapter", "read_adapter", "save_adapter"]
