"""What LIVE and MimIC share: a frozen base model plus small trainable "shift" modules, switched on and off as a
whole, trained against a k-shot teacher, saved as one safetensors file."""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from pathlib import Path
from typing import Any, Iterator

from safetensors.torch import load_file, save_file
from torch import nn

from ..io import atomic_write
from ..routing import freeze
from .base import Method
from .teacher import Teacher


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


class TeacherShiftMethod(Method):
    """Base of LIVE and MimIC: `build_shifts` makes the shifts and hooks them in; this class handles the teacher
    batches, enabling/disabling, saving, loading and giving the backbone back."""

    trainable = True
    weights_file: str

    def __init__(self, shots: int = 8, **options: Any):
        super().__init__(**options)
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
            raise ValueError(f"{self.name}: shots (the teacher's demonstrations) must be an int >= 1, got {shots!r}.")
        self.shots = shots
        self.teacher = Teacher(shots)
        self.wrapped: ShiftedModel | None = None

    @abstractmethod
    def build_shifts(self, backbone, seed: int) -> nn.Module:
        """Create the trainable shifts and hook them into `backbone.model`."""

    @abstractmethod
    def unhook(self) -> None:
        """Undo what `build_shifts` hooked in."""

    def setup(self, backbone, task, seed: int) -> None:
        super().setup(backbone, task, seed)
        self.teacher.setup(backbone, task, seed)
        shifts = self.build_shifts(backbone, seed).to(backbone.device)
        self.wrapped = ShiftedModel(backbone.model, shifts)

    @property
    def model(self) -> nn.Module:
        return self.wrapped

    def disabled(self):
        return self.wrapped.disabled()

    def training_batch(self, items):
        student = super().training_batch(items)
        return {"student": student, "teacher": self.teacher.batch(items, student)}

    def save(self, folder) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.wrapped.shifts.state_dict().items()}
        atomic_write(Path(folder) / self.weights_file, lambda tmp: save_file(tensors, tmp))

    def load(self, folder) -> None:
        path = Path(folder) / self.weights_file
        if not path.is_file():
            raise FileNotFoundError(f"No {self.name} weights in {folder}: expected {self.weights_file}.")
        self.wrapped.shifts.load_state_dict(load_file(str(path)))

    def close(self) -> None:
        if self.wrapped is not None:
            self.unhook()
            self.wrapped.release()
            self.wrapped = None

    def describe(self) -> dict[str, Any]:
        return {"method": self.label, "teacher_shots": self.shots}
