"""LIVE (NeurIPS 2024): a learnable vector per decoder layer added, norm-preserving, to each layer's MLP output.

``h' = (h + a_l v_l) * ||h|| / ||h + a_l v_l||`` at every position, with ``v_l ~ N(0, 0.01^2)`` (hidden size)
and ``a_l = 0.1``. Loss ``0.5 CE(answer) + 1.0 KL(teacher || student)`` on the next-token distributions at the
answer positions; the teacher is the frozen model with k demonstrations in context. Learning rates: 5e-3 for
the vectors, 1e-2 for the scales. Not a no-op at init (the random vectors rotate h slightly); the shift of a
token's MLP output is bounded by ``||a v|| ~ 0.1 * 0.01 * sqrt(hidden)`` relative to its norm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..routing import find_language_model
from .teacher import Teacher, answer_positions, kl_teacher_student
from .wrapped import TeacherShiftMethod


class LiveShifts(nn.Module):
    def __init__(self, num_layers: int, hidden_size: int, generator: torch.Generator):
        super().__init__()
        self.vectors = nn.Parameter(torch.randn(num_layers, hidden_size, generator=generator) * 0.01)
        self.scales = nn.Parameter(torch.full((num_layers,), 0.1))

    def shift(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        shifted = hidden + (self.scales[layer] * self.vectors[layer]).to(hidden.dtype)
        norm = hidden.norm(dim=-1, keepdim=True)
        return shifted * (norm / shifted.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(hidden.dtype).tiny))


class Live(TeacherShiftMethod):
    name = "live"
    label = "LIVE"
    weights_file = "live.safetensors"

    def __init__(self, shots: int = 8, ce_weight: float = 0.5, kl_weight: float = 1.0, vector_lr: float = 5e-3,
                 scale_lr: float = 1e-2, **options: Any):
        super().__init__(shots, **options)
        self.ce_weight, self.kl_weight = float(ce_weight), float(kl_weight)
        self.vector_lr, self.scale_lr = float(vector_lr), float(scale_lr)
        self._hooks: list = []

    def build_shifts(self, backbone, seed: int) -> nn.Module:
        mlps = find_language_model(backbone.model).mlps()
        hidden = backbone.model.config.get_text_config(decoder=True).hidden_size
        self._hooks = [mlp.register_forward_hook(self._hook(index)) for index, mlp in enumerate(mlps)]
        return LiveShifts(len(mlps), hidden, torch.Generator().manual_seed(seed))

    def unhook(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _hook(self, layer: int):
        def hook(_module, _inputs, output):
            return self.wrapped.shifts.shift(layer, output) if self.wrapped.active else output
        return hook

    def loss(self, model, batch):
        student, teacher = batch["student"], batch["teacher"]
        out = model(**student)
        teacher_logits, _ = Teacher.run(model, self.disabled, teacher)
        aligned = Teacher.align(teacher_logits, teacher["offsets"], student["input_ids"].shape[1])
        where = answer_positions(student["labels"]) & Teacher.aligned_mask(teacher, student)
        kl = kl_teacher_student(aligned, out.logits, where)
        return self.ce_weight * out.loss + self.kl_weight * kl

    def param_groups(self, lr: float):
        return [{"params": ["shifts.vectors"], "lr": self.vector_lr}, {"params": ["shifts.scales"], "lr": self.scale_lr}]
