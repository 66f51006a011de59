"""Attention forward+backward cost of HiFICL against the plain backend, at growing sequence lengths.

Measured on one attention call of a decoder-like head layout (default: SmolLM2's 9 query heads, 3 KV heads,
head dim 64), causal, unpadded, 8 virtual pairs of rank 8 with gradients:

* base        -- transformers' SDPA integration alone (what the frozen model runs: grouped heads read natively
                 when there is no mask);
* exact       -- hificl's registered attention, normalizer "exact", as it runs on this device (CUDA: the split-KV
                 merge; CPU: the concatenation, which is faster there);
* split       -- the split-KV merge (the backend's kernel over the real keys, no K/V copies, merged exactly);
* concat      -- the concatenation path ([K_v; K] with the keys expanded to the query heads and dummy queries);
* authors     -- the authors' materialised formulation (normalizer "unmasked": an extra full T x T score matrix
                 for the normaliser, kept for backward);
* concat+mask -- [K_v; K] concatenated with an explicit boolean mask (the obvious alternative).

Times are medians of repeated, interleaved runs, reported as ratios to `base` measured in the same run. Memory is the
size of the tensors autograd keeps for backward (deduplicated by storage), which is where a T^2 term shows;
on CUDA the peak allocated memory is reported too.

    python benchmarks/attention.py                    # CPU, float32, T = 512..4096
    python benchmarks/attention.py --device cuda --dtype bfloat16 --lengths 2048 4096 8192 16384
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from hificl import HiFICLConfig
from hificl.core import PROVIDER_ATTR, Formula, VirtualKV, VirtualPairs, hificl_attention_forward
from hificl.core.prefix import _concatenated


def _concat_with_mask(module, query, key, value, virtual: VirtualPairs):
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    batch, t, n = query.shape[0], query.shape[2], virtual.keys.shape[1]
    keys = torch.cat([virtual.keys.to(query.dtype).expand(batch, -1, -1, -1), key], 2)
    values = torch.cat([virtual.values.to(query.dtype).expand(batch, -1, -1, -1), value], 2)
    causal = torch.ones(t, t, dtype=torch.bool, device=query.device).tril()
    mask = torch.cat([torch.ones(t, n, dtype=torch.bool, device=query.device), causal], 1)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask).transpose(1, 2)


class _SavedBytes:
    """Bytes of the distinct storages autograd saves for backward."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def megabytes(self) -> float:
        return sum(self.storages.values()) / 2**20


def _run_once(fn, inputs, device: str, saved: _SavedBytes | None = None) -> float:
    leaves = [x.detach().requires_grad_(True) for x in inputs]
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    if saved is not None:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            out = fn(*leaves)
    else:
        out = fn(*leaves)
    out.float().square().mean().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(variants: dict, inputs, repeats: int, device: str) -> dict[str, tuple[float, float, float]]:
    """Per variant: median seconds of forward+backward, saved-for-backward MiB, CUDA peak MiB (0 on CPU).
    Variants run interleaved, round by round, so that a change in machine load hits them all alike."""
    memory = {}
    for name, fn in variants.items():  # warm-up, and the memory measurements
        saved = _SavedBytes()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        _run_once(fn, inputs, device, saved)
        memory[name] = (saved.megabytes, torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0)
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(_run_once(fn, inputs, device))
    return {name: (statistics.median(times[name]),) + memory[name] for name in variants}


def run(args) -> list[dict]:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    config = HiFICLConfig(value_b_std=0.02, init_seed=0)
    virtual = VirtualKV(args.heads, args.head_dim, config).to(args.device)
    module = SimpleNamespace(is_causal=True, num_key_value_groups=args.heads // args.kv_heads, layer_idx=0)
    rows = []
    for t in args.lengths:
        shape_q, shape_kv = (1, args.heads, t, args.head_dim), (1, args.kv_heads, t, args.head_dim)
        inputs = [torch.randn(s, device=args.device, dtype=dtype) for s in (shape_q, shape_kv, shape_kv)]

        def with_formula(formula, path="auto"):
            def fn(q, k, v):
                setattr(module, PROVIDER_ATTR, lambda b, dt, device: VirtualPairs(*virtual(dt), formula, path))
                return hificl_attention_forward(module, q, k, v, None)[0]
            return fn

        variants = {
            "base": lambda q, k, v: sdpa_attention_forward(module, q, k, v, None)[0],
            "exact": with_formula(Formula.EXACT),
            "split": with_formula(Formula.EXACT, "split"),
            "concat": lambda q, k, v: _concatenated(module, q, k, v, None, *(x.to(q.dtype).expand(q.shape[0], -1, -1, -1)
                                                                            for x in virtual(q.dtype)),
                                                    0.0, q.shape[-1] ** -0.5, True),
            "authors": with_formula(Formula.UNMASKED),
            "concat+mask": lambda q, k, v: _concat_with_mask(module, q, k, v, VirtualPairs(*virtual(q.dtype))),
        }
        results = measure(variants, inputs, args.repeats, args.device)
        base_time, base_saved, base_peak = results["base"]
        for name, (seconds, saved, peak) in results.items():
            rows.append({
                "T": t, "variant": name, "ms": 1000 * seconds, "ratio": seconds / base_time,
                "saved_mib": saved, "extra_saved_mib": saved - base_saved,
                "peak_mib": peak, "extra_peak_mib": peak - base_peak,
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    rows = run(args)
    print(f"attention forward+backward, {args.heads} heads ({args.kv_heads} KV) x {args.head_dim}, "
          f"{args.device} {args.dtype}, median of {args.repeats}")
    print(f"{'T':>6} {'variant':<12} {'ms':>9} {'x base':>7} {'saved MiB':>10} {'extra MiB':>10}"
          + (f" {'peak MiB':>9} {'extra':>8}" if args.device == "cuda" else ""))
    for row in rows:
        line = (f"{row['T']:>6} {row['variant']:<12} {row['ms']:>9.1f} {row['ratio']:>7.2f} "
                f"{row['saved_mib']:>10.1f} {row['extra_saved_mib']:>10.1f}")
        if args.device == "cuda":
            line += f" {row['peak_mib']:>9.1f} {row['extra_peak_mib']:>8.1f}"
        print(line)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
