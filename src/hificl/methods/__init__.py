"""Method registry: `get_method(name, **options)`. Adding a method means one module (its options, and how it
composes a prompter, an adapter and an objective: see `hificl.methods.base`) plus a line here."""

from __future__ import annotations

from pathlib import Path

from ..adapters import CONFIG_NAME, LoraModel, saved_method
from ..core import AdapterMismatchError
from ..core.validate import unknown_options
from ..registry import Registry
from .base import Method, Parts, distinct_labels
from .distill import Distill
from .hificl import HiFICL
from .icl import InContext, ZeroShot
from .live import Live, LiveModel
from .lora import Lora
from .mimic import MimIC, MimicModel
from .peft_prompts import Cartridge, PrefixTuning

METHODS: Registry[type[Method]] = Registry("method")
for _method in (ZeroShot, InContext, HiFICL, Live, MimIC, Lora, PrefixTuning, Cartridge, Distill):
    METHODS.register(_method.name, _method)


def register_method(cls: type[Method], replace: bool = False) -> type[Method]:
    """Serve `cls` as method ``cls.name`` (usable as a class decorator)."""
    METHODS.register(cls.name, cls, replace=replace)
    return cls


def get_method(name: str, **options) -> Method:
    """Method `name` with `options`; an option it does not take is named, with the ones it takes."""
    cls = METHODS.get(name)
    known = cls.option_names()
    if set(options) - set(known):
        raise ValueError(unknown_options(f"Method {name!r}", options, known))
    return cls(**options)


def method_for_adapter(folder) -> Method:
    """The method (with the settings the adapter was saved with) of a saved adapter folder."""
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


__all__ = ["METHODS", "Method", "Parts", "distinct_labels", "Cartridge", "Distill", "PrefixTuning", "HiFICL", "InContext", "Live", "LiveModel", "Lora", "LoraModel", "MimIC",
           "MimicModel", "ZeroShot", "get_method", "method_for_adapter",
           "register_method"]
