"""Adapter models whose adapters are PEFT's: `HiFICLModel` (``peft_type "HIFICL"``, `hificl.tuner`) and
`LoraModel` (PEFT's LoRA on the language model's attention projections). Each is a thin layer over the
`peft.PeftModel` it holds (``.peft_model``): the same adapters, the same folders, the same numbers as PEFT's own API,
plus hificl's checks (shape, names, damaged files, each naming the file and the fix), atomic saving, and the
record of the method that trained an adapter.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from abc import abstractmethod
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from peft import LoraConfig, PeftConfig, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from transformers import PreTrainedModel

from ..core import PROVIDER_ATTR, AdapterMismatchError, VirtualKV
from ..routing import ModelShape, RoutedAttention, find_language_model
from ..tuner import HiFICLConfig, HiFICLTuner
from ..tuner.layer import BASE_ROW
from .base import AdapterModel, check_saved_type, register_adapter, training_record
from .files import (CONFIG_NAME, DEFAULT_ADAPTER, WEIGHTS_NAME, adapter_folder, check_tensors, read_adapter_config,
                    read_adapter_weights)


def _valid_name(name: Any) -> str:
    if not isinstance(name, str) or not name or "/" in name or name.startswith(".") or name == BASE_ROW:
        raise ValueError(f"Adapter names must be non-empty strings without '/' (and not {BASE_ROW!r}), got {name!r}.")
    return name


class PeftAdapterModel(AdapterModel):
    """A frozen base model with named PEFT adapters of one type, behind the common adapter API (see the module
    docstring). Subclasses set `method`, `title`, `peft_type` and implement `_config_from_saved` and `_settings`."""

    def __init__(self, base_model: PreTrainedModel, peft_config: PeftConfig, adapter_name: str = DEFAULT_ADAPTER):
        super().__init__(base_model)
        try:
            self.peft_model = get_peft_model(base_model, peft_config, _valid_name(adapter_name))
        except BaseException:
            self._frozen.restore()
            raise

    # ----------------------------------------------------------------------- to implement
    @classmethod
    @abstractmethod
    def _config_from_saved(cls, data: dict[str, Any], folder: Path) -> PeftConfig:
        """The PEFT config of a saved adapter_config.json."""

    @staticmethod
    @abstractmethod
    def _settings(config: PeftConfig) -> dict[str, Any]:
        """What must agree between a checkpoint and the adapter it restores."""

    def _check_saved(self, config: PeftConfig, folder: Path) -> None:
        """Raise `AdapterMismatchError` (naming `folder`) when a saved config cannot go onto this model."""

    def _saved_tensors(self, data: dict[str, Any], folder: Path) -> dict[str, torch.Tensor]:
        return read_adapter_weights(folder)

    # ----------------------------------------------------------------------- adapters
    @property
    def tuner(self) -> nn.Module:
        """PEFT's tuner inside the PEFT model (``peft_model.base_model``)."""
        return self.peft_model.base_model

    @property
    def adapter_names(self) -> list[str]:
        return list(self.peft_model.peft_config)

    @property
    def active_adapter(self) -> str | None:
        active = self.tuner.active_adapters if self.adapter_names else []
        return active[0] if active else None

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.peft_model.peft_config

    def add_adapter(self, adapter_name: str, config: PeftConfig) -> None:
        """Add a freshly initialised adapter; the first one added becomes active, a later one is frozen."""
        if _valid_name(adapter_name) in self.adapter_names:
            raise ValueError(f"An adapter named {adapter_name!r} already exists; delete it first or pick another name.")
        self.peft_model.add_adapter(adapter_name, config)
        if self.active_adapter is None:
            self.set_adapter(adapter_name)

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the active adapter: the one used by default and the only trainable one."""
        self._check_names([adapter_name])
        self.peft_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter. If it was active, another one (or none: the base model) becomes active."""
        self._check_names([adapter_name])
        self.peft_model.delete_adapter(adapter_name)

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        self._check_names([name])
        return get_peft_model_state_dict(self.peft_model, adapter_name=name)

    def _set_trainable(self, name: str, trainable: bool) -> None:
        self.peft_model.set_requires_grad(name, trainable)

    def record_training(self, method: str, options: dict[str, Any], data: dict[str, Any] | None = None) -> None:
        config = self.peft_config[self.active_adapter]
        if hasattr(config, "trained_by"):
            config.trained_by = training_record(method, options, data)

    # ----------------------------------------------------------------------- running
    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        with self.peft_model.disable_adapter():
            yield

    def _names(self, adapter_names: Sequence[str | None] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """`kwargs` with ``adapter_names`` in PEFT's terms (None -> "__base__") where a call mixes adapters."""
        names = self._row_names(adapter_names)
        if names is not None and self.adapter_names:
            kwargs["adapter_names"] = [BASE_ROW if name is None else name for name in names]
        return kwargs

    def _runner(self) -> nn.Module:
        # PEFT's model needs an adapter to run; with every adapter deleted this is the base model
        return self.peft_model if self.adapter_names else self.base_model

    def forward(self, *args, adapter_names: Sequence[str | None] | None = None, **kwargs):
        return self._runner()(*args, **self._names(adapter_names, kwargs))

    def generate(self, *args, adapter_names: Sequence[str | None] | None = None, **kwargs):
        return self._runner().generate(*args, **self._names(adapter_names, kwargs))

    # ----------------------------------------------------------------------- files
    def save_pretrained(self, save_directory, adapter_names: Sequence[str] | None = None) -> None:
        names = list(self.adapter_names) if adapter_names is None else list(adapter_names)
        self._check_names(names)
        with adapter_folder(save_directory) as tmp:
            self.peft_model.save_pretrained(str(tmp), selected_adapters=names)

    @classmethod
    def _parse(cls, data: dict[str, Any], folder: Path) -> PeftConfig:
        """`_config_from_saved`, its errors saying which file the bad value comes from."""
        try:
            return cls._config_from_saved(data, folder)
        except AdapterMismatchError:
            raise
        except (TypeError, ValueError) as error:
            raise type(error)(f"{folder / CONFIG_NAME}: {error}") from None

    def _read(self, folder: Path) -> tuple[PeftConfig, dict[str, Any]]:
        data = read_adapter_config(folder, self.title)
        check_saved_type(type(self), data, folder)
        config = self._parse(data, folder)
        self._check_saved(config, folder)
        return config, data

    def load_adapter(self, model_dir, adapter_name: str = DEFAULT_ADAPTER, is_trainable: bool = False) -> None:
        folder = Path(model_dir)
        config, _ = self._read(folder)
        with torch.random.fork_rng(devices=[]):  # the fresh adapter's initialisation is overwritten: draw privately
            self.add_adapter(adapter_name, config)
        try:
            self.restore_weights(folder, adapter_name)
        except BaseException:
            self.delete_adapter(adapter_name)
            raise
        self._set_trainable(adapter_name, is_trainable and adapter_name == self.active_adapter)

    def restore_weights(self, model_dir, adapter_name: str | None = None) -> None:
        folder = Path(model_dir)
        name = adapter_name or self.active_adapter
        self._check_names([name])
        config, data = self._read(folder)
        mine, theirs = self._settings(self.peft_config[name]), self._settings(config)
        if mine != theirs:
            changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise AdapterMismatchError(f"{folder} holds an adapter with other settings ({changed}) than adapter "
                                       f"{name!r}; load it with load_adapter instead.")
        tensors = self._saved_tensors(data, folder)
        check_tensors(folder / WEIGHTS_NAME, tensors, get_peft_model_state_dict(self.peft_model, adapter_name=name))
        set_peft_model_state_dict(self.peft_model, tensors, adapter_name=name)
        if hasattr(config, "trained_by"):
            self.peft_config[name].trained_by = config.trained_by

    def _release(self) -> None:
        self.peft_model.unload()

    @classmethod
    def _for_saved(cls, base_model, data: dict[str, Any], folder: Path, adapter_name: str) -> "PeftAdapterModel":
        config = cls._parse(data, folder)
        try:  # PEFT checks some values only when it builds the layers (e.g. LoRA's r)
            return cls._attach(base_model, config, folder, adapter_name)
        except AdapterMismatchError:
            raise
        except (TypeError, ValueError) as error:
            raise type(error)(f"{folder / CONFIG_NAME}: {error}") from None

    @classmethod
    @abstractmethod
    def _attach(cls, base_model, config: PeftConfig, folder: Path, adapter_name: str) -> "PeftAdapterModel":
        """A model on `base_model` with a fresh adapter `adapter_name` of `config`, from the saved `folder`."""


def _peft_fields(cls: type, data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The saved fields that `cls` (a PEFT config class) takes; a field it does not know is an error naming it."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise AdapterMismatchError(f"{folder / CONFIG_NAME} has fields {unknown} that this version's {cls.__name__} "
                                   "does not know: it was written by a newer version; upgrade hificl and peft.")
    for name, value in data.items():  # a value of another kind than its field's default (PEFT checks few)
        field = fields[name]
        kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
        if field.default is not None and field.default is not dataclasses.MISSING:
            kind = type(field.default).__name__
        kinds = {"bool": (bool,), "int": (int,), "float": (int, float)}.get(kind)
        if kinds and value is not None and (not isinstance(value, kinds) or (bool not in kinds and
                                                                             isinstance(value, bool))):
            raise AdapterMismatchError(f"{folder / CONFIG_NAME}: {name} must be {kind}, got {value!r}. Fix the value "
                                       "there, or save the adapter again.")
    return dict(data)


# ------------------------------------------------------------------------------------------------ HiFICL
class _AdapterLayers(nn.Module):
    """A read-only view of one HiFICL adapter's per-layer `VirtualKV` modules (``.layers["3"]``, ``.get(3)``,
    ``.parameters()``) and its config."""

    def __init__(self, config: HiFICLConfig, layers: dict[int, VirtualKV]):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleDict({str(i): layer for i, layer in layers.items()})

    def get(self, layer_idx: int) -> VirtualKV | None:
        return self.layers[str(layer_idx)] if str(layer_idx) in self.layers else None


@register_adapter
class HiFICLModel(PeftAdapterModel):
    """A frozen base model with named HiFICL adapters: a `peft.PeftModel` of ``peft_type "HIFICL"`` behind hificl's
    adapter API. ``forward`` and ``generate`` accept ``adapter_names=[...]`` (one adapter name or None per batch row)
    to serve several adapters, and the base model, in one batch."""

    method = "hificl"
    title = "HiFICL"
    peft_type = "HIFICL"

    def __init__(self, base_model: PreTrainedModel, config: HiFICLConfig | None = None,
                 adapter_name: str = DEFAULT_ADAPTER):
        """Attach to `base_model` (frozen in place) with a new adapter of `config` (default settings if None)."""
        if config is not None and not isinstance(config, HiFICLConfig):
            raise TypeError(f"config must be a HiFICLConfig, got {type(config).__name__}.")
        super().__init__(base_model, copy.deepcopy(config) if config is not None else HiFICLConfig(), adapter_name)

    @property
    def tuner(self) -> HiFICLTuner:
        return self.peft_model.base_model

    @property
    def routing(self) -> RoutedAttention:
        """The base model's routed attention (its attention modules, decoder layers, MLPs)."""
        return self.tuner.routing

    @property
    def shape(self) -> ModelShape:
        return self.tuner.shape

    @property
    def adapters(self) -> nn.ModuleDict:
        """Each adapter's per-layer virtual pairs, by adapter name (a view: the parameters live in the attention
        modules)."""
        layers = self.tuner.layers()
        return nn.ModuleDict({name: _AdapterLayers(config, {layer.layer_index: layer.virtual_kv[name]
                                                            for layer in layers if name in layer.virtual_kv})
                              for name, config in self.peft_config.items()})

    def add_adapter(self, adapter_name: str, config: HiFICLConfig) -> None:
        if not isinstance(config, HiFICLConfig):
            raise TypeError(f"config must be a HiFICLConfig, got {type(config).__name__}.")
        super().add_adapter(adapter_name, copy.deepcopy(config))

    def virtual_kv(self, layer_idx: int, adapter_name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Materialised virtual keys and values of a layer, each ``[num_query_heads, num_virtual_tokens, head_dim]``."""
        name = adapter_name or self.active_adapter
        if name is None:
            raise ValueError("This model has no adapter.")
        self._check_names([name])
        layer_kv = self.adapters[name].get(layer_idx)
        if layer_kv is None:
            raise ValueError(f"Adapter {name!r} has no virtual pairs in layer {layer_idx} (targets "
                             f"{sorted(int(i) for i in self.adapters[name].layers)}).")
        return layer_kv()

    def reference_attention(self):
        """Run the slow float64 reference attention instead of the fused path (for tests and debugging)."""
        return self.tuner.reference_attention()

    @classmethod
    def _config_from_saved(cls, data: dict[str, Any], folder: Path) -> HiFICLConfig:
        if "peft_type" not in data:  # the format before HiFICL adapters were PEFT's
            fields = {k: v for k, v in data.items() if k not in ("method", "format_version", "base_model")}
            fields = _peft_fields(HiFICLConfig, fields, folder)
            return HiFICLConfig(**fields, model_shape=data.get("base_model"))
        fields = {k: v for k, v in data.items() if k != "peft_type"}
        return HiFICLConfig(**_peft_fields(HiFICLConfig, fields, folder))

    @staticmethod
    def _settings(config: HiFICLConfig) -> dict[str, Any]:
        return config.settings()

    def _check_saved(self, config: HiFICLConfig, folder: Path) -> None:
        self.shape.check(config.model_shape, str(folder))

    def _saved_tensors(self, data: dict[str, Any], folder: Path) -> dict[str, torch.Tensor]:
        """The saved tensors by PEFT's keys; a folder of the earlier format (keys ``layers.<i>.<factor>``) is read
        too, its keys mapped onto this model's attention modules."""
        tensors = read_adapter_weights(folder)
        if "peft_type" in data:
            return tensors
        names = {id(module): name for name, module in self.base_model.named_modules()}
        modules = self.routing.attention_modules
        converted = {}
        for key, value in tensors.items():
            parts = key.split(".")
            if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or int(parts[1]) >= len(modules):
                converted[key] = value  # reported by the tensor check
                continue
            converted[f"base_model.model.{names[id(modules[int(parts[1])])]}.{PROVIDER_ATTR}.virtual_kv.{parts[2]}"] = value
        return converted

    @classmethod
    def _attach(cls, base_model, config: HiFICLConfig, folder: Path, adapter_name: str) -> "HiFICLModel":
        shape = ModelShape.of(find_language_model(base_model))
        shape.check(config.model_shape, str(folder))  # before anything is attached
        return cls(base_model, config, adapter_name)


def get_hificl_model(base_model: PreTrainedModel, config: HiFICLConfig | None = None,
                     adapter_name: str = DEFAULT_ADAPTER) -> HiFICLModel:
    """Freeze `base_model` and attach a new HiFICL adapter to its language model's attention."""
    return HiFICLModel(base_model, config or HiFICLConfig(), adapter_name)


# ------------------------------------------------------------------------------------------------ LoRA
def attention_projections(model: nn.Module) -> list[str]:
    """Full names of the linear layers inside the language model's attention modules."""
    names = {id(module): name for name, module in model.named_modules()}
    return [f"{names[id(attention)]}.{child_name}"
            for attention in find_language_model(model).attention_modules
            for child_name, child in attention.named_children() if isinstance(child, nn.Linear)]


@register_adapter
class LoraModel(PeftAdapterModel):
    """PEFT's LoRA on the language model's attention projections (q/k/v/o: every linear layer of the attention
    modules that the routing probe finds, so vision towers are never touched)."""

    method = "lora"
    title = "LoRA"
    peft_type = "LORA"

    def __init__(self, base_model, r: int = 16, alpha: int = 32, dropout: float = 0.05, init_seed: int | None = None,
                 peft_config: LoraConfig | None = None, adapter_name: str = DEFAULT_ADAPTER):
        projections = attention_projections(base_model)  # before PEFT wraps them
        config = peft_config or LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                                           target_modules=projections)
        with torch.random.fork_rng(devices=[]):  # peft initialises A from the global generator
            if init_seed is not None:
                torch.manual_seed(init_seed)
            super().__init__(base_model, config, adapter_name)
        self._projections = set(projections)

    @classmethod
    def _config_from_saved(cls, data: dict[str, Any], folder: Path) -> LoraConfig:
        known = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
        return LoraConfig(**{k: v for k, v in data.items() if k in known})

    @staticmethod
    def _settings(config: LoraConfig) -> dict[str, Any]:
        return {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules or [])}

    def _check_saved(self, config: LoraConfig, folder: Path) -> None:
        """An adapter that names its targets by full path (as hificl's LoRA does: every attention projection of the
        language model) must name exactly this model's: a deeper model of the same width would otherwise load it
        and run with its extra layers unadapted."""
        saved = config.target_modules
        if not isinstance(saved, (list, set, tuple)) or not all("." in name for name in saved):
            return  # targets by suffix (q_proj, ...) or pattern: PEFT matches them on any model
        here = self._projections
        if set(saved) != here:
            raise AdapterMismatchError(
                f"The LoRA adapter in {folder} targets {len(saved)} attention projections that are not this model's "
                f"{len(here)} (e.g. {sorted(set(saved) ^ here)[:2]}): it was trained for another model (another "
                "depth or layout). Load it onto the model it was trained for, or train a new adapter.")

    @classmethod
    def _attach(cls, base_model, config: LoraConfig, folder: Path, adapter_name: str) -> "LoraModel":
        return cls(base_model, peft_config=config, adapter_name=adapter_name)
