"""The attention function that merges virtual key-value pairs into any transformers decoder.

It is registered in transformers' `AttentionInterface` under `ATTENTION_NAME` and is called by every attention
module of the routed language model with keys/values after RoPE and after the KV-cache update (so the virtual
pairs never enter the cache). Each attention module carries a *provider* (attribute `PROVIDER_ATTR`), a
callable ``provider(batch_size, dtype) -> routing`` that says which virtual pairs each batch row gets:

* ``None``: no virtual pairs (adapter disabled, layer not targeted): the plain SDPA backend runs unchanged;
* a `VirtualPairs`: the same pairs for every row;
* a list of ``(row_indices, VirtualPairs | None)``: a mixed-adapter batch, each group run on its own rows.

The fast "exact" path prepends the virtual keys/values to the real ones and keeps the backend's fused kernel
(decoding, one query per row, uses grouped math that reads the KV cache once instead):
with no explicit mask (the mask builder skips it for unpadded causal batches) it also prepends ``n`` dummy
queries, so that SDPA's top-left-aligned ``is_causal`` lets real query ``i`` (at row ``n + i``) see every
virtual slot and the real keys ``0..i`` -- exactly the paper's masking, with no ``T x T`` tensor built;
with an explicit mask (padding, sliding windows) ``n`` always-visible columns are prepended to it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, Union

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "hificl"
REFERENCE_ATTENTION_NAME = "hificl_reference"
PROVIDER_ATTR = "hificl_provider"


@dataclass(frozen=True)
class VirtualPairs:
    """Materialised virtual keys and values of one layer, ``[heads, n, head_dim]`` (or ``[batch, heads, n, d]``)."""

    keys: torch.Tensor
    values: torch.Tensor
    normalizer: str = "exact"  # "exact", "unmasked", or "fixed_alpha" (the exact one with alpha fixed to 1)


Routing = Union[None, VirtualPairs, Sequence[tuple[torch.Tensor, Union[VirtualPairs, None]]]]

@dataclass(frozen=True)
class AttentionCall:
    """What a probe forward saw of one attention call: the module and the shapes it attends with."""

    module: torch.nn.Module
    num_query_heads: int
    num_kv_heads: int
    head_dim: int
    device: torch.device


_call_log: list[AttentionCall] | None = None


@contextlib.contextmanager
def record_attention_calls() -> Iterator[list[AttentionCall]]:
    """Collect, in call order, the attention calls that reach the hificl attention functions in this block."""
    global _call_log
    previous, _call_log = _call_log, []
    try:
        yield _call_log
    finally:
        _call_log = previous


def _route(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor) -> Routing:
    if _call_log is not None:
        _call_log.append(AttentionCall(module, query.shape[1], key.shape[1], query.shape[-1], query.device))
    provider: Callable[[int, torch.dtype], Routing] | None = getattr(module, PROVIDER_ATTR, None)
    return provider(query.shape[0], query.dtype) if provider is not None else None


def _expand(pairs: VirtualPairs, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values = pairs.keys.to(dtype), pairs.values.to(dtype)
    if keys.dim() == 3:
        keys, values = keys.unsqueeze(0), values.unsqueeze(0)
    return keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1)


def _with_visible_columns(mask: torch.Tensor, n: int, kv_length: int) -> torch.Tensor:
    """Crop a 4-D mask to the real keys and prepend `n` always-visible columns (bool True / additive 0)."""
    mask = mask[..., :kv_length]
    fill = torch.ones if mask.dtype == torch.bool else torch.zeros
    return torch.cat([fill(*mask.shape[:-1], n, dtype=mask.dtype, device=mask.device), mask], dim=-1)


def _is_causal(module: torch.nn.Module, is_causal: bool | None) -> bool:
    return is_causal if is_causal is not None else getattr(module, "is_causal", True)


def attend_with_prefix(module, query, key, value, mask, prefix_keys, prefix_values, dropout=0.0, scaling=None,
                       is_causal=None) -> torch.Tensor:
    """Softmax attention of `query` ``[b, h, q, d]`` over always-visible prefix slots ``[b, h, n, d]`` followed by
    the real keys/values (``[b, kv_heads, k, d]``, any GQA grouping) under the model's causal and padding mask,
    through SDPA's fused kernel. Value dims may differ from key dims. Returns ``[b, q, h, d_v]``."""
    batch, heads, q_len, _ = query.shape
    if q_len == 1 and dropout == 0.0:
        return _decode_with_prefix(query, key, value, mask, prefix_keys, prefix_values, scaling)
    groups = heads // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    n = prefix_keys.shape[2]
    if mask is not None:
        mask = _with_visible_columns(mask, n, key.shape[2])
        out = F.scaled_dot_product_attention(
            query, torch.cat([prefix_keys, key], 2), torch.cat([prefix_values, value], 2),
            attn_mask=mask, dropout_p=dropout, scale=scaling,
        )
    elif _is_causal(module, is_causal) and q_len > 1:
        # No mask means the batch is unpadded and causal with top-left alignment (keys past q_len are empty
        # static-cache slots, as in transformers' SDPA integration): dummy queries shift the causal diagonal.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        dummy = query.new_zeros(batch, heads, n, query.shape[-1])
        out = F.scaled_dot_product_attention(
            torch.cat([dummy, query], 2), torch.cat([prefix_keys, key], 2), torch.cat([prefix_values, value], 2),
            dropout_p=dropout, scale=scaling, is_causal=True,
        )[:, :, n:]
    else:
        out = F.scaled_dot_product_attention(
            query, torch.cat([prefix_keys, key], 2), torch.cat([prefix_values, value], 2),
            dropout_p=dropout, scale=scaling,
        )
    return out.transpose(1, 2).contiguous()


def _decode_with_prefix(query, key, value, mask, prefix_keys, prefix_values, scaling) -> torch.Tensor:
    """One query per row (decoding): grouped-query math that reads the KV cache once, like the backend, instead
    of expanding it per query head and copying it next to the prefix. Returns ``[b, 1, h, d_v]``."""
    batch, heads, _, dim = query.shape
    kv_heads, n = key.shape[1], prefix_keys.shape[2]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else dim ** -0.5
    grouped = query.reshape(batch, kv_heads, groups, dim)
    real = torch.matmul(grouped, key.transpose(-1, -2)) * scale  # [b, kv_heads, groups, k]
    if mask is not None:
        mask = mask[..., : key.shape[2]].reshape(mask.shape[0], -1, 1, key.shape[2])  # [b, 1 or h, 1, k]
        if mask.shape[1] == heads:
            mask = mask.reshape(mask.shape[0], kv_heads, groups, key.shape[2])
        real = real.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else real + mask
    prefix = torch.matmul(query, prefix_keys.transpose(-1, -2)).reshape(batch, kv_heads, groups, n) * scale
    probs = torch.softmax(torch.cat([prefix, real], -1), dim=-1, dtype=torch.float32).to(query.dtype)
    prefix_values = prefix_values.reshape(batch, kv_heads, groups, n, -1)
    out = torch.matmul(probs[..., None, :n], prefix_values).squeeze(-2) + torch.matmul(probs[..., n:], value)
    return out.reshape(batch, heads, 1, -1).transpose(1, 2).contiguous()


def _exact(module, query, key, value, mask, pairs, dropout, scaling, is_causal) -> torch.Tensor:
    """Softmax attention over ``[K_v; K]``, ``[V_v; V]`` (the paper's equation); returns [b, q, h, d]."""
    v_keys, v_values = _expand(pairs, query.shape[0], query.dtype)
    return attend_with_prefix(module, query, key, value, mask, v_keys, v_values, dropout, scaling, is_causal)


def _fixed_alpha(module, query, key, value, mask, pairs, dropout, scaling, is_causal) -> torch.Tensor:
    """The "alpha fixed to 1" ablation: ``SA + sum_i exp(q.k_v_i) / (Z1 + Z2) v_i``. The exact path with a
    constant-1 channel appended to the real values yields alpha (the real keys' softmax mass) alongside
    ``alpha SA + (1 - alpha) O_v``; adding ``(1 - alpha) SA`` gives the ablated output."""
    v_keys, v_values = _expand(pairs, query.shape[0], query.dtype)
    ones = value.new_ones(value.shape[:-1] + (1,))
    out = attend_with_prefix(module, query, key, torch.cat([value, ones], -1), mask, v_keys,
                             torch.cat([v_values, v_values.new_zeros(v_values.shape[:-1] + (1,))], -1),
                             dropout, scaling, is_causal)
    alpha = out[..., -1:]
    sa = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=is_causal)[0]
    return out[..., :-1] + (1 - alpha) * sa


def _unmasked(module, query, key, value, mask, pairs, dropout, scaling, is_causal) -> torch.Tensor:
    """The authors' formula: ``alpha * SA + (1 - alpha) * softmax(q K_v) V_v`` with ``alpha = Z2 / (Z1 + Z2)``
    and Z2 summed over ALL real keys (no causal, no padding mask) while SA keeps the masks. Builds the full
    score matrix, as their code does; for measuring the difference only."""
    sa = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=is_causal)[0]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    groups = query.shape[1] // key.shape[1]
    lse_real = torch.logsumexp(torch.matmul(query, repeat_kv(key, groups).transpose(-1, -2)) * scale, dim=-1)
    v_keys, v_values = _expand(pairs, query.shape[0], query.dtype)
    virtual_scores = torch.matmul(query, v_keys.transpose(-1, -2)) * scale
    alpha = torch.sigmoid(lse_real - torch.logsumexp(virtual_scores, dim=-1)).unsqueeze(-1)
    virtual_out = torch.matmul(torch.softmax(virtual_scores, dim=-1), v_values)
    return alpha.transpose(1, 2) * sa + ((1 - alpha) * virtual_out).transpose(1, 2)


_PATHS = {"exact": _exact, "unmasked": _unmasked, "fixed_alpha": _fixed_alpha}


def _run_routed(fn_pairs, fn_plain, module, query, key, value, attention_mask, routing) -> torch.Tensor:
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
    routing = _route(module, query, key)

    def plain(q, k, v, mask):
        return sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)[0]

    def with_pairs(q, k, v, mask, pairs):
        return _PATHS[pairs.normalizer](module, q, k, v, mask, pairs, dropout, scaling, is_causal)

    return _run_routed(with_pairs, plain, module, query, key, value, attention_mask, routing), None


def _visible_real_keys(module, mask, q_len: int, kv_len: int, is_causal, device) -> torch.Tensor:
    """Boolean [b or 1, 1, q, kv] visibility of the real keys, built from a mask (bool or additive) or causality."""
    if mask is not None:
        mask = mask[..., :kv_len]
        return mask if mask.dtype == torch.bool else mask == 0
    if _is_causal(module, is_causal) and q_len > 1:
        rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
        return (torch.arange(kv_len, device=device)[None, :] <= rows)[None, None]
    return torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=device)


def reference_attention_forward(
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
    """Slow, obviously-correct float64 restatement of every path, for tests. Registered with a mask builder
    that always materialises the mask. "exact": one softmax over the concatenation ``[K_v; K]`` with the real
    keys masked. "fixed_alpha": ``SA + sum_i exp(q.k_v_i) / (Z1 + Z2) v_i`` with Z2 over the visible keys. "unmasked": ``Z1 = sum exp(q.k_v)``, ``Z2 = sum exp(q.k)`` over all real keys,
    ``SA`` = masked softmax attention, output ``Z2/(Z1+Z2) * SA + sum_i exp(q.k_v_i)/(Z1+Z2) v_i``."""
    routing = _route(module, query, key)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out_dtype = query.dtype

    def attend(q, k, v, mask, pairs):
        q, k, v = q.double(), repeat_kv(k, q.shape[1] // k.shape[1]).double(), repeat_kv(v, q.shape[1] // v.shape[1]).double()
        visible = _visible_real_keys(module, mask, q.shape[2], k.shape[2], is_causal, q.device)
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        masked = scores.masked_fill(~visible, float("-inf"))
        if pairs is None:  # rows that see no key at all (padding queries) give 0, not NaN
            return torch.matmul(torch.softmax(masked, -1).nan_to_num(0.0), v).transpose(1, 2)
        vk, vv = _expand(pairs, q.shape[0], torch.float64)
        v_scores = torch.matmul(q, vk.transpose(-1, -2)) * scale
        if pairs.normalizer == "exact":
            probs = torch.softmax(torch.cat([v_scores, masked], -1), -1)
            return torch.matmul(probs, torch.cat([vv, v], 2)).transpose(1, 2)
        if pairs.normalizer == "fixed_alpha":
            z1 = v_scores.exp().sum(-1, keepdim=True)
            z2 = masked.exp().sum(-1, keepdim=True)
            sa = torch.matmul(torch.softmax(masked, -1).nan_to_num(0.0), v)
            return (sa + torch.matmul(v_scores.exp() / (z1 + z2), vv)).transpose(1, 2)
        z1 = v_scores.exp().sum(-1, keepdim=True)
        z2 = scores.exp().sum(-1, keepdim=True)
        sa = torch.matmul(torch.softmax(masked, -1).nan_to_num(0.0), v)
        out = z2 / (z1 + z2) * sa + torch.matmul(v_scores.exp() / (z1 + z2), vv)
        return out.transpose(1, 2)

    def plain(q, k, v, mask):
        return attend(q, k, v, mask, None)

    out = _run_routed(attend, plain, module, query, key, value, attention_mask, routing)
    return out.to(out_dtype), None


def _materialised_mask(*args, **kwargs):
    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register_attention() -> None:
    """Register both attention functions and their mask builders with transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, hificl_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    AttentionInterface.register(REFERENCE_ATTENTION_NAME, reference_attention_forward)
    AttentionMaskInterface.register(REFERENCE_ATTENTION_NAME, _materialised_mask)
