"""Which modules of a model call the attention registry: an attention function that records each call, then runs
plain SDPA. Routing registers it under its own name for one probe forward, so the hot path never checks for it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PROBE_ATTENTION_NAME = "hificl_probe"


@dataclass(frozen=True)
class AttentionCall:
    """What a probe forward saw of one attention call: the module and the shapes it attends with."""

    module: torch.nn.Module
    num_query_heads: int
    num_kv_heads: int
    head_dim: int
    device: torch.device


_calls: list[AttentionCall] = []


def probe_attention_forward(module, query, key, value, attention_mask, **kwargs):
    _calls.append(AttentionCall(module, query.shape[1], key.shape[1], query.shape[-1], query.device))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_probe() -> None:
    AttentionInterface.register(PROBE_ATTENTION_NAME, probe_attention_forward)
    AttentionMaskInterface.register(PROBE_ATTENTION_NAME, sdpa_mask)


@contextlib.contextmanager
def record_attention_calls() -> Iterator[list[AttentionCall]]:
    """The attention calls that reach the probe function during the block, in call order."""
    start = len(_calls)
    found: list[AttentionCall] = []
    try:
        yield found
    finally:
        found.extend(_calls[start:])
        del _calls[start:]
