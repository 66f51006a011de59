"""HiFICL as a PEFT method: its config (`HiFICLConfig`, ``peft_type "HIFICL"``), its tuner layer and its tuner.
`register()` (run when this package is imported, which ``import hificl`` arranges as soon as PEFT is imported:
`hificl.peft_registration`) makes PEFT's own API serve it: `get_peft_model`, `PeftModel.from_pretrained`,
`load_adapter`, `save_pretrained`, `transformers.Trainer` on the wrapped model.

PEFT's `register_peft_method` accepts only members of its closed `PeftType` enum, so the type is registered as a
string in the mappings PEFT's loaders read by the config's ``peft_type`` (a supported use of string types)."""

from __future__ import annotations

from .config import PEFT_TYPE, HiFICLConfig
from .layer import HiFICLLayer
from .model import HiFICLTuner


def register() -> None:
    """Serve ``peft_type "HIFICL"`` through PEFT's API (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = HiFICLConfig
    PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = HiFICLTuner
    PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = HiFICLTuner.prefix


register()

__all__ = ["PEFT_TYPE", "HiFICLConfig", "HiFICLLayer", "HiFICLTuner", "register"]
