"""hificl: High-Fidelity In-Context Learning -- learnable low-rank virtual key-value pairs in every attention
head of a frozen Hugging Face model.

Importing hificl is cheap: the root imports `hificl.core` (torch only); the adapter API (`HiFICLConfig`,
`HiFICLModel`, `get_hificl_model`) and every registry load on first use. PEFT serves ``peft_type "HIFICL"`` as
soon as both hificl and PEFT are imported, in either order (`hificl.peft_registration`)."""

from __future__ import annotations

import importlib
from typing import Any

from .core import AdapterMismatchError, HiFICLConfigError, UnsupportedModelError
from .peft_registration import register_with_peft_when_imported

register_with_peft_when_imported()

__version__ = "0.1.0"

_ON_FIRST_USE = {"HiFICLConfig": "hificl.tuner", "HiFICLModel": "hificl.adapters", "get_hificl_model": "hificl.adapters"}


def __getattr__(name: str) -> Any:
    if name in _ON_FIRST_USE:
        return getattr(importlib.import_module(_ON_FIRST_USE[name]), name)
    raise AttributeError(f"module 'hificl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ON_FIRST_USE))


__all__ = [
    "HiFICLConfig", "HiFICLModel", "get_hificl_model", "AdapterMismatchError", "HiFICLConfigError",
    "UnsupportedModelError", "__version__",
]
