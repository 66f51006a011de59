"""Method registry: `get_method(name, **options)`."""

from __future__ import annotations

from .base import Method
from .hificl import HiFICL
from .icl import InContext, ZeroShot
from .live import Live
from .lora import Lora
from .mimic import MimIC

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (ZeroShot, InContext, HiFICL, Live, MimIC, Lora)}


def register_method(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, **options) -> Method:
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; known methods: {sorted(METHODS)}.")
    try:
        return METHODS[name](**options)
    except TypeError as error:
        raise ValueError(f"Method {name!r}: bad option(s) {sorted(options)}: {error}") from None


__all__ = ["METHODS", "Method", "HiFICL", "InContext", "Live", "Lora", "MimIC", "ZeroShot", "get_method",
           "register_method"]
