"""Serve many LoRA adapters on one decoder LM: paged KV cache, adapter pool, continuous batching, HTTP API."""
from .config import EngineConfig
from .engine import Engine
from .request import Request, RequestOutput, SamplingParams

__all__ = ["Engine", "EngineConfig", "Request", "RequestOutput", "SamplingParams"]
