"""Method registry: `get_method(name, **options)`. Adding a method means one module (its options, and how it
composes a prompter, an adapter and an objective: see `hificl.methods.base`) plus a line in `BUILT_IN` (or
`register_method(cls)` from your own code).

The built-in methods are registered by where they live (`hificl.registry.Lazy`): their modules -- and PEFT,
accelerate and transformers behind them -- are imported when a method is first used, so listing the names is
cheap (``hificl --help``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..registry import Lazy, Registry

if TYPE_CHECKING:
    from .base import Method

BUILT_IN = {
    "zero-shot": "icl:ZeroShot", "icl": "icl:InContext", "hificl": "hificl:HiFICL", "live": "live:Live",
    "mimic": "mimic:MimIC", "lora": "lora:Lora", "prefix_tuning": "peft_prompts:PrefixTuning",
    "cartridge": "peft_prompts:Cartridge", "distill": "distill:Distill",
}

METHODS: "Registry[type[Method]]" = Registry("method")
for _name, _where in BUILT_IN.items():
    METHODS.register(_name, Lazy(f"{__name__}.{_where}"))


def register_method(cls: "type[Method]", replace: bool = False) -> "type[Method]":
    """Serve `cls` as method ``cls.name`` (usable as a class decorator)."""
    METHODS.register(cls.name, cls, replace=replace)
    return cls


def get_method(name: str, **options: Any) -> "Method":
    """Method `name` with `options`; an option it does not take is named, with the ones it takes."""
    from ..core.validate import unknown_options

    cls = METHODS.get(name)
    known = cls.option_names()
    if set(options) - set(known):
        raise ValueError(unknown_options(f"Method {name!r}", options, known))
    return cls(**options)


def method_for_adapter(folder) -> "Method":
    """The method (with the settings the adapter was saved with) of a saved adapter folder."""
    from ..adapters import CONFIG_NAME, saved_method
    from ..core import AdapterMismatchError

    name, config = saved_method(folder)
    trained = config.get("trained_by")
    if trained is None:
        return METHODS.get(name).from_saved(config)
    try:
        return get_method(trained["method"], **trained.get("options", {}))
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise AdapterMismatchError(f"{Path(folder) / CONFIG_NAME}: its 'trained_by' record {trained!r} does not name a "
                                   f"method this hificl knows with valid options ({error}). Re-save the adapter, or "
                                   "remove 'trained_by' to evaluate it under the settings its config holds.") from None


def trained_data(folder) -> dict[str, Any]:
    """The training data a saved adapter recorded (task, example counts, digest); empty when it recorded none."""
    from ..adapters import saved_method

    return (saved_method(folder)[1].get("trained_by") or {}).get("data") or {}


_PARTS = {"Method": "base", "Parts": "base", "distinct_labels": "base"}


def __getattr__(name: str) -> Any:
    """The method interface (`hificl.methods.base`) and the built-in method classes, imported on first use."""
    import importlib

    if name in _PARTS:
        return getattr(importlib.import_module(f"{__name__}.{_PARTS[name]}"), name)
    for where in BUILT_IN.values():
        module, _, attribute = where.partition(":")
        if attribute == name:
            return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BUILT_IN", "METHODS", "Method", "Parts", "distinct_labels", "Cartridge", "Distill", "PrefixTuning", "HiFICL",
           "InContext", "Live", "Lora", "MimIC", "ZeroShot", "get_method", "method_for_adapter", "register_method",
           "trained_data"]
