"""The vocabulary of HiFICL's settings that the core's math reads: how virtual pairs enter a head's attention
(`Formula`) and which attention path computes it (`ATTENTION_PATHS`). The validated adapter config itself is
`hificl.tuner.HiFICLConfig`, a PEFT config."""

from __future__ import annotations

import enum

NORMALIZERS = ("exact", "unmasked")
ATTENTION_PATHS = ("auto", "split", "concat")
"""How the exact formula is computed (`hificl.core.prefix`): "split" -- the backend's fused kernel over the real keys
merged with the virtual slots by log-sum-exp; "concat" -- the virtual slots prepended to the real keys, one SDPA
call; "auto" -- "split" on CUDA, "concat" elsewhere (where it measured faster). All three give the same numbers up to
rounding."""


class Formula(enum.Enum):
    """How virtual pairs enter a head's attention.

    EXACT: softmax attention over ``[K_v; K]`` with the model's masks on the real keys (the paper's equation).
    UNMASKED: the authors' released code, whose normaliser of the real keys runs over ALL keys (future and
    padding included) while the attention itself stays masked; for measuring the difference only.
    FIXED_ALPHA: the ablation "alpha fixed to 1": ``SA + sum_i exp(q.k_v_i) / (Z1 + Z2) v_i``.
    """

    EXACT = "exact"
    UNMASKED = "unmasked"
    FIXED_ALPHA = "fixed_alpha"
