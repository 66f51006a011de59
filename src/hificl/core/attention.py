"""The attention function that merges virtual key-value pairs into any transformers decoder.

It is registered in transformers' `AttentionInterface` under `ATTENTION_NAME` (`hificl.core.register`) and is called by every attention
module of the routed language model with keys/values after RoPE and after the KV-cache update (so the virtual
pairs never enter the cache). Each attention module carries a *provider* (attribute `PROVIDER_ATTR`: the adapter's
`hificl.tuner.HiFICLLayer`, a child module), a callable ``provider(batch_size, dtype, device) -> routing`` that says
which virtual pairs each batch row gets:

* ``None``: no virtual pairs (adapter disabled, layer not targeted): the plain SDPA backend runs unchanged;
* a `VirtualPairs`: the same pairs for every row;
* a list of ``(row_indices, VirtualPairs | None)``: a mixed-adapter batch, each group run on its own rows.

The exact formula is softmax attention over the virtual slots followed by the real keys (`hificl.core.prefix`);
the float64 oracle the tests hold it against lives in `hificl.core.reference`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch

from .config import Formula
from .prefix import attend_with_prefix, plain_sdpa, repeat_kv

ATTENTION_NAME = "hificl"
PROVIDER_ATTR = "hificl"


@dataclass(frozen=True)
class VirtualPairs:
    """Materialised virtual keys and values of one layer, ``[heads, n, head_dim]`` (or ``[batch, heads, n, d]``)."""

    keys: torch.Tensor
    values: torch.Tensor
    formula: Formula = Formula.EXACT
    path: str = "auto"  # how the exact formula is computed (`hificl.core.config.ATTENTION_PATHS`)


Routing = Union[None, VirtualPairs, Sequence[tuple[torch.Tensor, Union[VirtualPairs, None]]]]


def route(module: torch.nn.Module, query: torch.Tensor) -> Routing:
    """The virtual pairs this attention call gets, from the module's provider (None: no provider)."""
    provider: Callable[[int, torch.dtype, torch.device], Routing] | None = getattr(module, PROVIDER_ATTR, None)
    return provider(query.shape[0], query.dtype, query.device) if provider is not None else None


def expand_pairs(pairs: VirtualPairs, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values as ``[batch, heads, n, d]`` of `dtype` (a broadcast view, no copy)."""
    keys, values = pairs.keys.to(dtype), pairs.values.to(dtype)
    if keys.dim() == 3:
        keys, values = keys.unsqueeze(0), values.unsqueeze(0)
    return keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1)


def _exact(module, query, key, value, mask, pairs, dropout, scaling, is_causal) -> torch.Tensor:
    """Softmax attention over ``[K_v; K]``, ``[V_v; V]`` (the paper's equation); returns [b, q, h, d]."""
    return attend_with_prefix(module, query, key, value, mask, pairs.keys.to(query.dtype), pairs.values.to(query.dtype),
                              dropout, scaling, is_causal, pairs.path)


def _fixed_alpha(module, query, key, value, mask, pairs, dropout, scaling, is_causal) -> torch.Tensor:
    """The "alpha fixed to 1" ablation: ``SA + sum_i exp(q.k_v_i) / (Z1 + Z2) v_i``. The exact path with a
    constant-1 channel appended to the real values yields alpha (the real keys' softmax mass) alongside
    ``alpha SA + (1 - alpha) O_v``; adding ``(1 - alpha) SA`` gives the ablated output."""
    v_keys, v_values = expand_pairs(pairs, query.shape[0], query.dtype)
    ones = value.new_ones(value.shape[:-1] + (1,))
    out = attend_with_prefix(module, query, key, torch.cat([value, ones], -1), mask, v_keys,
                             torch.cat([v_values, v_values.new_zeros(v_values.shape[:-1] + (1,))], -1),
                             dropout, scaling, is_causal, pairs.path)
    alpha = out[..., -1:]
    sa = plain_sdpa(module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=is_causal)[0]
    return out[..., :-1] + (1 - alpha) * sa


def _unmasked(module, query, key, value, mask, pairs, dropout, scaling, is_causal) -> torch.Tensor:
    """The authors' formula: ``alpha * SA + (1 - alpha) * softmax(q K_v) V_v`` with ``alpha = Z2 / (Z1 + Z2)``
    and Z2 summed over ALL real keys (no causal, no padding mask) while SA keeps the masks. Builds the full
    score matrix, as their code does; for measuring the difference only."""
    sa = plain_sdpa(module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=is_causal)[0]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    groups = query.shape[1] // key.shape[1]
    lse_real = torch.logsumexp(torch.matmul(query, repeat_kv(key, groups).transpose(-1, -2)) * scale, dim=-1)
    v_keys, v_values = expand_pairs(pairs, query.shape[0], query.dtype)
    virtual_scores = torch.matmul(query, v_keys.transpose(-1, -2)) * scale
    alpha = torch.sigmoid(lse_real - torch.logsumexp(virtual_scores, dim=-1)).unsqueeze(-1)
    virtual_out = torch.matmul(torch.softmax(virtual_scores, dim=-1), v_values)
    return alpha.transpose(1, 2) * sa + ((1 - alpha) * virtual_out).transpose(1, 2)


_FORMULAS = {Formula.EXACT: _exact, Formula.UNMASKED: _unmasked, Formula.FIXED_ALPHA: _fixed_alpha}


def run_routed(fn_pairs, fn_plain, query, key, value, attention_mask, routing: Routing) -> torch.Tensor:
    """Run ``fn_pairs(q, k, v, mask, pairs)`` or ``fn_plain(q, k, v, mask)`` on the rows each routing entry names."""
    if routing is None:
        return fn_plain(query, key, value, attention_mask)
    if isinstance(routing, VirtualPairs):
        return fn_pairs(query, key, value, attention_mask, routing)
    out = None
    for rows, pairs in routing:
        mask = attention_mask
        if mask is not None and mask.shape[0] > 1:
            mask = mask.index_select(0, rows)
        q, k, v = query.index_select(0, rows), key.index_select(0, rows), value.index_select(0, rows)
        part = fn_plain(q, k, v, mask) if pairs is None else fn_pairs(q, k, v, mask, pairs)
        if out is None:
            out = part.new_empty((query.shape[0],) + part.shape[1:])
        out = out.index_copy(0, rows, part)
    return out


def hificl_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The registered fast attention (see the module docstring)."""
    if kwargs.get("softcap") is not None:
        raise ValueError("hificl attention does not support attention logit soft-capping (e.g. Gemma 2).")

    def plain(q, k, v, mask):
        return plain_sdpa(module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)[0]

    def with_pairs(q, k, v, mask, pairs):
        return _FORMULAS[pairs.formula](module, q, k, v, mask, pairs, dropout, scaling, is_causal)

    return run_routed(with_pairs, plain, query, key, value, attention_mask, route(module, query)), None
