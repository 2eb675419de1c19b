"""Variant registry. Each module in this package registers one method with `@register_variant`.

Adding a variant is one file here (discovered automatically) plus one test file.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil

from ..errors import UnknownVariantError
from .base import Variant

_REGISTRY: dict[str, type[Variant]] = {}


def register_variant(cls: type[Variant]) -> type[Variant]:
    _REGISTRY[cls.name] = cls
    return cls


def get_variant(name: str) -> type[Variant]:
    _discover()
    if name not in _REGISTRY:
        near = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise UnknownVariantError(f"unknown variant {name!r}{hint}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def variant_names() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def variant_for_peft_type(peft_type: str, variant: str | None, use_dora: bool) -> str:
    """The variant a file's `peft_type` stands for. "LORA" is plain LoRA or DoRA (PEFT's `use_dora`)."""
    _discover()
    if peft_type == "LORA":
        if variant not in (None, "lora", "dora"):
            raise UnknownVariantError(f"peft_type 'LORA' with variant {variant!r}: a LORA file holds lora or dora")
        return "dora" if use_dora or variant == "dora" else "lora"
    names = [n for n, cls in _REGISTRY.items() if cls.peft_type == peft_type]
    if variant in names:
        return variant
    if len(names) == 1:
        return names[0]
    known = sorted({cls.peft_type for cls in _REGISTRY.values()})
    raise UnknownVariantError(f"unknown peft_type {peft_type!r}; lorakit reads: {known}")


_discovered = False


def _discover() -> None:
    global _discovered
    if not _discovered:
        _discovered = True
        for info in pkgutil.iter_modules(__path__):
            if info.name != "base":
                importlib.import_module(f"{__name__}.{info.name}")


__all__ = ["Variant", "register_variant", "get_variant", "variant_names", "variant_for_peft_type"]
