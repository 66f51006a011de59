"""MimIC (CVPR 2025): a learnable shift per attention head with a query-dependent magnitude
(`hificl.adapters.mimic`). Loss: layer-wise MSE between the student's MLP outputs (query alone, with shifts) and
the k-shot teacher's at the aligned query+answer positions -- never a sequence-initial token, as in the original --
plus 0.5 CE on the answer. Every occurrence of a query gets a fresh draw of the teacher's demonstrations
(`resample_demos`: every epoch, seeded by it; the original draws every step, which gives each occurrence a fresh
draw too), and biases get no weight decay, as in the original. Deviations, each stated in the README: Z2 is masked
like the attention it normalises (the original's runs over all keys), and the CE covers the answer tokens only
(the MimIC repository's covers the whole sequence; the HiFICL authors' forks, answer only).
"""

from __future__ import annotations

import logging
from typing import Any

from ..adapters.mimic import MimicConfig, MimicModel
from ..core.validate import boolean, integer, number
from ..distillation import TeacherAnswerAlignment
from ..objectives import Teacher, TeacherMLPAlignment
from .base import Method

logger = logging.getLogger(__name__)


class MimIC(Method):
    name = "mimic"
    trainable = True
    objective_options = ("shots", "ce_weight", "align_weight", "resample_demos")
    distils_ensembles = False  # its alignment compares hidden states with ONE teacher context

    def __init__(self, shots: int = 8, ce_weight: float = 0.5, align_weight: float = 1.0,
                 resample_demos: bool = True, **options: Any):
        super().__init__(**options)
        self.shots = integer(shots, "mimic: shots (the teacher's demonstrations)")
        self.ce_weight = float(number(ce_weight, "mimic: ce_weight"))
        self.align_weight = float(number(align_weight, "mimic: align_weight"))
        self.resample_demos = boolean(resample_demos, "mimic: resample_demos")

    @property
    def options(self) -> dict[str, Any]:
        return {"shots": self.shots, "ce_weight": self.ce_weight, "align_weight": self.align_weight,
                "resample_demos": self.resample_demos}

    @property
    def label(self) -> str:
        return "MimIC"

    @classmethod
    def from_saved(cls, config: dict[str, Any]) -> "MimIC":
        logger.warning("The MimIC adapter records no training options (saved by an earlier version): its row "
                       "reports MimIC's defaults.")
        return cls()

    def adapter(self, backbone, seeds) -> MimicModel:
        return MimicModel(backbone.model, MimicConfig(init_seed=seeds.replicate))

    def objective(self, backbone, task, prompter, adapter, seeds) -> TeacherMLPAlignment:
        teacher = Teacher.with_shots(backbone, task, self.shots, seeds, resample=self.resample_demos,
                                     adapter=adapter)
        return TeacherMLPAlignment(backbone, task, prompter, teacher, adapter.routing.mlps(),
                                   align_weight=self.align_weight, ce_weight=self.ce_weight)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": ["shifts.bias"], "weight_decay": 0.0}]

    def distillation_objective(self, backbone, task, prompter, adapter, answers, ce_weight,
                               align_weight: float = 0.0) -> TeacherAnswerAlignment:
        """MimIC's layer-wise alignment with the teacher, on the teacher's own answers (one teacher context); it
        aligns MLP outputs already, so it takes no attention alignment."""
        return TeacherAnswerAlignment(backbone, task, prompter, answers, adapter.routing.mlps(), ce_weight)
