"""Softmax attention over always-visible prefix slots followed by a layer's real keys, through SDPA's fused kernel.

The building block of every attention that adds keys no query position may be masked from: HiFICL's virtual
pairs and MimIC's magnitude key. Real keys keep the model's causal and padding masks; the prefix slots carry no
position and are visible from every query.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv


def with_visible_columns(mask: torch.Tensor, n: int, kv_length: int) -> torch.Tensor:
    """Crop a 4-D mask to the real keys and prepend `n` always-visible columns (bool True / additive 0)."""
    mask = mask[..., :kv_length]
    fill = torch.ones if mask.dtype == torch.bool else torch.zeros
    return torch.cat([fill(*mask.shape[:-1], n, dtype=mask.dtype, device=mask.device), mask], dim=-1)


def is_causal_call(module: torch.nn.Module, is_causal: bool | None) -> bool:
    """Whether an attention call is causal: the call's own flag, else the module's (decoders: True)."""
    return is_causal if is_causal is not None else getattr(module, "is_causal", True)


def attend_with_prefix(module, query, key, value, mask, prefix_keys, prefix_values, dropout=0.0, scaling=None,
                       is_causal=None) -> torch.Tensor:
    """Softmax attention of `query` ``[b, h, q, d]`` over always-visible prefix slots ``[b, h, n, d]`` followed by
    the real keys/values (``[b, kv_heads, k, d]``, any GQA grouping) under the model's causal and padding mask,
    through SDPA's fused kernel. Value dims may differ from key dims. Returns ``[b, q, h, d_v]``.

    With no explicit mask (the mask builder skips it for unpadded causal batches) ``n`` dummy queries are
    prepended too, so SDPA's top-left-aligned ``is_causal`` lets real query ``i`` (at row ``n + i``) see every
    prefix slot and the real keys ``0..i``, with no ``T x T`` tensor built; with an explicit mask (padding,
    sliding windows) ``n`` always-visible columns are prepended to it. Decoding (one query per row) uses grouped
    math that reads the KV cache once."""
    batch, heads, q_len, _ = query.shape
    if q_len == 1 and dropout == 0.0:
        return _decode_with_prefix(query, key, value, mask, prefix_keys, prefix_values, scaling)
    groups = heads // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    n = prefix_keys.shape[2]
    if mask is not None:
        mask = with_visible_columns(mask, n, key.shape[2])
        out = F.scaled_dot_product_attention(
            query, torch.cat([prefix_keys, key], 2), torch.cat([prefix_values, value], 2),
            attn_mask=mask, dropout_p=dropout, scale=scaling,
        )
    elif is_causal_call(module, is_causal) and q_len > 1:
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
