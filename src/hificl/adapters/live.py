"""LIVE's adapter (NeurIPS 2024): a learnable vector per decoder layer added, norm-preserving, to each layer's MLP
output: ``h' = (h + a_l v_l) * ||h|| / ||h + a_l v_l||`` at every position, with ``v_l ~ N(0, 0.01^2)`` (hidden
size) and ``a_l = 0.1``. Not a no-op at init (the random vectors rotate h slightly); the shift of a token's MLP
output is bounded by ``||a v|| ~ 0.1 * 0.01 * sqrt(hidden)`` relative to its norm. How it is trained:
`hificl.methods.live`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.validate import integer, number
from ..routing import ModelShape, find_language_model
from .base import register_adapter
from .shifts import ShiftModel


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
