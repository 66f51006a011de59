"""HiFICL as a method: the query prompt alone, and a `HiFICLModel` on the backbone trained on the answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..core import HiFICLConfig
from ..model import HiFICLModel, get_hificl_model
from .base import Method
from .teacher import Teacher, capture_outputs, layer_mse


class HiFICL(Method):
    """Options are `HiFICLConfig` fields (num_virtual_tokens, rank, target_layers, normalizer, the ablations
    full_rank_keys / full_rank_values / fixed_alpha, ...), plus the teacher-alignment ablation: with
    ``teacher_weight > 0`` the loss adds ``teacher_weight *`` the layer-wise MSE between the MLP outputs of the
    student and of a ``teacher_shots``-shot teacher (MimIC's alignment loss), which HURT in the paper."""

    name = "hificl"
    trainable = True

    def __init__(self, teacher_weight: float = 0.0, teacher_shots: int = 8, **options: Any):
        super().__init__()
        self.config = HiFICLConfig(**options)
        if isinstance(teacher_weight, bool) or not isinstance(teacher_weight, (int, float)) or teacher_weight < 0:
            raise ValueError(f"hificl: teacher_weight must be a number >= 0, got {teacher_weight!r}.")
        self.teacher_weight = float(teacher_weight)
        self.teacher = Teacher(teacher_shots) if self.teacher_weight else None
        self.wrapped: HiFICLModel | None = None

    def setup(self, backbone, task, seed: int) -> None:
        super().setup(backbone, task, seed)
        if self.config.init_seed is None:
            self.config.init_seed = seed
        self.wrapped = get_hificl_model(backbone.model, self.config)
        if self.teacher is not None:
            self.teacher.setup(backbone, task, seed)
            self.mlps = self.wrapped.routing.mlps()

    def training_batch(self, items):
        student = super().training_batch(items)
        return {"student": student, "teacher": self.teacher.batch(items, student)} if self.teacher else student

    def loss(self, model, batch):
        if self.teacher is None:
            return model(**batch).loss
        student, teacher = batch["student"], batch["teacher"]
        with capture_outputs(self.mlps) as student_hidden:
            out = model(**student)
        _, teacher_hidden = Teacher.run(model, self.disabled, teacher, self.mlps)
        return out.loss + self.teacher_weight * layer_mse(teacher_hidden, student_hidden, teacher["offsets"],
                                                          Teacher.aligned_mask(teacher, student))

    @property
    def model(self) -> nn.Module:
        return self.wrapped

    def disabled(self):
        return self.wrapped.disable_adapter()

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
        ablations = [name for name in ("full_rank_keys", "full_rank_values", "fixed_alpha") if getattr(self.config, name)]
        if self.config.normalizer != "exact":
            ablations.append(f"{self.config.normalizer} normalizer")
        if self.teacher_weight:
            ablations.append(f"teacher x{self.teacher_weight:g}")
        label = "HiFICL" + (f" ({', '.join(ablations)})" if ablations else "")
        return {"method": label, "num_virtual_tokens": self.config.num_virtual_tokens, "rank": self.config.rank,
                "ablations": ablations}
