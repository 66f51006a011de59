"""`HiFICLModel`: a frozen Hugging Face model with one or more named HiFICL adapters.

Attaching never copies a model's forward and never looks at its name (see `hificl.routing`): the language
model's attention is routed to `hificl.core.attention`, and each attention module found by the probe gets a
provider that hands out the active adapter's virtual pairs. The adapter parameters live in ``self.adapters[name]`` (a `VirtualKVBank` per adapter).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from .core import (
    ATTENTION_NAME,
    PROVIDER_ATTR,
    REFERENCE_ATTENTION_NAME,
    AdapterMismatchError,
    HiFICLConfig,
    UnsupportedModelError,
    VirtualKVBank,
    VirtualPairs,
    register_attention,
)
from .io import atomic_write, atomic_write_json
from .routing import freeze, route_attention

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
DEFAULT_ADAPTER = "default"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelShape:
    """The shape of the adapted language model, saved with every adapter and checked on load."""

    num_layers: int
    num_query_heads: int
    num_kv_heads: int
    head_dim: int
    text_model_type: str
    model_type: str

    def describe(self) -> str:
        return (f"{self.num_layers} layers x {self.num_query_heads} query heads ({self.num_kv_heads} KV heads) x "
                f"head dim {self.head_dim}, text model type '{self.text_model_type}'")


class HiFICLModel(nn.Module):
    """A frozen base model with named HiFICL adapters. ``forward`` and ``generate`` pass through to the base
    model; both accept ``adapter_names=[...]`` (one adapter name or ``None`` per batch row) to serve several
    adapters, and the base model, in one batch."""

    def __init__(self, base_model: PreTrainedModel, config: HiFICLConfig | None,
                 adapter_name: str = DEFAULT_ADAPTER):
        """Attach to `base_model` (frozen in place) and, unless `config` is None, add a new adapter."""
        super().__init__()
        if not isinstance(base_model, PreTrainedModel):
            raise UnsupportedModelError(
                f"HiFICL needs a transformers PreTrainedModel, got {type(base_model).__name__}."
            )
        if config is not None and not isinstance(config, HiFICLConfig):
            raise TypeError(f"config must be a HiFICLConfig, got {type(config).__name__}.")
        register_attention()
        self.base_model = base_model
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self._disabled = False
        self._row_adapters: list[str | None] | None = None
        self._attach()
        if config is not None:
            self.add_adapter(adapter_name, config)

    # ----------------------------------------------------------------------------------------------- attaching
    def _attach(self) -> None:
        self._routing = route_attention(self.base_model, ATTENTION_NAME, purpose="add virtual key-value pairs to it")
        calls = self._routing.calls
        for index, call in enumerate(calls):
            setattr(call.module, PROVIDER_ATTR, functools.partial(self._provide, index))
        first = calls[0]
        self._layer_devices = {index: call.device for index, call in enumerate(calls)}
        self.shape = ModelShape(
            num_layers=len(calls), num_query_heads=first.num_query_heads, num_kv_heads=first.num_kv_heads,
            head_dim=first.head_dim, text_model_type=getattr(self._routing.text_config, "model_type", ""),
            model_type=getattr(self.base_model.config, "model_type", ""),
        )
        self._frozen = freeze(self.base_model)

    def _provide(self, layer: int, batch_size: int, dtype: torch.dtype):
        """The routing for one attention call (see `hificl.core.attention`)."""
        if self._disabled:
            return None
        if self._row_adapters is None:
            return self._pairs(self.active_adapter, layer, dtype)
        names = self._row_adapters
        if batch_size != len(names):
            if batch_size % len(names):
                raise ValueError(f"adapter_names has {len(names)} entries but the batch has {batch_size} rows.")
            names = [name for name in names for _ in range(batch_size // len(names))]  # beams/samples per row
        if len(set(names)) == 1:
            return self._pairs(names[0], layer, dtype)
        device = self._layer_devices[layer]
        groups: dict[str | None, list[int]] = {}
        for row, name in enumerate(names):
            groups.setdefault(name, []).append(row)
        return [(torch.tensor(rows, device=device), self._pairs(name, layer, dtype)) for name, rows in groups.items()]

    def _pairs(self, name: str | None, layer: int, dtype: torch.dtype) -> VirtualPairs | None:
        if name is None:
            return None
        bank = self.adapters[name]
        layer_kv = bank.get(layer)
        if layer_kv is None:
            return None
        keys, values = layer_kv(dtype)
        return VirtualPairs(keys, values, bank.config.attention_path)

    @property
    def routing(self):
        """The `hificl.routing.RoutedAttention` of the base model (its attention modules, decoder layers, MLPs)."""
        return self._routing

    # ---------------------------------------------------------------------------------------------- adapters
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
        if self.active_adapter is None:
            self.set_adapter(adapter_name)
        else:
            self.adapters[adapter_name].requires_grad_(False)

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the active adapter: the one used by default and the only trainable one."""
        self._check_names([adapter_name])
        self.active_adapter = adapter_name
        for name, bank in self.adapters.items():
            bank.requires_grad_(name == adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter. If it was active, another one (or none: the base model) becomes active."""
        self._check_names([adapter_name])
        del self.adapters[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None
            if len(self.adapters):
                self.set_adapter(next(iter(self.adapters)))

    def _check_names(self, names: Sequence[str | None]) -> None:
        unknown = sorted({str(n) for n in names if n is not None and n not in self.adapters})
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; this model has {list(self.adapters)}.")

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside this block the model is exactly the base model."""
        previous, self._disabled = self._disabled, True
        try:
            yield
        finally:
            self._disabled = previous

    @contextlib.contextmanager
    def _rows(self, adapter_names: Sequence[str | None] | None) -> Iterator[None]:
        if adapter_names is not None:
            adapter_names = list(adapter_names)
            if not adapter_names:
                raise ValueError("adapter_names is empty: give one adapter name (or None) per batch row.")
            self._check_names(adapter_names)
        previous, self._row_adapters = self._row_adapters, adapter_names
        try:
            yield
        finally:
            self._row_adapters = previous

    @contextlib.contextmanager
    def reference_attention(self) -> Iterator[None]:
        """Run the slow float64 reference attention instead of the fused path (for tests and debugging)."""
        self._routing.set(REFERENCE_ATTENTION_NAME)
        try:
            yield
        finally:
            self._routing.set(ATTENTION_NAME)

    def unload(self) -> PreTrainedModel:
        """Detach every adapter and give back the base model as it was: its original attention implementation
        and which of its parameters required gradients."""
        for call in self._routing.calls:
            if hasattr(call.module, PROVIDER_ATTR):
                delattr(call.module, PROVIDER_ATTR)
        self._routing.restore()
        self._frozen.restore()
        return self.base_model

    # --------------------------------------------------------------------------------------------- run
    def forward(self, *args, adapter_names: Sequence[str | None] | None = None, **kwargs):
        with self._rows(adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(self, *args, adapter_names: Sequence[str | None] | None = None, **kwargs):
        with self._rows(adapter_names):
            return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ------------------------------------------------------------------------------------------- inspect
    def virtual_kv(self, layer_idx: int, adapter_name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Materialised virtual keys and values of a layer, each ``[num_query_heads, num_virtual_tokens, head_dim]``."""
        name = adapter_name or self.active_adapter
        self._check_names([name])
        if name is None:
            raise ValueError("This model has no adapter.")
        layer_kv = self.adapters[name].get(layer_idx)
        if layer_kv is None:
            raise ValueError(f"Adapter {name!r} has no virtual pairs in layer {layer_idx} (targets "
                             f"{sorted(int(i) for i in self.adapters[name].layers)}).")
        return layer_kv()

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # -------------------------------------------------------------------------------------- save / load
    def save_pretrained(self, save_directory: str | os.PathLike, adapter_names: Sequence[str] | None = None) -> None:
        """Write each adapter as adapter_config.json + adapter_model.safetensors (atomically): the adapter named
        "default" into `save_directory` itself, any other into ``save_directory/<name>``."""
        names = list(self.adapters) if adapter_names is None else list(adapter_names)
        self._check_names(names)
        root = Path(save_directory)
        for name in names:
            folder = root if name == DEFAULT_ADAPTER else root / name
            bank = self.adapters[name]
            tensors = {key: value.detach().contiguous().cpu() for key, value in bank.state_dict().items()}
            atomic_write(folder / WEIGHTS_NAME, lambda tmp, t=tensors: save_file(t, tmp, metadata={"format": "pt"}))
            atomic_write_json(folder / CONFIG_NAME, {
                **bank.config.to_dict(), "base_model": asdict(self.shape), "format_version": FORMAT_VERSION,
            })

    def load_adapter(self, model_dir: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER,
                     is_trainable: bool = False) -> None:
        """Load a saved adapter under `adapter_name` (it becomes active if it is the only one)."""
        config, tensors = read_adapter(model_dir, self.shape)
        self.add_adapter(adapter_name, config)
        bank = self.adapters[adapter_name]
        expected = bank.state_dict()
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        wrong = sorted(k for k in set(expected) & set(tensors) if tensors[k].shape != expected[k].shape)
        if missing or unexpected or wrong:
            self.delete_adapter(adapter_name)
            raise AdapterMismatchError(
                f"{Path(model_dir) / WEIGHTS_NAME} does not match its config: missing {missing[:4]}, unexpected "
                f"{unexpected[:4]}, wrong shape {wrong[:4]}. The file is corrupt or from another version; re-save it."
            )
        bank.load_state_dict(tensors)
        bank.requires_grad_(is_trainable and adapter_name == self.active_adapter)

    @classmethod
    def from_pretrained(cls, base_model: PreTrainedModel, model_dir: str | os.PathLike,
                        adapter_name: str = DEFAULT_ADAPTER, is_trainable: bool = False) -> "HiFICLModel":
        """Load a saved adapter onto `base_model` (frozen adapter unless `is_trainable`)."""
        read_adapter(model_dir, None)  # fail on a missing or malformed folder before touching the base model
        model = cls(base_model, None)
        try:
            model.load_adapter(model_dir, adapter_name, is_trainable=is_trainable)
        except BaseException:
            model.unload()  # leave the caller's base model as it was
            raise
        return model


def read_adapter(model_dir: str | os.PathLike, shape: ModelShape | None) -> tuple[HiFICLConfig, dict[str, torch.Tensor]]:
    """Read and check a saved adapter folder; `shape` (if given) must match the shape it was saved for."""
    folder = Path(model_dir)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        inside = sorted(p.name for p in folder.iterdir() if (p / CONFIG_NAME).is_file()) if folder.is_dir() else []
        hint = f" It holds adapters in sub-folders {inside}: pass one of those folders." if inside else ""
        raise FileNotFoundError(f"No HiFICL adapter in {folder}: expected {CONFIG_NAME} and {WEIGHTS_NAME}.{hint}")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise AdapterMismatchError(f"{config_path} is not valid JSON ({error}); re-save the adapter.") from error
    if not isinstance(data, dict):
        raise AdapterMismatchError(f"{config_path} must hold a JSON object.")
    saved_shape = data.pop("base_model", None)
    data.pop("format_version", None)
    config = HiFICLConfig.from_dict(data)
    if shape is not None:
        if not isinstance(saved_shape, dict):
            raise AdapterMismatchError(f"{config_path} does not record the base model's shape; re-save the adapter.")
        fields = ("num_layers", "num_query_heads", "num_kv_heads", "head_dim", "text_model_type")
        if any(saved_shape.get(f) != getattr(shape, f) for f in fields):
            saved = ModelShape(**{f: saved_shape.get(f) for f in ModelShape.__dataclass_fields__})
            raise AdapterMismatchError(
                f"The adapter in {folder} was trained for a model with {saved.describe()}, but this model has "
                f"{shape.describe()}. Load it onto the model it was trained for, or train a new adapter."
            )
    return config, load_file(str(weights_path))


def get_hificl_model(base_model: PreTrainedModel, config: HiFICLConfig | None = None,
                     adapter_name: str = DEFAULT_ADAPTER) -> HiFICLModel:
    """Freeze `base_model` and attach a new HiFICL adapter to its language model's attention."""
    return HiFICLModel(base_model, config or HiFICLConfig(), adapter_name)
