"""HiFICL as a method: the query prompt alone, and a `HiFICLModel` on the backbone trained on the answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..core import HiFICLConfig
from ..model import HiFICLModel, get_hificl_model
from .base import Method


class HiFICL(Method):
    """Options are `HiFICLConfig` fields (num_virtual_tokens, rank, target_layers, normalizer, ...)."""

    name = "hificl"
    trainable = True

    def __init__(self, **options: Any):
        super().__init__()
        self.config = HiFICLConfig(**options)
        self.wrapped: HiFICLModel | None = None

    def setup(self, backbone, task, seed: int) -> None:
        super().setup(backbone, task, seed)
        if self.config.init_seed is None:
            self.config.init_seed = seed
        self.wrapped = get_hificl_model(backbone.model, self.config)

    @property
    def model(self) -> nn.Module:
        return self.wrapped

    def save(self, folder: str | Path) -> None:
        self.wrapped.save_pretrained(folder)

    def load(self, folder: str | Path) -> None:
        self.wrapped.delete_adapter(self.wrapped.active_adapter)
        self.wrapped.load_adapter(folder)

    def close(self) -> None:
        if self.wrapped is not None:
            self.wrapped.unload()
            self.wrapped = None

    def describe(self) -> dict[str, Any]:
        return {"method": "HiFICL", "num_virtual_tokens": self.config.num_virtual_tokens, "rank": self.config.rank}
