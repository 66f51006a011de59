"""`HiFICLLayer`: the virtual key-value pairs of one attention module, for every adapter, as a PEFT tuner layer.

It is a child of the attention module it serves (attribute `hificl.core.PROVIDER_ATTR`), so its parameters live
with their layer (what sharding engines wrap) and state-dict keys read
``...layers.3.self_attn.hificl.virtual_kv.<adapter>.k_a``. It does not wrap the module: the attention function
(`hificl.core.attention`) calls it as the module's provider, ``layer(batch_size, dtype)``, and gets the routing of
the call -- no pairs, one adapter's pairs for every row, or a mixed batch's groups of rows.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..core import VirtualKV, VirtualPairs

BASE_ROW = "__base__"  # PEFT's name for a row that runs on the base model in a mixed batch (None works too)


class RowSelection:
    """Which adapter each row of the current batch gets, shared by every layer of one model (and by the hooks of
    LIVE and MimIC): None outside a
    mixed-adapter call, else one adapter name (or None / "__base__" for the base model) per row."""

    def __init__(self) -> None:
        self.names: list[str | None] | None = None

    def rows_for(self, batch_size: int, active: str | None) -> list[str | None] | str | None:
        """None (no adapter), one name for every row, or one name (or None) per row."""
        if self.names is None:
            return active
        names = self.names
        if batch_size != len(names):
            if batch_size % len(names):
                raise ValueError(f"adapter_names has {len(names)} entries but the batch has {batch_size} rows.")
            names = [name for name in names for _ in range(batch_size // len(names))]  # beams/samples per row
        return names[0] if len(set(names)) == 1 else names


class HiFICLLayer(nn.Module, BaseTunerLayer):
    """The virtual pairs of one attention module (see the module docstring)."""

    adapter_layer_names = ("virtual_kv",)
    other_param_names = ("settings",)

    def __init__(self, layer_index: int, selection: RowSelection):
        super().__init__()
        self.virtual_kv = nn.ModuleDict()
        self.settings: dict[str, Any] = {}  # adapter name -> its HiFICLConfig (formula, attention path)
        self.layer_index = layer_index
        self._selection = selection
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        self.merged_adapters = []

    def update_layer(self, adapter_name: str, config, num_heads: int, head_dim: int, device: torch.device,
                     generator: torch.Generator | None) -> None:
        """Add adapter `adapter_name`'s freshly initialised pairs (drawn from `generator`) on `device`."""
        self.virtual_kv[adapter_name] = VirtualKV(num_heads, head_dim, config, generator).to(device)
        self.settings[adapter_name] = config

    def enable_adapters(self, enabled: bool) -> None:
        """Turn the pairs on or off. Unlike PEFT's default, which adapters are trainable is left as it is (an adapter
        loaded for inference stays frozen across `disable_adapter()`)."""
        self._disable_adapters = not enabled

    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        raise ValueError(MERGE_REFUSED)

    def unmerge(self) -> None:
        raise ValueError(MERGE_REFUSED)

    def pairs(self, name: str | None, dtype: torch.dtype) -> VirtualPairs | None:
        """Adapter `name`'s materialised pairs in this layer (None: the base model, or an adapter that does not
        target this layer)."""
        if name is None or name == BASE_ROW or name not in self.virtual_kv:
            return None
        keys, values = self.virtual_kv[name](dtype)
        config = self.settings[name]
        return VirtualPairs(keys, values, config.formula, config.attention_path)

    def forward(self, batch_size: int, dtype: torch.dtype, device: torch.device):
        """The routing of one attention call of `batch_size` rows on `device` (see `hificl.core.attention`)."""
        if self._disable_adapters:
            return None
        active = self._active_adapter[0] if self._active_adapter else None
        rows = self._selection.rows_for(batch_size, active)
        if rows is None or isinstance(rows, str):
            return self.pairs(rows, dtype)
        groups: dict[str | None, list[int]] = {}
        for row, name in enumerate(rows):
            groups.setdefault(None if name == BASE_ROW else name, []).append(row)
        return [(torch.tensor(indices, device=device), self.pairs(name, dtype)) for name, indices in groups.items()]


MERGE_REFUSED = ("HiFICL adapters cannot be merged into the base weights: the virtual key-value pairs are extra "
                 "inputs of every attention call (softmax over [K_v; K]), not a change of any weight. Keep the PEFT "
                 "model (its cost is zero-shot's), or use unload() to get the base model back.")
