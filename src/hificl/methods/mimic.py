"""MimIC (CVPR 2025): a learnable shift per attention head with a query-dependent magnitude.

For each layer and query head: a shift ``v_h ~ N(0, 0.001^2)`` and a magnitude ``mu = Z1_hat / (Z1_hat + Z2)``
with ``log Z1_hat = w_h . q + b_h`` (``w_h, b_h`` start at 0) and ``Z2 = sum_j exp(q.k_j / sqrt(d))`` over the keys
the query may see (causal and padding masks applied; ``q`` is the post-RoPE query). Head output:
``SA(q, K, V) + mu * v_h``. Loss: layer-wise MSE between the student's MLP outputs (query alone, with shifts)
and the k-shot teacher's at the query+answer positions, plus 0.5 CE on the answer.

Exact and fused: ``mu`` and ``SA`` come out of ONE SDPA call over an extra always-visible key. With the query
augmented by a constant-1 channel, the key ``[w_h, b_h] / scale`` scores exactly ``log Z1_hat``; two extra value
channels then carry the extra key's softmax weight (``mu``) and the real keys' total weight (``1 - mu``, summed
directly rather than by cancellation), and ``SA`` is the real part divided by the latter. Near-zero at init
(``|mu v_h| <= |v_h| ~ 1e-3``), exactly the base model when ``v_h = 0``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..core import attend_with_prefix
from ..routing import route_attention
from .teacher import Teacher, capture_outputs, layer_mse
from .wrapped import TeacherShiftMethod

MIMIC_ATTENTION = "hificl_mimic"
SHIFT_ATTR = "hificl_mimic_shift"
_PAD = 8  # extra channels: [1 (query) / alpha (values), mu, zeros...]; 8 keeps fused kernels' alignment


def mimic_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                            **kwargs):
    provider = getattr(module, SHIFT_ATTR, None)
    params = provider() if provider is not None else None
    if params is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
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
    return out[..., :dim] / real_mass + mu * shift, None


def register_mimic_attention() -> None:
    AttentionInterface.register(MIMIC_ATTENTION, mimic_attention_forward)
    AttentionMaskInterface.register(MIMIC_ATTENTION, sdpa_mask)


class MimicShifts(nn.Module):
    def __init__(self, num_layers: int, heads: int, head_dim: int, generator: torch.Generator):
        super().__init__()
        self.shift = nn.Parameter(torch.randn(num_layers, heads, head_dim, generator=generator) * 1e-3)
        self.weight = nn.Parameter(torch.zeros(num_layers, heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(num_layers, heads))


class MimIC(TeacherShiftMethod):
    name = "mimic"
    label = "MimIC"
    weights_file = "mimic.safetensors"

    def __init__(self, shots: int = 8, ce_weight: float = 0.5, align_weight: float = 1.0, **options: Any):
        super().__init__(shots, **options)
        self.ce_weight, self.align_weight = float(ce_weight), float(align_weight)
        self.routing = None

    def build_shifts(self, backbone, seed: int) -> nn.Module:
        register_mimic_attention()
        self.routing = route_attention(backbone.model, MIMIC_ATTENTION, purpose="add MimIC shifts")
        self.mlps = self.routing.mlps()
        for index, module in enumerate(self.routing.attention_modules):
            setattr(module, SHIFT_ATTR, functools.partial(self._params, index))
        first = self.routing.calls[0]
        return MimicShifts(len(self.routing.calls), first.num_query_heads, first.head_dim,
                           torch.Generator().manual_seed(seed))

    def unhook(self) -> None:
        for module in self.routing.attention_modules:
            if hasattr(module, SHIFT_ATTR):
                delattr(module, SHIFT_ATTR)
        self.routing.restore()
        self.routing = None

    def _params(self, layer: int):
        if not self.wrapped.active:
            return None
        shifts = self.wrapped.shifts
        return shifts.shift[layer], shifts.weight[layer], shifts.bias[layer]

    def loss(self, model, batch):
        student, teacher = batch["student"], batch["teacher"]
        with capture_outputs(self.mlps) as student_hidden:
            out = model(**student)
        _, teacher_hidden = Teacher.run(model, self.disabled, teacher, self.mlps)
        align = layer_mse(teacher_hidden, student_hidden, teacher["offsets"], Teacher.aligned_mask(teacher, student))
        return self.align_weight * align + self.ce_weight * out.loss
