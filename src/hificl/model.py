"""`HiFICLModel`: a frozen Hugging Face model with one or more named HiFICL adapters.

Attaching never copies a model's forward and never looks at its name (see `hificl.routing`): the language
model's attention is routed to `hificl.core.attention`, and each attention module found by the probe gets a
provider that hands out the active adapter's virtual pairs. The adapter parameters live in
``self.adapters[name]`` (a `VirtualKVBank` per adapter). The rest of the API (disable, save/load, mixed-adapter
batches, unload) is every adapter's (`hificl.adapters.AdapterModel`).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from transformers import PreTrainedModel

from .adapters import CONFIG_NAME, DEFAULT_ADAPTER, AdapterModel, ModelShape, register_adapter
from .core import (ATTENTION_NAME, PROVIDER_ATTR, REFERENCE_ATTENTION_NAME, HiFICLConfig, VirtualKVBank,
                   VirtualPairs)
from .routing import route_attention


@register_adapter
class HiFICLModel(AdapterModel):
    """A frozen base model with named HiFICL adapters. ``forward`` and ``generate`` pass through to the base
    model; both accept ``adapter_names=[...]`` (one adapter name or ``None`` per batch row) to serve several
    adapters, and the base model, in one batch."""

    method = "hificl"
    title = "HiFICL"

    def __init__(self, base_model: PreTrainedModel, config: HiFICLConfig | None,
                 adapter_name: str = DEFAULT_ADAPTER):
        """Attach to `base_model` (frozen in place) and, unless `config` is None, add a new adapter."""
        if config is not None and not isinstance(config, HiFICLConfig):
            raise TypeError(f"config must be a HiFICLConfig, got {type(config).__name__}.")
        super().__init__(base_model)
        self.adapters = nn.ModuleDict()
        self._active: str | None = None
        try:
            self._routing = route_attention(base_model, ATTENTION_NAME, purpose="add virtual key-value pairs to it")
        except BaseException:
            self._frozen.restore()
            raise
        for index, call in enumerate(self._routing.calls):
            setattr(call.module, PROVIDER_ATTR, functools.partial(self._provide, index))
        self._layer_devices = {index: call.device for index, call in enumerate(self._routing.calls)}
        self.shape = ModelShape.of(self._routing)
        if config is not None:
            self.add_adapter(adapter_name, config)

    def _provide(self, layer: int, batch_size: int, dtype: torch.dtype):
        """The routing for one attention call (see `hificl.core.attention`)."""
        rows = self._rows_for(batch_size)
        if rows is None or isinstance(rows, str):
            return self._pairs(rows, layer, dtype)
        device = self._layer_devices[layer]
        groups: dict[str | None, list[int]] = {}
        for row, name in enumerate(rows):
            groups.setdefault(name, []).append(row)
        return [(torch.tensor(indices, device=device), self._pairs(name, layer, dtype))
                for name, indices in groups.items()]

    def _pairs(self, name: str | None, layer: int, dtype: torch.dtype) -> VirtualPairs | None:
        if name is None:
            return None
        bank = self.adapters[name]
        layer_kv = bank.get(layer)
        if layer_kv is None:
            return None
        keys, values = layer_kv(dtype)
        return VirtualPairs(keys, values, bank.config.formula)

    @property
    def routing(self):
        """The `hificl.routing.RoutedAttention` of the base model (its attention modules, decoder layers, MLPs)."""
        return self._routing

    # ---------------------------------------------------------------------------------------------- adapters
    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapters)

    @property
    def active_adapter(self) -> str | None:
        return self._active

    @property
    def peft_config(self) -> dict[str, HiFICLConfig]:
        """The config of every adapter, by name (PEFT's attribute name)."""
        return {name: bank.config for name, bank in self.adapters.items()}

    def add_adapter(self, adapter_name: str, config: HiFICLConfig) -> None:
        """Add a freshly initialised adapter; the first one added becomes active."""
        if not isinstance(adapter_name, str) or not adapter_name or "/" in adapter_name or adapter_name.startswith("."):
            raise ValueError(f"Adapter names must be non-empty strings without '/', got {adapter_name!r}.")
        if adapter_name in self.adapters:
            raise ValueError(f"An adapter named {adapter_name!r} already exists; delete it first or pick another name.")
        config.validate()
        self.adapters[adapter_name] = VirtualKVBank(
            config, self.shape.num_layers, self.shape.num_query_heads, self.shape.head_dim, self._layer_devices
        )
        if self._active is None:
            self.set_adapter(adapter_name)
        else:
            self.adapters[adapter_name].requires_grad_(False)

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the active adapter: the one used by default and the only trainable one."""
        self._check_names([adapter_name])
        self._active = adapter_name
        for name, bank in self.adapters.items():
            bank.requires_grad_(name == adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter. If it was active, another one (or none: the base model) becomes active."""
        self._check_names([adapter_name])
        del self.adapters[adapter_name]
        if self._active == adapter_name:
            self._active = None
            if len(self.adapters):
                self.set_adapter(next(iter(self.adapters)))

    @contextlib.contextmanager
    def reference_attention(self) -> Iterator[None]:
        """Run the slow float64 reference attention instead of the fused path (for tests and debugging)."""
        self._routing.set(REFERENCE_ATTENTION_NAME)
        try:
            yield
        finally:
            self._routing.set(ATTENTION_NAME)

    def _release(self) -> None:
        for call in self._routing.calls:
            if hasattr(call.module, PROVIDER_ATTR):
                delattr(call.module, PROVIDER_ATTR)
        self._routing.restore()

    # ------------------------------------------------------------------------------------------- inspect
    def virtual_kv(self, layer_idx: int, adapter_name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Materialised virtual keys and values of a layer, each ``[num_query_heads, num_virtual_tokens, head_dim]``."""
        name = adapter_name or self._active
        self._check_names([name])
        if name is None:
            raise ValueError("This model has no adapter.")
        layer_kv = self.adapters[name].get(layer_idx)
        if layer_kv is None:
            raise ValueError(f"Adapter {name!r} has no virtual pairs in layer {layer_idx} (targets "
                             f"{sorted(int(i) for i in self.adapters[name].layers)}).")
        return layer_kv()

    # -------------------------------------------------------------------------------------- save / load
    def adapter_config(self, name: str) -> dict[str, Any]:
        return {**self.adapters[name].config.to_dict(), "base_model": asdict(self.shape)}

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        self._check_names([name])
        return dict(self.adapters[name].named_parameters())

    def _add_saved(self, name: str, config: dict[str, Any], folder: Path) -> None:
        self.shape.check(config.get("base_model"), folder / CONFIG_NAME)
        fields = {k: v for k, v in config.items() if k not in ("base_model", "format_version")}
        self.add_adapter(name, HiFICLConfig.from_dict(fields))

    def _set_trainable(self, name: str, trainable: bool) -> None:
        self.adapters[name].requires_grad_(trainable)

    @classmethod
    def _empty(cls, base_model: PreTrainedModel, config: dict[str, Any]) -> "HiFICLModel":
        return cls(base_model, None)


def get_hificl_model(base_model: PreTrainedModel, config: HiFICLConfig | None = None,
                     adapter_name: str = DEFAULT_ADAPTER) -> HiFICLModel:
    """Freeze `base_model` and attach a new HiFICL adapter to its language model's attention."""
    return HiFICLModel(base_model, config or HiFICLConfig(), adapter_name)
