"""What the attention calls of a HiFICL model see, recorded during one block: the post-RoPE queries, keys and
values and the visibility of the real keys per layer (`capture_attention`; distillation initialises virtual pairs
from a teacher's demonstration tokens with it), and each real query's softmax mass on the virtual slots
(`recording`; `hificl inspect` reads it).

The recording attention function is made for the block that records (a closure over its own `Recording`) and
registered under `RECORDING_ATTENTION_NAME` only while the block runs, so no recorder outlives its call."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .adapters import HiFICLModel
from .core.attention import ATTENTION_NAME, hificl_attention_forward, repeat_kv, route
from .core.reference import materialised_mask, visible_real_keys

RECORDING_ATTENTION_NAME = "hificl_recording"


@dataclass
class Recording:
    """What the recording attention saw, per layer (index of the routed attention modules)."""

    mass: dict[int, torch.Tensor] = field(default_factory=dict)  # [heads]: summed virtual share over queries
    count: dict[int, int] = field(default_factory=dict)  # queries counted per layer
    captured: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # (query, key, value, visible)


def _recording_attention(layers: dict[int, int], recording: Recording):
    """hificl's attention, plus (float64, from the same inputs) each real query's softmax mass on the virtual
    slots, accumulated per layer and head into `recording`; rows and positions that are padding are not counted."""

    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        layer = layers.get(id(module))
        if layer is not None:
            visible = visible_real_keys(module, attention_mask, query.shape[2], key.shape[2], is_causal, query.device)
            recording.captured[layer] = (query.detach(), key.detach(), value.detach(), visible)
            routing = route(module, query)
            if routing is not None and not isinstance(routing, list):
                scale = scaling if scaling is not None else query.shape[-1] ** -0.5
                q = query.double()
                k = repeat_kv(key, q.shape[1] // key.shape[1]).double()
                real = (q @ k.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
                virtual = q @ routing.keys.double().transpose(-1, -2) * scale
                share = torch.sigmoid(torch.logsumexp(virtual, -1) - torch.logsumexp(real, -1))  # [b, h, q]
                counted = visible.any(-1).expand(share.shape)  # queries that see a real key (not padding)
                mass = torch.where(counted, share, torch.zeros_like(share)).sum((0, 2))
                recording.mass[layer] = recording.mass.get(layer, 0) + mass.cpu()
                recording.count[layer] = recording.count.get(layer, 0) + int(counted[:, 0].sum())
        return hificl_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                        is_causal=is_causal, **kwargs)

    return forward


@contextlib.contextmanager
def recording(model: HiFICLModel) -> Iterator[Recording]:
    """Route `model`'s attention through a recording function for the block; what it saw is in the yielded
    `Recording`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    found = Recording()
    layers = {id(m): i for i, m in enumerate(model.routing.attention_modules)}
    AttentionInterface.register(RECORDING_ATTENTION_NAME, _recording_attention(layers, found))
    AttentionMaskInterface.register(RECORDING_ATTENTION_NAME, materialised_mask)
    model.routing.set(RECORDING_ATTENTION_NAME)
    try:
        yield found
    finally:
        model.routing.set(ATTENTION_NAME)
        AttentionInterface.register(RECORDING_ATTENTION_NAME, hificl_attention_forward)  # the closure released


@contextlib.contextmanager
def capture_attention(model: HiFICLModel) -> Iterator[dict[int, tuple[torch.Tensor, ...]]]:
    """During the block, ``captured[layer] = (query, key, value, visible)`` of the last forward's attention calls:
    post-RoPE queries ``[b, h, q, d]``, keys and values ``[b, kv_heads, k, d]``, and the boolean visibility of
    the real keys ``[b or 1, 1, q, k]``."""
    with recording(model) as found:
        yield found.captured
