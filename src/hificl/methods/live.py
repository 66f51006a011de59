"""LIVE (NeurIPS 2024): a learnable vector per decoder layer added, norm-preserving, to each layer's MLP output
(`hificl.adapters.live`), trained on ``0.5 CE(answer) + 1.0 KL(teacher || student)`` of the next-token
distributions; the teacher is the frozen model with k demonstrations in context. The KL is taken, as in LIVE's
original code, at the answer tokens' own positions (`kl_positions: answer`, so the first answer token's prediction
is not distilled), or where each answer token is predicted (`predicting`); on the embedded default the original's
positions measured better (README), so they are the default. Learning rates: 5e-3 for the vectors, 1e-2 for the
scales.
"""

from __future__ import annotations

import logging
from typing import Any

from ..adapters.live import LiveConfig, LiveModel
from ..core.validate import boolean, choice, integer, number
from ..objectives import Teacher, TeacherKL
from .base import Method

logger = logging.getLogger(__name__)


class Live(Method):
    name = "live"
    trainable = True
    objective_options = ("shots", "ce_weight", "kl_weight", "kl_positions", "resample_demos")

    def __init__(self, shots: int = 8, ce_weight: float = 0.5, kl_weight: float = 1.0, vector_lr: float = 5e-3,
                 scale_lr: float = 1e-2, kl_positions: str = "answer", resample_demos: bool = False,
                 **options: Any):
        super().__init__(**options)
        self.kl_positions = choice(kl_positions, "live: kl_positions", ("predicting", "answer"))
        self.resample_demos = boolean(resample_demos, "live: resample_demos")
        self.shots = integer(shots, "live: shots (the teacher's demonstrations)")
        self.ce_weight, self.kl_weight = float(number(ce_weight, "live: ce_weight")), float(number(kl_weight, "live: kl_weight"))
        self.vector_lr = float(number(vector_lr, "live: vector_lr", positive=True))
        self.scale_lr = float(number(scale_lr, "live: scale_lr", positive=True))

    @property
    def options(self) -> dict[str, Any]:
        return {"shots": self.shots, "ce_weight": self.ce_weight, "kl_weight": self.kl_weight,
                "vector_lr": self.vector_lr, "scale_lr": self.scale_lr, "kl_positions": self.kl_positions,
                "resample_demos": self.resample_demos}

    @property
    def label(self) -> str:
        return "LIVE"

    @classmethod
    def from_saved(cls, config: dict[str, Any]) -> "Live":
        logger.warning("The LIVE adapter records no training options (saved by an earlier version): its row "
                       "reports LIVE's defaults.")
        return cls()

    def adapter(self, backbone, seeds) -> LiveModel:
        return LiveModel(backbone.model, LiveConfig(init_seed=seeds.replicate))

    def objective(self, backbone, task, prompter, adapter, seeds) -> TeacherKL:
        teacher = Teacher.with_shots(backbone, task, self.shots, seeds, resample=self.resample_demos,
                                     adapter=adapter)
        return TeacherKL(backbone, task, prompter, teacher, self.ce_weight, self.kl_weight, self.kl_positions)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": ["shifts.vectors"], "lr": self.vector_lr},
                {"params": ["shifts.scales"], "lr": self.scale_lr}]
