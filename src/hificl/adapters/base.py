"""The API every trained method's adapter model offers, shaped like PEFT's, and loading any saved adapter.

An adapter model holds a frozen base model plus the trainable parts of its method, and

* passes ``forward`` / ``generate`` (and any other attribute) through to the base model; ``adapter_names=[...]``
  (one adapter name, or None for the base model, per batch row) mixes adapted and base rows in one batch;
* ``disable_adapter()``: a block inside which the model is exactly the base model (teachers run there);
* ``save_pretrained(folder)`` / ``load_adapter(folder)`` / ``from_pretrained(base, folder)``: the folder holds
  ``adapter_config.json`` and ``adapter_model.safetensors``, written together in one folder swap;
* ``unload()``: the base model back as it was (its attention and which parameters required gradients).

HiFICL and LoRA adapters are PEFT adapters (`hificl.adapters.peft_backed`); LIVE's and MimIC's shifts are hooks of
hificl's own (`hificl.adapters.shifts`). `load_adapter_model(base, folder)` loads any saved adapter by its type.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from ..core import AdapterMismatchError, UnsupportedModelError
from ..registry import Registry
from ..routing import freeze
from .files import CONFIG_NAME, DEFAULT_ADAPTER, read_adapter_config


class AdapterModel(nn.Module, ABC):
    """Base of every adapter model (see the module docstring). Subclasses set `method` and `title` (and, for a PEFT
    adapter, `peft_type`) and implement the adapter bookkeeping; the rest of the API is here."""

    method: ClassVar[str]
    title: ClassVar[str]
    peft_type: ClassVar[str | None] = None  # the PEFT type of its saved folders (None: hificl's own format)

    def __init__(self, base_model: PreTrainedModel):
        super().__init__()
        if not isinstance(base_model, PreTrainedModel):
            raise UnsupportedModelError(f"{self.title} needs a transformers PreTrainedModel, got "
                                        f"{type(base_model).__name__}.")
        self.base_model = base_model
        self._frozen = freeze(base_model)

    @property
    def _no_split_modules(self) -> list[str] | None:
        """The base model's layer classes a sharding engine wraps as units (FSDP2's transformer-based wrap)."""
        return getattr(self.base_model, "_no_split_modules", None)

    # ----------------------------------------------------------------------- to implement
    @property
    @abstractmethod
    def adapter_names(self) -> list[str]:
        """The names of the adapters this model holds."""

    @property
    @abstractmethod
    def active_adapter(self) -> str | None:
        """The adapter every row gets by default (None: none)."""

    @abstractmethod
    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of adapter `name` (its live parameters), by the names they are saved under."""

    @abstractmethod
    def disable_adapter(self) -> Iterator[None]:
        """A context inside which the model is exactly the base model."""

    @abstractmethod
    def save_pretrained(self, save_directory: str | os.PathLike, adapter_names: Sequence[str] | None = None) -> None:
        """Write the adapters (all by default) into `save_directory` in one folder swap: the adapter named
        "default" into the folder itself, any other into ``save_directory/<name>``. A folder saved to before is
        replaced as a whole; a folder holding anything else is refused."""

    @abstractmethod
    def load_adapter(self, model_dir: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER,
                     is_trainable: bool = False) -> None:
        """Load a saved adapter under `adapter_name` (it becomes active if it is the only one)."""

    @abstractmethod
    def restore_weights(self, model_dir: str | os.PathLike, adapter_name: str | None = None) -> None:
        """Replace the weights of adapter `adapter_name` (default: the active one) by those saved in `model_dir`,
        which must hold an adapter of the same settings (e.g. a checkpoint of this training run)."""

    @abstractmethod
    def record_training(self, method: str, options: dict[str, Any], data: dict[str, Any] | None = None) -> None:
        """Record, in the active adapter's saved config, the hificl method and options that train it and, once
        known, the data it trains on (task, example counts), so that `hificl eval --adapter` reports what
        actually trained it."""

    @abstractmethod
    def _release(self) -> None:
        """Undo what this model hooked into the base model."""

    @classmethod
    @abstractmethod
    def _for_saved(cls, base_model: PreTrainedModel, config: dict[str, Any], folder: Path,
                   adapter_name: str) -> "AdapterModel":
        """An adapter model on `base_model` holding a fresh adapter `adapter_name` of the saved config `config`
        (the weights are loaded right after)."""

    # ----------------------------------------------------------------------- the common API
    def _check_names(self, names: Sequence[str | None]) -> None:
        unknown = sorted({str(n) for n in names if n is not None and n not in self.adapter_names})
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; this model has {self.adapter_names}.")

    def _row_names(self, adapter_names: Sequence[str | None] | None) -> list[str | None] | None:
        """The ``adapter_names`` of a forward/generate call, checked: one known adapter name (or None) per row."""
        if adapter_names is None:
            return None
        adapter_names = list(adapter_names)
        if not adapter_names:
            raise ValueError("adapter_names is empty: give one adapter name (or None) per batch row.")
        self._check_names(adapter_names)
        return adapter_names

    def delete_adapter(self, adapter_name: str) -> None:
        raise ValueError(f"A {self.title} model holds exactly one adapter and cannot delete it; use unload() to get "
                         "the base model back.")

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def unload(self) -> PreTrainedModel:
        """Detach every adapter and give back the base model as it was."""
        self._release()
        self._frozen.restore()
        return self.base_model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def num_adapter_parameters(self, name: str | None = None) -> int:
        """The size of adapter `name` (default: the active one), trainable or not."""
        name = name or self.active_adapter
        return sum(t.numel() for t in self.adapter_state(name).values()) if name is not None else 0

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    @classmethod
    def from_pretrained(cls, base_model: PreTrainedModel, model_dir: str | os.PathLike,
                        adapter_name: str = DEFAULT_ADAPTER, is_trainable: bool = False) -> "AdapterModel":
        """Load a saved adapter onto `base_model` (a frozen adapter unless `is_trainable`)."""
        folder = Path(model_dir)
        data = read_adapter_config(folder, cls.title)  # fail on a missing or malformed folder first
        check_saved_type(cls, data, folder)
        with torch.random.fork_rng(devices=[]):  # the fresh adapter's initialisation is overwritten: draw privately
            model = cls._for_saved(base_model, data, folder, adapter_name)
        try:
            model.restore_weights(folder, adapter_name)
            model._set_trainable(adapter_name, is_trainable)
        except BaseException:
            model.unload()  # leave the caller's base model as it was
            raise
        return model

    def _set_trainable(self, name: str, trainable: bool) -> None:
        for tensor in self.adapter_state(name).values():
            tensor.requires_grad_(trainable)


def saved_type(data: dict[str, Any]) -> str | None:
    """The adapter method of a saved adapter_config.json: its PEFT type's method, or hificl's ``method`` field."""
    if "peft_type" in data:
        for name in ADAPTERS.names():
            if ADAPTERS.get(name).peft_type == str(data["peft_type"]):
                return name
        return None
    return data.get("method")


def check_saved_type(cls: type[AdapterModel], data: dict[str, Any], folder: Path) -> None:
    method = saved_type(data)
    if method != cls.method:
        kind = f"a PEFT {data['peft_type']} adapter" if "peft_type" in data else f"a {method!r} adapter"
        raise AdapterMismatchError(f"{folder / CONFIG_NAME} is {kind}, not a {cls.title} adapter: load it with "
                                   "hificl.adapters.load_adapter_model, or pass another folder.")


ADAPTERS: Registry[type[AdapterModel]] = Registry("adapter method")


def register_adapter(cls: type[AdapterModel]) -> type[AdapterModel]:
    """Class decorator: make `load_adapter_model` load saved adapters of ``cls.method``."""
    ADAPTERS.register(cls.method, cls)
    return cls


def training_record(method: str, options: dict[str, Any], data: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a saved adapter's ``trained_by`` holds: the method, its options and (once known) its training data."""
    return {"method": method, "options": options, **({"data": data} if data else {})}


def saved_method(model_dir: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """The method of a saved adapter folder and its config (as saved)."""
    data = read_adapter_config(model_dir)
    method = saved_type(data)
    if method not in ADAPTERS:
        peft_types = sorted(ADAPTERS.get(n).peft_type for n in ADAPTERS.names() if ADAPTERS.get(n).peft_type)
        what = (f"a PEFT adapter of type {data['peft_type']!r}; hificl loads the PEFT types {peft_types} and its own "
                f"LIVE and MimIC adapters" if "peft_type" in data
                else f"no known adapter method ({method!r}); known: {ADAPTERS.names()}")
        raise AdapterMismatchError(f"{Path(model_dir) / CONFIG_NAME} holds {what}. Pass a folder saved by hificl "
                                   "(train, compare, distill) or by PEFT with a HiFICL or LoRA config.")
    return method, data


def load_adapter_model(base_model: PreTrainedModel, model_dir: str | os.PathLike,
                       is_trainable: bool = False) -> AdapterModel:
    """Load any saved adapter onto `base_model`, as the adapter model of the method its config names. The model
    comes back in eval mode."""
    method, _ = saved_method(model_dir)
    return ADAPTERS.get(method).from_pretrained(base_model, model_dir, is_trainable=is_trainable).eval()
