"""Softmax attention over always-visible prefix slots followed by a layer's real keys: the building block of
every attention that adds keys no query position may be masked from (HiFICL's virtual pairs, MimIC's magnitude
key). Real keys keep the model's causal and padding masks; the prefix slots carry no position.

The fast path never copies the real keys or values (the split-KV merge): the backend's fused kernel attends over
the real keys alone, exactly as the frozen model does (grouped-query heads read natively), and returns its output
``O_r`` and log-sum-exp ``L_r``; the ``n`` prefix slots are a few ``[.., q, n]`` matmuls giving ``O_p`` and
``L_p``; and the two are merged exactly, ``O = a O_r + (1 - a) O_p`` with ``a = exp(L_r - L)``,
``L = logaddexp(L_r, L_p)``. The fused ops return the log-sum-exp but treat it as not differentiable, so the
backward is written out: the kernel's own backward, called with the FINAL output and log-sum-exp (the
ring-attention identity: the probabilities it recomputes are then the globally normalised ones and its
``D = rowsum(dO * O)`` the global one), gives exact gradients of the queries, keys and values; the prefix's
gradients follow from the same normalised probabilities. Autograd keeps only what the backend keeps (queries,
keys, values, the output and the log-sum-exp), plus the prefix.

By default ("auto") the merge runs on CUDA, where the copies of the concatenation cost more than the attention
itself; on a CPU the concatenation is faster (measured over two runs: 0.90-1.05x the base's time against the
merge's 1.03-1.18x at T = 512-4096) and runs by default, the merge being a choice (``path="split"``: the adapter's
``attention_path`` setting, as the tests use it). The kernels are private aten ops (CPU flash attention; on CUDA the
flash and memory-efficient kernels), which can change between torch versions, so each is checked once per
process, device, dtype and mask kind against the concatenation path on a small random case (forward and
backward) before it is used. When no kernel applies or passes -- dropout, value dims that differ from the
query's, a kernel that refuses the inputs -- the concatenation path runs: it prepends the prefix to the
(expanded) real keys and keeps SDPA's fused kernel, with ``n`` dummy queries for unpadded causal batches (so
SDPA's top-left ``is_causal`` does the masking, no ``T x T`` tensor) or ``n`` always-visible mask columns otherwise. Decoding (one query per row) uses grouped-query math that reads the
KV cache once.
"""

from __future__ import annotations

import functools
import logging
import weakref

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def repeat_kv(hidden: torch.Tensor, groups: int) -> torch.Tensor:
    """Keys or values ``[b, kv_heads, k, d]`` expanded to the query heads, ``[b, kv_heads * groups, k, d]`` (each
    KV head repeated for the `groups` query heads that share it, in order)."""
    if groups == 1:
        return hidden
    batch, heads, length, dim = hidden.shape
    return hidden[:, :, None].expand(batch, heads, groups, length, dim).reshape(batch, heads * groups, length, dim)


@functools.cache
def _transformers_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def plain_sdpa(module, query, key, value, attention_mask, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' own SDPA attention function (imported on first use, then kept: importing `hificl.core` loads
    no transformers, so the command line starts fast, and no attention call pays for an import statement)."""
    return _transformers_sdpa()(module, query, key, value, attention_mask, **kwargs)


def with_visible_columns(mask: torch.Tensor, n: int, kv_length: int) -> torch.Tensor:
    """Crop a 4-D mask to the real keys and prepend `n` always-visible columns (bool True / additive 0)."""
    mask = mask[..., :kv_length]
    fill = torch.ones if mask.dtype == torch.bool else torch.zeros
    return torch.cat([fill(*mask.shape[:-1], n, dtype=mask.dtype, device=mask.device), mask], dim=-1)


def is_causal_call(module: torch.nn.Module, is_causal: bool | None) -> bool:
    """Whether an attention call is causal: the call's own flag, else the module's (decoders: True)."""
    return is_causal if is_causal is not None else getattr(module, "is_causal", True)


# ------------------------------------------------------------------------------------------------ kernels
class Kernel:
    """A fused attention kernel that returns its log-sum-exp, and its backward: ``forward(q, k, v, bias,
    is_causal, scale) -> (out, lse, saved)``, ``backward(dout, q, k, v, out, lse, saved, bias, is_causal, scale)
    -> (dq, dk, dv)``; ``q [b, h, q, d]``, ``k, v [b, kv_heads, k, d]``, ``bias`` additive or None, ``lse
    [b, h, q]`` float32."""

    name = "kernel"
    gqa = True  # reads grouped key/value heads natively

    def forward(self, q, k, v, bias, is_causal, scale):
        raise NotImplementedError

    def backward(self, dout, q, k, v, out, lse, saved, bias, is_causal, scale):
        raise NotImplementedError


class CpuFlash(Kernel):
    name = "cpu-flash"

    def forward(self, q, k, v, bias, is_causal, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=bias, scale=scale)
        return out, lse, ()

    def backward(self, dout, q, k, v, out, lse, saved, bias, is_causal, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, is_causal, attn_mask=bias, scale=scale)


class CudaFlash(Kernel):
    """CUDA flash attention: no mask (unpadded causal batches)."""

    name = "cuda-flash"

    def forward(self, q, k, v, bias, is_causal, scale):
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, is_causal, False, scale=scale)
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)

    def backward(self, dout, q, k, v, out, lse, saved, bias, is_causal, scale):
        cum_q, cum_k, max_q, max_k, seed, offset = saved
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, is_causal, seed, offset, scale=scale)


class CudaEfficient(Kernel):
    """CUDA memory-efficient attention: an additive bias; keys and values expanded to the query heads (it reads
    no grouped heads); its log-sum-exp is padded to a multiple of 32 queries."""

    name = "cuda-efficient"
    gqa = False

    def forward(self, q, k, v, bias, is_causal, scale):
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, is_causal, scale=scale)
        return out, lse[..., : q.shape[2]], (seed, offset, lse.shape[-1])

    def backward(self, dout, q, k, v, out, lse, saved, bias, is_causal, scale):
        seed, offset, padded = saved
        lse = F.pad(lse, (0, padded - lse.shape[-1]))
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, bias, out, lse, seed, offset, 0.0, [True, True, True, False], is_causal, scale=scale)
        return dq, dk, dv


# ------------------------------------------------------------------------------------------------ the merge
class _SplitPrefixAttention(torch.autograd.Function):
    """The split-KV merge with its exact backward (see the module docstring). Prefix keys/values are ``[h, n, d]``
    (shared by the batch) or ``[b, h, n, d]``."""

    @staticmethod
    def forward(ctx, query, key, value, prefix_keys, prefix_values, bias, is_causal, scale, kernel):
        out_r, lse_r, saved = kernel.forward(query, key, value, bias, is_causal, scale)
        acc = lse_r.dtype  # the kernel's accumulation dtype (float32; float64 for float64 inputs)
        scores = torch.matmul(query, prefix_keys.transpose(-1, -2)).to(acc) * scale  # [b, h, q, n]
        lse = torch.logaddexp(lse_r, torch.logsumexp(scores, dim=-1))
        probs = torch.exp(scores - lse.unsqueeze(-1))  # the prefix's share of the whole softmax
        out = (out_r.to(acc) * torch.exp(lse_r - lse).unsqueeze(-1)
               + torch.matmul(probs, prefix_values.to(acc))).to(query.dtype)
        ctx.save_for_backward(query, key, value, prefix_keys, prefix_values, bias, out, lse)
        ctx.rest = (saved, is_causal, scale, kernel)
        return out

    @staticmethod
    def backward(ctx, dout):
        query, key, value, prefix_keys, prefix_values, bias, out, lse = ctx.saved_tensors
        saved, is_causal, scale, kernel = ctx.rest
        dout, acc = dout.contiguous(), lse.dtype
        dq, dk, dv = kernel.backward(dout, query, key, value, out, lse, saved, bias, is_causal, scale)
        scores = torch.matmul(query, prefix_keys.transpose(-1, -2)).to(acc) * scale
        probs = torch.exp(scores - lse.unsqueeze(-1))
        dout_acc = dout.to(acc)
        total = (dout_acc * out.to(acc)).sum(-1, keepdim=True)  # D = rowsum(dO * O)
        dscores = probs * (torch.matmul(dout_acc, prefix_values.to(acc).transpose(-1, -2)) - total)
        dq = dq + (torch.matmul(dscores, prefix_keys.to(acc)) * scale).to(dq.dtype)
        d_keys = torch.matmul(dscores.transpose(-1, -2), query.to(acc)) * scale
        d_values = torch.matmul(probs.transpose(-1, -2), dout_acc)
        if prefix_keys.dim() == 3:  # shared by the batch
            d_keys, d_values = d_keys.sum(0), d_values.sum(0)
        return (dq, dk, dv, d_keys.to(prefix_keys.dtype), d_values.to(prefix_values.dtype), None, None, None, None)


class SplitKernels:
    """Chooses the kernel of the split merge for a call, and owns what that choice caches: which kernels passed
    their self-check (per process, device, dtype, head dim, mask kind and grouping) and the additive bias of the
    last mask seen (every layer of a forward gets the same mask object, so one entry serves them all, and autograd
    keeps that one copy)."""

    def __init__(self) -> None:
        self.checked: dict[tuple, bool] = {}
        self._bias: tuple | None = None  # (weak reference to the mask, (version, dtype, kv_length), bias)

    def choose(self, query, key, value, mask, prefix_values, dropout, path: str) -> tuple[Kernel, torch.Tensor | None] | None:
        """A kernel for the split merge of this call, with the bias it takes; None: the concatenation path.
        `path` is "split", "concat" or "auto" (split on CUDA only: see the module docstring)."""
        if path == "concat" or (path == "auto" and query.device.type != "cuda"):
            return None
        if dropout or query.shape[-1] != value.shape[-1] or prefix_values.shape[-1] != value.shape[-1]:
            return None
        if query.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            return None
        bias = self.bias(mask, key.shape[2], query.dtype)
        grouped = key.shape[1] != query.shape[1]
        for kernel in _candidates(query, bias):
            if self.passes_check(kernel, query, bias is not None, grouped):
                return kernel, bias
        return None

    def bias(self, mask: torch.Tensor | None, kv_length: int, dtype: torch.dtype) -> torch.Tensor | None:
        """`additive_bias` of the mask, made once per mask (see the class docstring)."""
        if mask is None:
            return None
        key = (mask._version, dtype, kv_length)
        if self._bias is None or self._bias[0]() is not mask or self._bias[1] != key:
            self._bias = (weakref.ref(mask), key, additive_bias(mask, kv_length, dtype))
        return self._bias[2]

    def passes_check(self, kernel: Kernel, query: torch.Tensor, masked: bool, grouped: bool) -> bool:
        """Whether `kernel` gives the concatenation path's output and gradients on a small random case like the
        call's (device, dtype, head dim, mask or not, grouped heads or not), run through the same wrapper as the
        call; checked once per process and kind of call."""
        key = (kernel.name, query.device.type, query.dtype, query.shape[-1], masked, grouped)
        if key not in self.checked:
            try:
                self.checked[key] = _self_check(kernel, query.device, query.dtype, query.shape[-1], masked, grouped)
            except Exception as error:  # a kernel that refuses the inputs, or an op that changed
                logger.warning("the %s kernel failed its check on %s %s (%s); using the concatenation path",
                               kernel.name, query.device.type, query.dtype, error)
                self.checked[key] = False
            if not self.checked[key]:
                logger.warning("the %s kernel does not match the concatenation path on %s %s; using that path",
                               kernel.name, query.device.type, query.dtype)
        return self.checked[key]


SPLIT_KERNELS = SplitKernels()


def additive_bias(mask: torch.Tensor, kv_length: int, dtype: torch.dtype) -> torch.Tensor:
    """The model's mask as the additive bias the kernels take: 0 where visible, a large finite negative value where
    not (a -inf row would give a fully masked query a log-sum-exp of 0 instead of -inf). Its rows are stored
    16-aligned (as the memory-efficient kernel needs)."""
    visible = mask[..., :kv_length]
    floor = -0.5 * torch.finfo(dtype).max
    padded = -(-kv_length // 16) * 16
    bias = torch.zeros(visible.shape[:-1] + (padded,), dtype=dtype, device=mask.device)[..., :kv_length]
    if visible.dtype == torch.bool:
        bias.masked_fill_(~visible, floor)
    else:
        bias.copy_(visible.to(dtype).clamp_min(floor))
    return bias


def _candidates(query: torch.Tensor, bias: torch.Tensor | None) -> list[Kernel]:
    if query.device.type == "cpu":
        return [CpuFlash()]
    if query.device.type == "cuda":
        return ([CudaFlash()] if bias is None else []) + [CudaEfficient()]
    return []


def _self_check(kernel: Kernel, device: torch.device, dtype: torch.dtype, d: int, masked: bool, grouped: bool) -> bool:
    generator = torch.Generator(device="cpu").manual_seed(0)
    b, h, kv_heads, t, n = 2, 4, 2 if grouped else 4, 37, 3

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    with torch.inference_mode(False), torch.enable_grad():
        leaves = [rand(b, h, t, d), rand(b, kv_heads, t, d), rand(b, kv_heads, t, d), rand(h, n, d) * 0.5,
                  rand(h, n, d)]
        mask = None
        if masked:
            mask = torch.ones(b, 1, t, t, dtype=torch.bool, device=device).tril()
            mask[1, :, :, :5] = False  # left padding: the first rows of the second sequence see no real key
        grad = rand(b, h, t, d)
        results = []
        for fast in (True, False):
            inputs = [x.detach().clone().requires_grad_(True) for x in leaves]
            q, k, v, pk, pv = inputs
            if fast:
                bias = additive_bias(mask, t, dtype) if mask is not None else None
                out = _split(kernel, q, k, v, bias, pk, pv, mask is None, d ** -0.5)
            else:
                out = _concatenated(None, q, k, v, mask, pk.expand(b, -1, -1, -1), pv.expand(b, -1, -1, -1), 0.0,
                                    d ** -0.5, True).transpose(1, 2)
            out.backward(grad)
            results.append([out.detach().float()] + [x.grad.float() for x in inputs])
    tolerance = {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 5e-2)
    return all(((a - e).abs().max() / e.abs().max().clamp_min(1e-6)) < tolerance for a, e in zip(*results))


# ------------------------------------------------------------------------------------------------ entry point
def attend_with_prefix(module, query, key, value, mask, prefix_keys, prefix_values, dropout=0.0, scaling=None,
                       is_causal=None, path: str = "auto") -> torch.Tensor:
    """Softmax attention of `query` ``[b, h, q, d]`` over always-visible prefix slots (``[h, n, d]`` or
    ``[b, h, n, d]``) followed by the real keys/values (``[b, kv_heads, k, d]``, any GQA grouping) under the
    model's causal and padding mask. Value dims may differ from key dims. `path` chooses how ("auto", "split" or
    "concat": `hificl.core.config.ATTENTION_PATHS`). Returns ``[b, q, h, d_v]``."""
    q_len = query.shape[2]
    if prefix_keys.dim() == 3:
        prefix_keys, prefix_values = prefix_keys.to(query.dtype), prefix_values.to(query.dtype)
    if q_len == 1 and dropout == 0.0:
        return _decode_with_prefix(query, key, value, mask, _batched(prefix_keys, query), _batched(prefix_values, query),
                                   scaling)
    causal = mask is None and is_causal_call(module, is_causal) and q_len > 1
    if causal:  # keys past q_len are empty static-cache slots (top-left alignment, as transformers' SDPA path)
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    split = SPLIT_KERNELS.choose(query, key, value, mask, prefix_values, dropout, path)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if split is not None:
        kernel, bias = split
        try:
            return _split(kernel, query, key, value, bias, prefix_keys, prefix_values, causal, scale).transpose(1, 2).contiguous()
        except RuntimeError as error:  # a kernel refusing these particular inputs (a shape its check did not have)
            logger.debug("the %s kernel refused a call (%s); using the concatenation path", kernel.name, error)
    return _concatenated(module, query, key, value, mask, _batched(prefix_keys, query), _batched(prefix_values, query),
                         dropout, scale, causal).contiguous()


def _split(kernel: Kernel, query, key, value, bias, prefix_keys, prefix_values, causal: bool, scale: float):
    """The split merge through `kernel` (keys and values expanded to the query heads for kernels that read no
    grouped heads); returns ``[b, h, q, d]``."""
    if not kernel.gqa and key.shape[1] != query.shape[1]:
        groups = query.shape[1] // key.shape[1]
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    return _SplitPrefixAttention.apply(query, key, value, prefix_keys, prefix_values, bias, causal, scale, kernel)


def _batched(prefix: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    return prefix.unsqueeze(0).expand(query.shape[0], -1, -1, -1) if prefix.dim() == 3 else prefix


def _concatenated(module, query, key, value, mask, prefix_keys, prefix_values, dropout, scale, causal) -> torch.Tensor:
    """The concatenation path: the prefix prepended to the real keys expanded to the query heads, one SDPA call.
    Returns ``[b, q, h, d_v]``."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    n = prefix_keys.shape[2]
    keys, values = torch.cat([prefix_keys, key], 2), torch.cat([prefix_values, value], 2)
    if mask is not None:
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=with_visible_columns(mask, n, key.shape[2]),
                                             dropout_p=dropout, scale=scale)
    elif causal:  # dummy queries shift the causal diagonal so that real query i sees the prefix and keys 0..i
        dummy = query.new_zeros(query.shape[0], query.shape[1], n, query.shape[-1])
        out = F.scaled_dot_product_attention(torch.cat([dummy, query], 2), keys, values, dropout_p=dropout, scale=scale,
                                             is_causal=True)[:, :, n:]
    else:
        out = F.scaled_dot_product_attention(query, keys, values, dropout_p=dropout, scale=scale)
    return out.transpose(1, 2)


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


