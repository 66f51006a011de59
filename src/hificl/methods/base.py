"""The method interface: what zero-shot, in-context learning, HiFICL (and the baselines) have in common.

A method decides (1) the prompt of a query (ICL puts demonstrations in front), (2) the module that is trained
and generates (HiFICL wraps the backbone's model), and (3) the training loss. Trainer and evaluator only talk
to this interface.
"""

from __future__ import annotations

import contextlib
from abc import ABC
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..backbones import Backbone
from ..tasks import Example, Segment, Task


class Method(ABC):
    """Base class. Subclasses set `name`, and `trainable = True` if they have parameters to train."""

    name: ClassVar[str]
    trainable: ClassVar[bool] = False

    def __init__(self, **options: Any):
        if options:
            raise ValueError(f"Method {self.name!r} takes no option(s) {sorted(options)}.")
        self.backbone: Backbone | None = None
        self.task: Task | None = None
        self.train_overrides: dict[str, Any] = {}  # per-method training settings (e.g. LoRA's learning rate)

    def setup(self, backbone: Backbone, task: Task, seed: int) -> None:
        """Bind to a backbone and a task (build adapters, demonstration pools ...)."""
        self.backbone, self.task = backbone, task

    @property
    def model(self) -> nn.Module:
        """The module that is trained and generates."""
        return self.backbone.model

    def prompt(self, example: Example) -> list[Segment]:
        """The segments the model sees for `example` (without its answer)."""
        return self.task.query_prompt(example)

    def training_batch(self, items: list[Example]) -> dict[str, Any]:
        """Model inputs for training items: the prompt then the target, right-padded, `labels` on the target."""
        return self.backbone.encode([self.prompt(e) for e in items], [self.task.target_text(e) for e in items],
                                    padding_side="right")

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Training loss of a `training_batch`: cross-entropy on the answer tokens."""
        return model(**batch).loss

    def param_groups(self, lr: float) -> list[dict[str, Any]] | None:
        """Optimiser groups as ``[{"params": [names], "lr": ...}]`` when parameters need their own learning
        rates (None: one group at `lr`)."""
        return None

    def disabled(self) -> contextlib.AbstractContextManager:
        """A context in which the model is the untouched base model (for teachers)."""
        return contextlib.nullcontext()

    def generate(self, batch: dict[str, torch.Tensor], **generation: Any) -> torch.Tensor:
        with torch.no_grad():
            return self.model.generate(**batch, **generation)

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad) if self.trainable else 0

    def save(self, folder: str | Path) -> None:
        """Save what training produced (nothing for training-free methods)."""

    def load(self, folder: str | Path) -> None:
        """Load what `save` wrote."""

    def close(self) -> None:
        """Give the backbone back as it was."""

    def describe(self) -> dict[str, Any]:
        """The method's settings, for reports."""
        return {"method": self.name}
