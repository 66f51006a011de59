"""`ShiftModel`: a frozen base model and one adapter of small trainable "shift" parameters that a subclass hooks
into it (LIVE's vectors after each MLP, MimIC's head-wise shifts). Saved in hificl's own format: the method, the
format version, the adapter's settings, the shape of the base model and the method that trained it in
``adapter_config.json``, the shifts in ``adapter_model.safetensors``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from ..core import AdapterMismatchError
from ..core.validate import known_fields
from ..routing import ModelShape
from ..tuner.layer import RowSelection
from .base import AdapterModel, training_record
from .files import (CONFIG_NAME, DEFAULT_ADAPTER, WEIGHTS_NAME, adapter_folder, check_tensors, read_adapter_config,
                    read_adapter_weights, write_adapter)

SAVED_KEYS = ("method", "base_model", "format_version", "trained_by")  # saved beside the settings' own fields


class ShiftModel(AdapterModel):
    """See the module docstring. Subclasses set `config_class` (the settings dataclass), build `shifts` and
    `shape` in their constructor and call `row_mask(batch, device)` in their hooks to learn which rows of the
    current batch to shift."""

    config_class: ClassVar[type]

    def __init__(self, base_model: PreTrainedModel, config: Any):
        super().__init__(base_model)
        self.config = config
        self.trained_by: dict[str, Any] | None = None
        self.shape: ModelShape | None = None
        self.shifts: nn.Module | None = None
        self._disabled = False
        self._selection = RowSelection()

    @property
    def adapter_names(self) -> list[str]:
        return [DEFAULT_ADAPTER] if self.shifts is not None else []

    @property
    def active_adapter(self) -> str | None:
        return DEFAULT_ADAPTER if self.shifts is not None else None

    @property
    def peft_config(self) -> dict[str, Any]:
        return {DEFAULT_ADAPTER: self.config}

    # ------------------------------------------------------------------------------------- which rows
    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        previous, self._disabled = self._disabled, True
        try:
            yield
        finally:
            self._disabled = previous

    @contextlib.contextmanager
    def _rows(self, adapter_names: Sequence[str | None] | None) -> Iterator[None]:
        previous, self._selection.names = self._selection.names, self._row_names(adapter_names)
        try:
            yield
        finally:
            self._selection.names = previous

    def row_mask(self, batch_size: int, device: torch.device) -> bool | torch.Tensor:
        """False: leave every row alone; True: shift every row; a boolean ``[batch]`` tensor: shift those rows."""
        if self._disabled:
            return False
        rows = self._selection.rows_for(batch_size, DEFAULT_ADAPTER)
        if rows is None or isinstance(rows, str):
            return rows is not None
        return torch.tensor([name is not None for name in rows], device=device)

    def forward(self, *args, adapter_names: Sequence[str | None] | None = None, **kwargs):
        with self._rows(adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(self, *args, adapter_names: Sequence[str | None] | None = None, **kwargs):
        with self._rows(adapter_names):
            return self.base_model.generate(*args, **kwargs)

    # ------------------------------------------------------------------------------------- files
    def adapter_config(self) -> dict[str, Any]:
        """The saved adapter_config.json: the method, the settings, the model's shape and who trained it."""
        config = {"method": self.method, **asdict(self.config), "base_model": asdict(self.shape)}
        return config if self.trained_by is None else {**config, "trained_by": self.trained_by}

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        self._check_names([name])
        return dict(self.shifts.named_parameters())

    def record_training(self, method: str, options: dict[str, Any], data: dict[str, Any] | None = None) -> None:
        self.trained_by = training_record(method, options, data)

    def save_pretrained(self, save_directory, adapter_names: Sequence[str] | None = None) -> None:
        self._check_names(list(adapter_names or []))
        with adapter_folder(save_directory) as tmp:
            write_adapter(tmp, self.adapter_config(), self.adapter_state(DEFAULT_ADAPTER))

    def _read(self, folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        data = read_adapter_config(folder, self.title)
        if data.get("method") != self.method:
            raise AdapterMismatchError(f"{folder / CONFIG_NAME} is not a {self.title} adapter: load it with "
                                       "hificl.adapters.load_adapter_model, or pass another folder.")
        self.shape.check(data.get("base_model"), str(folder))
        return data, read_adapter_weights(folder)

    def load_adapter(self, model_dir, adapter_name: str = DEFAULT_ADAPTER, is_trainable: bool = False) -> None:
        """Load saved shifts (and their settings) into this model, replacing its own."""
        if adapter_name != DEFAULT_ADAPTER:
            raise ValueError(f"A {self.title} model holds one adapter, named {DEFAULT_ADAPTER!r}.")
        folder = Path(model_dir)
        data, tensors = self._read(folder)
        self._load_state(tensors, folder / WEIGHTS_NAME)
        self.config = settings_from_saved(self.config_class, data, folder)
        self.trained_by = data.get("trained_by")
        self._set_trainable(adapter_name, is_trainable)

    def restore_weights(self, model_dir, adapter_name: str | None = None) -> None:
        folder = Path(model_dir)
        data, tensors = self._read(folder)
        mine = json.loads(json.dumps(asdict(self.config)))
        theirs = {k: v for k, v in data.items() if k not in SAVED_KEYS}
        if theirs != mine:
            changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise AdapterMismatchError(f"{folder} holds an adapter with other settings ({changed}) than this "
                                       f"{self.title} adapter; load it with load_adapter instead.")
        self._load_state(tensors, folder / WEIGHTS_NAME)
        self.trained_by = data.get("trained_by", self.trained_by)

    def _load_state(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        expected = self.adapter_state(DEFAULT_ADAPTER)
        check_tensors(path, tensors, expected)
        with torch.no_grad():
            for key, value in expected.items():
                value.copy_(tensors[key])

    @classmethod
    def _for_saved(cls, base_model, config: dict[str, Any], folder: Path, adapter_name: str) -> "ShiftModel":
        if adapter_name != DEFAULT_ADAPTER:
            raise ValueError(f"A {cls.title} model holds one adapter, named {DEFAULT_ADAPTER!r}.")
        return cls(base_model, settings_from_saved(cls.config_class, config, folder))


def settings_from_saved(cls: type, data: dict[str, Any], folder: Path | None = None) -> Any:
    """An adapter settings dataclass `cls` from a saved adapter_config.json (its own fields only); an unknown field
    or a bad value is an `AdapterMismatchError` naming the file (in `folder`)."""
    where = f"{folder / CONFIG_NAME}: " if folder is not None else ""
    fields = {k: v for k, v in data.items() if k not in SAVED_KEYS}
    try:
        known_fields(fields, (f.name for f in dataclasses.fields(cls) if f.init), cls.__name__)
        return cls(**fields)
    except ValueError as error:
        raise AdapterMismatchError(f"{where}{error} Fix the value there, or save the adapter again.") from None
