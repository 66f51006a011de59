"""LoRA through PEFT on the language model's attention projections only (`hificl.adapters.LoraModel`). r 16, alpha
32, dropout 0.05; CE on the answer. An exact no-op at init (PEFT starts B at 0). Saved in PEFT's own format."""

from __future__ import annotations

from typing import Any

from ..adapters import LoraModel
from ..core.validate import integer, number
from .base import Method


class Lora(Method):
    name = "lora"
    trainable = True

    def __init__(self, r: int = 16, alpha: int = 32, dropout: float = 0.05, **options: Any):
        super().__init__(**options)
        self.r = integer(r, "lora: r")
        self.alpha = number(alpha, "lora: alpha", positive=True)
        self.dropout = float(number(dropout, "lora: dropout", below=1))

    @property
    def options(self) -> dict[str, Any]:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout}

    @property
    def label(self) -> str:
        return "LoRA"

    @classmethod
    def from_saved(cls, config: dict[str, Any]) -> "Lora":
        return cls(r=config.get("r", 16), alpha=config.get("lora_alpha", 32), dropout=config.get("lora_dropout", 0.05))

    def adapter(self, backbone, seeds) -> LoraModel:
        return LoraModel(backbone.model, self.r, self.alpha, self.dropout, init_seed=seeds.replicate)
