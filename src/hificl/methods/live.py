"""LIVE (NeurIPS 2024): a learnable vector per decoder layer added, norm-preserving, to each layer's MLP output.

``h' = (h + a_l v_l) * ||h|| / ||h + a_l v_l||`` at every position, with ``v_l ~ N(0, 0.01^2)`` (hidden size)
and ``a_l = 0.1``. Loss ``0.5 CE(answer) + 1.0 KL(teacher || student)`` on the next-token distributions; the
teacher is the frozen model with k demonstrations in context. The KL is taken, as in LIVE's original code, at
the answer tokens' own positions (`kl_positions: answer`, so the first answer token's prediction is not
distilled), or where each answer token is predicted (`predicting`); on the embedded default the original's
positions measured better (README), so they are the default. Learning rates: 5e-3 for the vectors, 1e-2
for the scales. Not a no-op at init (the random vectors rotate h slightly); the shift of a
token's MLP output is bounded by ``||a v|| ~ 0.1 * 0.01 * sqrt(hidden)`` relative to its norm.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters import ShiftModel, register_adapter
from ..core.validate import boolean, choice, integer, number
from ..objectives import Teacher, TeacherKL
from ..routing import ModelShape, find_language_model
from .base import Method, Parts

logger = logging.getLogger(__name__)


@dataclass
class LiveConfig:
    """LIVE's adapter settings: the initialisation of the vectors (std) and the scales."""

    vector_std: float = 0.01
    scale_init: float = 0.1
    init_seed: int = 0

    def __post_init__(self):
        number(self.vector_std, "LiveConfig.vector_std")
        number(self.scale_init, "LiveConfig.scale_init", minimum=None)
        integer(self.init_seed, "LiveConfig.init_seed", minimum=None)


class LiveShifts(nn.Module):
    def __init__(self, num_layers: int, hidden_size: int, config: LiveConfig):
        super().__init__()
        generator = torch.Generator().manual_seed(config.init_seed)
        self.vectors = nn.Parameter(torch.randn(num_layers, hidden_size, generator=generator) * config.vector_std)
        self.scales = nn.Parameter(torch.full((num_layers,), config.scale_init))

    def shift(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        shifted = hidden + (self.scales[layer] * self.vectors[layer]).to(hidden.dtype)
        norm = hidden.norm(dim=-1, keepdim=True)
        return shifted * (norm / shifted.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(hidden.dtype).tiny))


@register_adapter
class LiveModel(ShiftModel):
    """The base model with LIVE's shifted MLP outputs (see the module docstring)."""

    method = "live"
    title = "LIVE"
    config_class = LiveConfig

    def __init__(self, base_model, config: LiveConfig | None = None):
        super().__init__(base_model, config or LiveConfig())
        routing = find_language_model(base_model)
        self.shape = ModelShape.of(routing)
        mlps = routing.mlps()
        self.shifts = LiveShifts(len(mlps), self.shape.hidden_size, self.config).to(base_model.device)
        self._hooks = [mlp.register_forward_hook(self._hook(index)) for index, mlp in enumerate(mlps)]

    def _hook(self, layer: int):
        def hook(_module, _inputs, output):
            rows = self.row_mask(output.shape[0], output.device)
            if rows is False:
                return output
            shifted = self.shifts.shift(layer, output)
            return shifted if rows is True else torch.where(rows[:, None, None], shifted, output)
        return hook

    def _release(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


class Live(Method):
    name = "live"
    trainable = True

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

    def build(self, backbone, task, seeds) -> Parts:
        adapter = LiveModel(backbone.model, LiveConfig(init_seed=seeds.replicate))
        prompter = self.prompter(backbone, task, seeds)
        teacher = Teacher.with_shots(backbone, task, self.shots, seeds, resample=self.resample_demos,
                                     adapter=adapter)
        objective = TeacherKL(backbone, task, prompter, teacher, self.ce_weight, self.kl_weight, self.kl_positions)
        groups = [{"params": ["shifts.vectors"], "lr": self.vector_lr}, {"params": ["shifts.scales"], "lr": self.scale_lr}]
        return Parts(prompter, adapter, adapter, objective, groups, method=self)
