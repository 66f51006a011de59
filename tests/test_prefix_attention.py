"""The split-KV merge (`hificl.core.prefix`): forward and gradients (queries, keys, values, prefix keys and
values) equal a float64 restatement of softmax attention over the concatenation, across GQA groupings, padding
on either side with fully masked rows, sliding windows, chunked prefill against a cache and decoding; it keeps no
copy of the keys or values for backward; and the concatenation path is chosen, and still exact, wherever no
kernel applies."""

import pytest
import torch

import hificl.core.prefix as prefix

B, H, N, D = 2, 4, 3, 16


def attend_with_prefix(*args, **kwargs):
    """The merge is the default ("auto") on CUDA only; these tests ask for it on the CPU."""
    return prefix.attend_with_prefix(*args, **{"path": "split", **kwargs})


def _reference(q, k, v, mask, pk, pv, scale):
    """float64 softmax over [prefix; keys] with the real keys masked; mask: bool [b, 1, q, k] or None (causal,
    aligned to the end of the keys)."""
    q, k, v, pk, pv = (x.double() for x in (q, k, v, pk, pv))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    if mask is None:
        rows = torch.arange(q.shape[2])[:, None] + (k.shape[2] - q.shape[2])
        mask = (torch.arange(k.shape[2])[None, :] <= rows)[None, None]
    pk = pk.expand(q.shape[0], -1, -1, -1) if pk.dim() == 3 else pk
    pv = pv.expand(q.shape[0], -1, -1, -1) if pv.dim() == 3 else pv
    scores = torch.cat([q @ pk.transpose(-1, -2), (q @ k.transpose(-1, -2)).masked_fill(~mask, float("-inf"))], -1)
    return (torch.softmax(scores * scale, -1) @ torch.cat([pv, v], 2)).transpose(1, 2)


def _case(kind, kv_heads=2, q_len=9, dtype=torch.float32, batched_prefix=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    k_len = q_len + (5 if kind == "chunked" else 0)
    q = torch.randn(B, H, q_len, D, generator=g)
    k, v = torch.randn(B, kv_heads, k_len, D, generator=g), torch.randn(B, kv_heads, k_len, D, generator=g)
    shape = (B, H, N, D) if batched_prefix else (H, N, D)
    pk, pv = torch.randn(*shape, generator=g) * 0.7, torch.randn(*shape, generator=g)
    mask = None
    if kind in ("left", "right", "window", "chunked"):
        rows = torch.arange(q_len)[:, None] + (k_len - q_len)
        mask = (torch.arange(k_len)[None, :] <= rows)[None, None].repeat(B, 1, 1, 1)
        if kind == "left":
            mask[1, :, :, :4] = False  # the second row's first 4 tokens are padding: its first queries see nothing
        if kind == "right":
            mask[1, :, :, -3:] = False
        if kind == "window":
            mask &= (torch.arange(k_len)[None, :] > rows - 4)[None, None]
    return [x.to(dtype) for x in (q, k, v)], mask, [x.to(dtype) for x in (pk, pv)]


KINDS = ["causal", "left", "right", "window", "chunked"]


def _grads(fn, inputs, grad):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    out.backward(grad)
    return out.detach(), [x.grad for x in leaves]


def _rel(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("batched_prefix", [False, True])
def test_forward_and_gradients_equal_the_float64_reference(kind, kv_heads, batched_prefix):
    (q, k, v), mask, (pk, pv) = _case(kind, kv_heads, batched_prefix=batched_prefix)
    assert prefix.SPLIT_KERNELS.choose(q, k, v, mask, pv, 0.0, "split") is not None, "the split merge runs"
    grad = torch.randn(B, q.shape[2], H, D, generator=torch.Generator().manual_seed(1))

    def fast(q, k, v, pk, pv):
        return attend_with_prefix(None, q, k, v, mask, pk, pv, scaling=D ** -0.5, is_causal=True)

    def reference(q, k, v, pk, pv):
        return _reference(q, k, v, mask, pk, pv, D ** -0.5)

    out, grads = _grads(fast, [q, k, v, pk, pv], grad)
    expected, expected_grads = _grads(reference, [x.double() for x in (q, k, v, pk, pv)], grad.double())
    assert _rel(out, expected) < 1e-5
    for name, got, want in zip(("query", "key", "value", "prefix keys", "prefix values"), grads, expected_grads):
        assert _rel(got, want) < 1e-5, name


@pytest.mark.parametrize("kind", ["causal", "left", "chunked"])
def test_a_float64_gradcheck_of_the_merge(kind):
    (q, k, v), mask, (pk, pv) = _case(kind, q_len=5, dtype=torch.float64)
    kernel, bias = prefix.SPLIT_KERNELS.choose(q, k, v, mask, pv, 0.0, "split")
    inputs = [x.detach().clone().requires_grad_(True) for x in (q, k, v, pk, pv)]
    assert torch.autograd.gradcheck(
        lambda *xs: prefix._SplitPrefixAttention.apply(*xs, bias, mask is None, D ** -0.5, kernel), inputs)


def test_decoding_reads_the_cache_once_and_is_exact():
    (q, k, v), _, (pk, pv) = _case("causal", q_len=12)
    q = q[:, :, -1:]  # one query per row, the cache holding 12 keys
    mask = torch.ones(B, 1, 1, 12, dtype=torch.bool)
    mask[1, :, :, :3] = False
    grad = torch.randn(B, 1, H, D)
    out, grads = _grads(lambda *xs: attend_with_prefix(None, *xs[:3], mask, *xs[3:], scaling=D ** -0.5), [q, k, v, pk, pv],
                        grad)
    expected, expected_grads = _grads(lambda *xs: _reference(*xs[:3], mask, *xs[3:], D ** -0.5),
                                      [x.double() for x in (q, k, v, pk, pv)], grad.double())
    assert _rel(out, expected) < 1e-5 and all(_rel(g, e) < 1e-5 for g, e in zip(grads, expected_grads))


@pytest.mark.parametrize("kind", ["causal", "left"])
def test_bfloat16_is_no_worse_than_the_concatenation(kind):
    (q, k, v), mask, (pk, pv) = _case(kind, q_len=33)
    expected = _reference(q, k, v, mask, pk, pv, D ** -0.5)
    bf16 = [x.bfloat16() for x in (q, k, v, pk, pv)]
    split = attend_with_prefix(None, *bf16[:3], mask, *bf16[3:], scaling=D ** -0.5)
    causal = mask is None
    concat = prefix._concatenated(None, bf16[0], bf16[1], bf16[2], mask, prefix._batched(bf16[3], bf16[0]),
                                  prefix._batched(bf16[4], bf16[0]), 0.0, D ** -0.5, causal)
    assert _rel(split, expected) <= 1.5 * _rel(concat, expected) + 1e-3


def _saved_bytes(fn, *inputs):
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*leaves)
    return sum(storages.values())


def test_no_copy_of_the_keys_or_values_is_kept_for_backward():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from types import SimpleNamespace

    (q, k, v), _, (pk, pv) = _case("causal", kv_heads=1, q_len=256)
    module = SimpleNamespace(is_causal=True, num_key_value_groups=H)
    base = _saved_bytes(lambda q, k, v: sdpa_attention_forward(module, q, k, v, None)[0], q, k, v)
    split = _saved_bytes(lambda q, k, v, pk, pv: attend_with_prefix(module, q, k, v, None, pk, pv), q, k, v, pk, pv)
    prefix_bytes = pk.nbytes + pv.nbytes
    assert split <= base + prefix_bytes + q.shape[2] * H * B * 4, (split, base)  # (+ a float32 log-sum-exp at most)


def test_the_concatenation_path_runs_where_no_kernel_applies(monkeypatch):
    (q, k, v), mask, (pk, pv) = _case("left")
    choose = prefix.SplitKernels().choose
    assert choose(q, k, v, mask, pv, 0.0, "auto") is None, "auto: the merge on CUDA only"
    assert choose(q, k, v, mask, pv, 0.0, "concat") is None, "asked for the concatenation"
    assert choose(q, k, v, mask, pv, 0.0, "split") is not None, "asked for the merge"
    assert choose(q, k, v, mask, pv, 0.1, "split") is None, "dropout"
    wide = torch.cat([pv, pv[..., :1]], -1)
    assert choose(q, k, torch.cat([v, v[..., :1]], -1), mask, wide, 0.0, "split") is None, "value dims differ"

    class Broken(prefix.CpuFlash):
        name = "broken"

        def forward(self, q, k, v, bias, is_causal, scale):
            out, lse, saved = super().forward(q, k, v, bias, is_causal, scale)
            return out * 1.01, lse, saved  # a changed op: wrong output

    class Refusing(prefix.CpuFlash):
        name = "refusing"

        def forward(self, q, k, v, bias, is_causal, scale):
            raise RuntimeError("this op does not take these inputs")

    for kernel in (Broken(), Refusing()):
        monkeypatch.setattr(prefix, "_candidates", lambda query, bias, kernel=kernel: [kernel])
        assert prefix.SplitKernels().choose(q, k, v, mask, pv, 0.0, "split") is None, kernel.name
        out = attend_with_prefix(None, q, k, v, mask, pk, pv, scaling=D ** -0.5)
        assert _rel(out, _reference(q, k, v, mask, pk, pv, D ** -0.5)) < 1e-5
