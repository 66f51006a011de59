"""MimIC's adapter (CVPR 2025): a learnable shift per attention head with a query-dependent magnitude.

For each layer and query head: a shift ``v_h ~ N(0, 0.001^2)`` and a magnitude ``mu = Z1_hat / (Z1_hat + Z2)``
with ``log Z1_hat = w_h . q + b_h`` (``w_h ~ N(0, 0.02^2)``, ``b_h = 0``, as in the original code) and
``Z2 = sum_j exp(q.k_j / sqrt(d))`` over the keys the query may see (causal and padding masks applied; ``q`` is the
post-RoPE query). Head output: ``SA(q, K, V) + mu * v_h``. How it is trained: `hificl.methods.mimic`.

Exact and fused: ``mu`` and ``SA`` come out of ONE SDPA call over an extra always-visible key
(`hificl.core.attend_with_prefix`). With the query augmented by a constant-1 channel, the key
``[w_h, b_h] / scale`` scores exactly ``log Z1_hat``; two extra value channels then carry the extra key's softmax
weight (``mu``) and the real keys' total weight (``1 - mu``, summed directly rather than by cancellation), and
``SA`` is the real part divided by the latter. Near-zero at init (``|mu v_h| <= |v_h| ~ 1e-3``), exactly the base
model when ``v_h = 0``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..core import attend_with_prefix
from ..core.validate import integer, number
from ..routing import ModelShape, route_attention
from .base import register_adapter
from .shifts import ShiftModel

MIMIC_ATTENTION = "hificl_mimic"
SHIFT_ATTR = "hificl_mimic_shift"
_PAD = 8  # extra channels: [1 (query) / alpha (values), mu, zeros...]; 8 keeps fused kernels' alignment


def mimic_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                            **kwargs):
    provider = getattr(module, SHIFT_ATTR, None)
    params, rows = provider(query.shape[0], query.device) if provider is not None else (None, False)

    def plain():
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)[0]

    if rows is False:
        return plain(), None
    shift, weight, bias = (p.to(query.dtype) for p in params)
    batch, heads, _, dim = query.shape
    scale = scaling if scaling is not None else dim ** -0.5

    def pad(x, first):
        extra = x.new_zeros(x.shape[:-1] + (_PAD,))
        if first is not None:
            extra[..., 0] = first
        return torch.cat([x, extra], -1)

    extra_key = torch.cat([weight / scale, (bias / scale)[:, None], weight.new_zeros(heads, _PAD - 1)], -1)
    extra_value = weight.new_zeros(heads, dim + _PAD)
    extra_value[:, dim + 1] = 1.0
    out = attend_with_prefix(
        module, pad(query, 1.0), pad(key, None), pad(value, 1.0), attention_mask,
        extra_key[None, :, None].expand(batch, -1, -1, -1), extra_value[None, :, None].expand(batch, -1, -1, -1),
        dropout, scale, is_causal,
    )
    real_mass, mu = out[..., dim:dim + 1], out[..., dim + 1:dim + 2]
    # a query that sees no real key (left padding) has no real mass: its SA is 0, as the backend gives it, not 0/0
    shifted = out[..., :dim] / real_mass.clamp_min(torch.finfo(real_mass.dtype).tiny) + mu * shift
    return (shifted if rows is True else torch.where(rows[:, None, None, None], shifted, plain())), None


def register_mimic_attention() -> None:
    AttentionInterface.register(MIMIC_ATTENTION, mimic_attention_forward)
    AttentionMaskInterface.register(MIMIC_ATTENTION, sdpa_mask)


@dataclass
class MimicConfig:
    """MimIC's adapter settings: the initialisation of the shifts (std), the magnitude weights (std) and bias."""

    shift_std: float = 1e-3
    weight_std: float = 0.02
    init_seed: int = 0

    def __post_init__(self):
        number(self.shift_std, "MimicConfig.shift_std")
        number(self.weight_std, "MimicConfig.weight_std")
        integer(self.init_seed, "MimicConfig.init_seed", minimum=None)


class MimicShifts(nn.Module):
    def __init__(self, num_layers: int, heads: int, head_dim: int, config: MimicConfig):
        super().__init__()
        generator = torch.Generator().manual_seed(config.init_seed)
        self.shift = nn.Parameter(torch.randn(num_layers, heads, head_dim, generator=generator) * config.shift_std)
        weight = torch.zeros(num_layers, heads, head_dim)
        if config.weight_std:
            weight.normal_(0.0, config.weight_std, generator=generator)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(num_layers, heads))


@register_adapter
class MimicModel(ShiftModel):
    """The base model with MimIC's shifted attention heads (see the module docstring)."""

    method = "mimic"
    title = "MimIC"
    config_class = MimicConfig

    def __init__(self, base_model, config: MimicConfig | None = None):
        super().__init__(base_model, config or MimicConfig())
        register_mimic_attention()
        self.routing = route_attention(base_model, MIMIC_ATTENTION, purpose="add MimIC shifts")
        self.shape = ModelShape.of(self.routing)
        self.shifts = MimicShifts(self.shape.num_layers, self.shape.num_query_heads, self.shape.head_dim,
                                  self.config).to(base_model.device)
        for index, module in enumerate(self.routing.attention_modules):
            setattr(module, SHIFT_ATTR, functools.partial(self._params, index))

    def _params(self, layer: int, batch_size: int, device: torch.device):
        rows = self.row_mask(batch_size, device)
        if rows is False:
            return None, False
        return (self.shifts.shift[layer], self.shifts.weight[layer], self.shifts.bias[layer]), rows

    def _release(self) -> None:
        for module in self.routing.attention_modules:
            if hasattr(module, SHIFT_ATTR):
                delattr(module, SHIFT_ATTR)
        self.routing.restore()
