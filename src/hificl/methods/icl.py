"""Zero-shot and k-shot in-context learning: nothing trained, only the prompt differs (`hificl.prompting`)."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..core.validate import choice, integer
from ..prompting import KShot
from ..tasks import Example
from .base import Method


class ZeroShot(Method):
    """The query prompt alone."""

    name = "zero-shot"

    @property
    def label(self) -> str:
        return "zero-shot"


class InContext(Method):
    """k demonstrations in front of the query (see `hificl.prompting.KShot` for the options)."""

    name = "icl"

    def __init__(self, shots: int = 8, selection: str = "random", pool_size: int | None = None,
                 features: str | Callable[[list[Example]], torch.Tensor] = "model", **options: Any):
        super().__init__(**options)
        self.shots = integer(shots, "icl: shots", minimum=0)
        self.selection = choice(selection, "icl: selection", ("random", "retrieval"))
        self.pool_size = integer(pool_size, "icl: pool_size", allow_none=True)
        if features != "model" and not callable(features):
            raise ValueError(f"icl: features must be 'model' or a callable, got {features!r}.")
        self.features = features

    @property
    def options(self) -> dict[str, Any]:
        return {"shots": self.shots, "selection": self.selection, "pool_size": self.pool_size,
                "features": self.features if isinstance(self.features, str) else getattr(self.features, "__name__", "callable")}

    @property
    def label(self) -> str:
        return f"{self.shots}-shot ICL" + (" (retrieved)" if self.selection == "retrieval" else "")

    @property
    def random(self) -> bool:
        return self.selection == "random" and self.shots > 0

    def prompter(self, backbone, task, seeds) -> KShot:
        return KShot(task, backbone, self.shots, self.selection, self.pool_size, self.features,
                     data_seed=seeds.data, demos_seed=seeds.replicate)
