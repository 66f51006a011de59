"""HiFICL: the query prompt alone and a `HiFICLModel` on the backbone, trained on the answers (the paper's
objective), or with MimIC's teacher alignment added (the paper's "+teacher" ablation, which hurt)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..core.validate import integer, number
from ..adapters import HiFICLModel
from ..tuner import HiFICLConfig
from ..tuner.config import HIFICL_FIELDS
from ..objectives import AnswerLoss, Teacher, TeacherMLPAlignment
from .base import Method


class HiFICL(Method):
    """Options are `HiFICLConfig` fields (num_virtual_tokens, rank, target_layers, normalizer, the ablations
    full_rank_keys / full_rank_values / fixed_alpha, ...), plus the teacher-alignment ablation: with
    ``teacher_weight > 0`` the loss adds ``teacher_weight *`` the layer-wise MSE between the MLP outputs of the
    student and of a ``teacher_shots``-shot teacher (MimIC's alignment loss). ``init_seed`` unset: the
    replicate's init seed."""

    name = "hificl"
    trainable = True
    objective_options = ("teacher_weight", "teacher_shots")

    def __init__(self, teacher_weight: float = 0.0, teacher_shots: int = 8, **options: Any):
        super().__init__()
        self.config = HiFICLConfig(**options)
        self.teacher_weight = float(number(teacher_weight, "method hificl: teacher_weight"))
        self.teacher_shots = integer(teacher_shots, "method hificl: teacher_shots")

    @classmethod
    def option_names(cls) -> list[str]:
        return sorted(set(super().option_names()) | set(HIFICL_FIELDS))

    @property
    def options(self) -> dict[str, Any]:
        return {**self.config.settings(), "teacher_weight": self.teacher_weight, "teacher_shots": self.teacher_shots}

    @property
    def ablations(self) -> list[str]:
        found = [name for name in ("full_rank_keys", "full_rank_values", "fixed_alpha") if getattr(self.config, name)]
        if self.config.normalizer != "exact":
            found.append(f"{self.config.normalizer} normalizer")
        if self.teacher_weight:
            found.append(f"teacher x{self.teacher_weight:g}")
        return found

    @property
    def label(self) -> str:
        return "HiFICL" + (f" ({', '.join(self.ablations)})" if self.ablations else "")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "ablations": self.ablations}

    @classmethod
    def from_saved(cls, config: dict[str, Any]) -> "HiFICL":
        return cls(**{k: v for k, v in config.items() if k in HIFICL_FIELDS})

    def adapter(self, backbone, seeds) -> HiFICLModel:
        config = self.config
        if config.init_seed is None:
            config = dataclasses.replace(config, init_seed=seeds.replicate)
        return HiFICLModel(backbone.model, config)

    def objective(self, backbone, task, prompter, adapter, seeds) -> AnswerLoss:
        if not self.teacher_weight:
            return AnswerLoss(backbone, task, prompter)
        teacher = Teacher.with_shots(backbone, task, self.teacher_shots, seeds, adapter=adapter)
        return TeacherMLPAlignment(backbone, task, prompter, teacher, adapter.routing.mlps(),
                                   align_weight=self.teacher_weight, ce_weight=1.0)
