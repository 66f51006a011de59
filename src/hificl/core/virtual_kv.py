"""The learnable low-rank virtual key-value pairs of one decoder layer."""

from __future__ import annotations

import torch
from torch import nn


class VirtualKV(nn.Module):
    """Virtual keys ``K_A @ K_B`` and values ``V_A @ V_B`` for every query head of one layer.

    Shapes: ``k_a, v_a: [heads, n, r]``, ``k_b, v_b: [heads, r, head_dim]``; with the full-rank ablations
    ``k_full`` / ``v_full: [heads, n, head_dim]`` replace a pair of factors. `forward` returns the materialised
    keys and values, both ``[heads, n, head_dim]``, cast to the requested dtype. When no gradient can flow (eval
    under ``torch.no_grad`` / inference mode, or frozen factors), the products are computed once and cached until
    a factor changes (tracked through the tensors' version counters), so generation does not recompute them at
    every step or layer call. A sharding engine that gathers the factors into the same storage for every forward
    without a new version (FSDP2) turns the cache off (`cache_products`).
    """

    cache_products = True  # the engine's switch: False recomputes the products at every call

    def __init__(self, num_heads: int, head_dim: int, config, generator: torch.Generator | None = None):
        """`config` holds the settings (`hificl.tuner.HiFICLConfig`: n, r, the initial standard deviations, the
        full-rank ablations and the dtype); `generator` draws the initialisation (None: torch's global one)."""
        super().__init__()
        n, r, dtype = config.num_virtual_tokens, config.rank, config.torch_dtype
        self.num_heads, self.head_dim = num_heads, head_dim

        def normal(shape: tuple[int, ...], std: float) -> nn.Parameter:
            data = torch.zeros(shape, dtype=torch.float32)
            if std > 0:
                data.normal_(0.0, std, generator=generator)
            return nn.Parameter(data.to(dtype))

        if config.full_rank_keys:
            self.k_full = normal((num_heads, n, head_dim), config.key_a_std * config.key_b_std * r ** 0.5)
        else:
            self.k_a = normal((num_heads, n, r), config.key_a_std)
            self.k_b = normal((num_heads, r, head_dim), config.key_b_std)
        if config.full_rank_values:
            self.v_full = normal((num_heads, n, head_dim), config.value_a_std * config.value_b_std * r ** 0.5)
        else:
            self.v_a = normal((num_heads, n, r), config.value_a_std)
            self.v_b = normal((num_heads, r, head_dim), config.value_b_std)
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _products(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.k_full if hasattr(self, "k_full") else torch.matmul(self.k_a, self.k_b)
        values = self.v_full if hasattr(self, "v_full") else torch.matmul(self.v_a, self.v_b)
        return keys, values

    def _cache_key(self, dtype: torch.dtype, params: tuple[torch.Tensor, ...]) -> tuple:
        return (dtype, params[0].device) + tuple((p.data_ptr(), p._version) for p in params)

    def forward(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        params = tuple(self._parameters.values())  # this module's own factors (it has no children): no recursion
        dtype = dtype or params[0].dtype
        needs_graph = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        if needs_graph or not self.cache_products:
            self._cache.clear()
            keys, values = self._products()
            return keys.to(dtype), values.to(dtype)
        key = self._cache_key(dtype, params)
        cached = self._cache.get(key)
        if cached is None:
            with torch.no_grad():
                keys, values = self._products()
                cached = (keys.to(dtype).clone(), values.to(dtype).clone())
            self._cache = {k: v for k, v in self._cache.items() if k[1:] == key[1:]}  # drop stale versions
            self._cache[key] = cached
        return cached

    def _apply(self, fn, recurse: bool = True):
        self._cache = {}
        return super()._apply(fn, recurse)
