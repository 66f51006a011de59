"""Which modules of a model call the attention registry: an attention function that records each call, then runs
plain SDPA. Routing registers it under its own name for one probe forward, so the hot path never checks for it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from .prefix import plain_sdpa

PROBE_ATTENTION_NAME = "hificl_probe"


@dataclass(frozen=True)
class AttentionCall:
    """What a probe forward saw of one attention call: the module and the shapes it attends with."""

    module: torch.nn.Module
    num_query_heads: int
    num_kv_heads: int
    head_dim: int
    device: torch.device


def probe_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """The probe outside a recording: plain SDPA."""
    return plain_sdpa(module, query, key, value, attention_mask, **kwargs)


def register_probe() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PROBE_ATTENTION_NAME, probe_attention_forward)
    AttentionMaskInterface.register(PROBE_ATTENTION_NAME, sdpa_mask)


@contextlib.contextmanager
def record_attention_calls() -> Iterator[list[AttentionCall]]:
    """The attention calls that reach the probe function during the block, in call order: the probe records into
    a list of this block's own (a function registered for the block, replaced by the plain probe after it)."""
    from transformers import AttentionInterface

    found: list[AttentionCall] = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        found.append(AttentionCall(module, query.shape[1], key.shape[1], query.shape[-1], query.device))
        return plain_sdpa(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(PROBE_ATTENTION_NAME, recording)
    try:
        yield found
    finally:
        AttentionInterface.register(PROBE_ATTENTION_NAME, probe_attention_forward)
