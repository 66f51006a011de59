"""`ShiftedModel`: a frozen base model plus a method's small trainable modules, switched on and off as a whole."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from ..routing import freeze


class ShiftedModel(nn.Module):
    """Holds `base_model` (frozen in place) and `shifts` (the only trainable parameters). Methods hook the base
    model and read `active` to know whether their change applies; `disabled()` gives the untouched base."""

    def __init__(self, base_model: nn.Module, shifts: nn.Module):
        super().__init__()
        self._frozen = freeze(base_model)
        self.base_model, self.shifts = base_model, shifts
        self.active = True

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        previous, self.active = self.active, False
        try:
            yield
        finally:
            self.active = previous

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    def release(self) -> nn.Module:
        """Give back the base model with its parameters' gradient flags as they were."""
        self._frozen.restore()
        return self.base_model
