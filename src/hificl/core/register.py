"""Registering hificl's attention functions with transformers: the fast one, its float64 reference and the probe.
transformers is imported here, when the functions are registered (an adapter attaching), not when `hificl.core` is
imported."""

from __future__ import annotations

from .attention import ATTENTION_NAME, hificl_attention_forward
from .probe import register_probe
from .reference import register_reference


def register_attention() -> None:
    """Register the fast attention, the float64 reference and the probe with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, hificl_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    register_reference()
    register_probe()
