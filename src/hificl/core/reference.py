"""The slow, obviously-correct float64 oracle of every formula in `hificl.core.attention`, for tests and
debugging (`HiFICLModel.reference_attention()`). Registered with a mask builder that always materialises the
mask, so the oracle never depends on the fast path's mask shortcuts."""

from __future__ import annotations

import torch

from .attention import expand_pairs, route, run_routed
from .config import Formula
from .prefix import is_causal_call, repeat_kv

REFERENCE_ATTENTION_NAME = "hificl_reference"


def visible_real_keys(module, mask, q_len: int, kv_len: int, is_causal, device) -> torch.Tensor:
    """Boolean [b or 1, 1, q, kv] visibility of the real keys, built from a mask (bool or additive) or causality."""
    if mask is not None:
        mask = mask[..., :kv_len]
        return mask if mask.dtype == torch.bool else mask == 0
    if is_causal_call(module, is_causal) and q_len > 1:
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
    """EXACT: one softmax over the concatenation ``[K_v; K]`` with the real keys masked. FIXED_ALPHA:
    ``SA + sum_i exp(q.k_v_i) / (Z1 + Z2) v_i`` with Z2 over the visible keys. UNMASKED: ``Z1 = sum exp(q.k_v)``,
    ``Z2 = sum exp(q.k)`` over all real keys, ``SA`` = masked softmax attention, output
    ``Z2/(Z1+Z2) * SA + sum_i exp(q.k_v_i)/(Z1+Z2) v_i``."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out_dtype = query.dtype

    def attend(q, k, v, mask, pairs):
        q, k, v = q.double(), repeat_kv(k, q.shape[1] // k.shape[1]).double(), repeat_kv(v, q.shape[1] // v.shape[1]).double()
        visible = visible_real_keys(module, mask, q.shape[2], k.shape[2], is_causal, q.device)
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        masked = scores.masked_fill(~visible, float("-inf"))
        if pairs is None:  # rows that see no key at all (padding queries) give 0, not NaN
            return torch.matmul(torch.softmax(masked, -1).nan_to_num(0.0), v).transpose(1, 2)
        vk, vv = expand_pairs(pairs, q.shape[0], torch.float64)
        v_scores = torch.matmul(q, vk.transpose(-1, -2)) * scale
        if pairs.formula is Formula.EXACT:
            probs = torch.softmax(torch.cat([v_scores, masked], -1), -1)
            return torch.matmul(probs, torch.cat([vv, v], 2)).transpose(1, 2)
        z1 = v_scores.exp().sum(-1, keepdim=True)
        sa = torch.matmul(torch.softmax(masked, -1).nan_to_num(0.0), v)
        if pairs.formula is Formula.FIXED_ALPHA:
            z2 = masked.exp().sum(-1, keepdim=True)
            return (sa + torch.matmul(v_scores.exp() / (z1 + z2), vv)).transpose(1, 2)
        z2 = scores.exp().sum(-1, keepdim=True)
        out = z2 / (z1 + z2) * sa + torch.matmul(v_scores.exp() / (z1 + z2), vv)
        return out.transpose(1, 2)

    def plain(q, k, v, mask):
        return attend(q, k, v, mask, None)

    out = run_routed(attend, plain, query, key, value, attention_mask, route(module, query))
    return out.to(out_dtype), None


def materialised_mask(*args, **kwargs):
    """transformers' SDPA mask, never skipped for unpadded causal or bidirectional batches."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register_reference() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(REFERENCE_ATTENTION_NAME, reference_attention_forward)
    AttentionMaskInterface.register(REFERENCE_ATTENTION_NAME, materialised_mask)
