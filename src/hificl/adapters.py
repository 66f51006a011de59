"""One API for the adapter of every trained method (HiFICL, LIVE, MimIC, LoRA), shaped like PEFT's.

An adapter model holds a frozen base model plus the trainable parts of its method, and

* passes ``forward`` / ``generate`` (and any other attribute) through to the base model; ``adapter_names=[...]``
  (one adapter name, or None for the base model, per batch row) mixes adapted and base rows in one batch;
* ``disable_adapter()``: a block inside which the model is exactly the base model (teachers run there);
* ``save_pretrained(folder)`` / ``load_adapter(folder)`` / ``from_pretrained(base, folder)``: the folder holds
  ``adapter_config.json`` (the method, the format version, the adapter's settings and the shape of the base model
  it was trained on) and ``adapter_model.safetensors``, written together in one folder swap;
* ``unload()``: the base model back as it was (its attention and which parameters required gradients).

`load_adapter_model(base, folder)` loads any saved adapter by the method its config names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from .core import AdapterMismatchError, UnsupportedModelError
from .core.validate import known_fields
from .io import atomic_folder
from .registry import Registry
from .routing import RoutedAttention, freeze

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
DEFAULT_ADAPTER = "default"
FORMAT_VERSION = 1  # of adapter_config.json + adapter_model.safetensors; raise it when either changes meaning


@dataclass(frozen=True)
class ModelShape:
    """The shape of the adapted language model, saved with every adapter and checked on load."""

    num_layers: int
    num_query_heads: int
    num_kv_heads: int
    head_dim: int
    text_model_type: str
    model_type: str
    hidden_size: int = 0

    CHECKED: ClassVar[tuple[str, ...]] = ("num_layers", "num_query_heads", "num_kv_heads", "head_dim",
                                          "text_model_type")

    @classmethod
    def of(cls, routing: RoutedAttention) -> "ModelShape":
        first = routing.calls[0]
        return cls(num_layers=len(routing.calls), num_query_heads=first.num_query_heads,
                   num_kv_heads=first.num_kv_heads, head_dim=first.head_dim,
                   text_model_type=getattr(routing.text_config, "model_type", ""),
                   model_type=getattr(routing.model.config, "model_type", ""),
                   hidden_size=getattr(routing.text_config, "hidden_size", 0) or 0)

    def describe(self) -> str:
        return (f"{self.num_layers} layers x {self.num_query_heads} query heads ({self.num_kv_heads} KV heads) x "
                f"head dim {self.head_dim}, text model type '{self.text_model_type}'")

    def check(self, saved: Any, where: Path) -> None:
        """Raise `AdapterMismatchError` unless `saved` (a dict from a config file) describes this shape."""
        if not isinstance(saved, dict):
            raise AdapterMismatchError(f"{where} does not record the base model's shape; re-save the adapter.")
        if any(saved.get(f) != getattr(self, f) for f in self.CHECKED):
            other = (f"{saved.get('num_layers')} layers x {saved.get('num_query_heads')} query heads "
                     f"({saved.get('num_kv_heads')} KV heads) x head dim {saved.get('head_dim')}, text model type "
                     f"'{saved.get('text_model_type')}'")
            raise AdapterMismatchError(
                f"The adapter in {where.parent} was trained for a model with {other}, but this model has "
                f"{self.describe()}. Load it onto the model it was trained for, or train a new adapter.")


# ------------------------------------------------------------------------------------------------ files
def _is_adapter_folder(folder: Path) -> bool:
    """Whether `folder` holds nothing but saved adapters (so a save may replace it as a whole)."""
    for entry in folder.iterdir():
        if entry.is_dir():
            if not _is_adapter_folder(entry):
                return False
        elif entry.name not in (CONFIG_NAME, WEIGHTS_NAME, "README.md"):
            return False
    return True


@contextlib.contextmanager
def adapter_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder to write one or more adapters into; it replaces `folder` in one swap when the block ends.
    An existing `folder` holding other files than saved adapters is refused (it is never replaced)."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or not _is_adapter_folder(folder)):
        raise FileExistsError(f"{folder} exists and holds other files than a saved adapter; save the adapter into an "
                              "empty folder (or a folder an adapter was saved to before).")
    with atomic_folder(folder) as tmp:
        yield tmp


def write_adapter(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write one adapter's two files into `folder` (a folder being filled inside `adapter_folder`)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / WEIGHTS_NAME),
              metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps({**config, "format_version": FORMAT_VERSION}, indent=2,
                                                 sort_keys=True) + "\n", encoding="utf-8")


def read_adapter_config(folder: str | os.PathLike, title: str = "hificl") -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of a saved adapter folder, with errors naming the file and the fix."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        inside = sorted(p.name for p in folder.iterdir() if (p / CONFIG_NAME).is_file()) if folder.is_dir() else []
        hint = f" It holds adapters in sub-folders {inside}: pass one of those folders." if inside else ""
        raise FileNotFoundError(f"No {title} adapter in {folder}: expected {CONFIG_NAME} and {WEIGHTS_NAME}.{hint}")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise AdapterMismatchError(f"{config_path} is not UTF-8 text ({error}); re-save the adapter.") from None
    except json.JSONDecodeError as error:
        raise AdapterMismatchError(f"{config_path} is not valid JSON ({error}); re-save the adapter.") from error
    if not isinstance(data, dict):
        raise AdapterMismatchError(f"{config_path} must hold a JSON object.")
    if "peft_type" not in data:  # hificl's own format (LoRA adapters are saved in PEFT's format)
        version = data.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise AdapterMismatchError(f"{config_path} has no valid format_version ({version!r}): it was not written "
                                       "by hificl, or it is damaged; re-save the adapter.")
        if version > FORMAT_VERSION:
            raise AdapterMismatchError(f"{config_path} has format version {version}, newer than this hificl reads "
                                       f"({FORMAT_VERSION}): upgrade hificl to load it.")
    return data


def read_adapter_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_model.safetensors``, with an error naming the file when it is damaged."""
    path = Path(folder) / WEIGHTS_NAME
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterMismatchError(f"{path} is not a readable safetensors file ({error}): it is truncated, damaged "
                                   "or of another format (a pickled checkpoint?). Re-save or re-train the adapter.") from None


def check_tensors(path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Raise `AdapterMismatchError` unless `tensors` has exactly the names and shapes of `expected`."""
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tensors[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise AdapterMismatchError(
            f"{path} does not match its config: missing {missing[:4]}, unexpected {unexpected[:4]}, wrong shape "
            f"{wrong[:4]}. The file is corrupt or from another version; re-save it.")


# ------------------------------------------------------------------------------------------------ the base
class AdapterModel(nn.Module):
    """Base of every adapter model (see the module docstring). Subclasses set `method` and `title` and implement
    the hooks marked below; they call `_rows_for(batch_size)` where their change is applied, to learn which rows of
    the current batch it applies to."""

    method: ClassVar[str]
    title: ClassVar[str]

    def __init__(self, base_model: PreTrainedModel):
        super().__init__()
        if not isinstance(base_model, PreTrainedModel):
            raise UnsupportedModelError(f"{self.title} needs a transformers PreTrainedModel, got "
                                        f"{type(base_model).__name__}.")
        self.base_model = base_model
        self._frozen = freeze(base_model)
        self._disabled = False
        self._row_adapters: list[str | None] | None = None

    # ----------------------------------------------------------------------- to implement
    @property
    def adapter_names(self) -> list[str]:
        """The names of the adapters this model holds."""
        raise NotImplementedError

    @property
    def active_adapter(self) -> str | None:
        raise NotImplementedError

    def adapter_config(self, name: str) -> dict[str, Any]:
        """The JSON-able settings of adapter `name`, as saved in adapter_config.json."""
        raise NotImplementedError

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of adapter `name`, by the names they are saved under."""
        raise NotImplementedError

    def _add_saved(self, name: str, config: dict[str, Any], folder: Path) -> None:
        """Add adapter `name` from a saved config (its weights are loaded by `load_adapter` right after)."""
        raise NotImplementedError

    def _release(self) -> None:
        """Undo what this model hooked into the base model."""

    # ----------------------------------------------------------------------- the common API
    def _check_names(self, names: Sequence[str | None]) -> None:
        unknown = sorted({str(n) for n in names if n is not None and n not in self.adapter_names})
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; this model has {self.adapter_names}.")

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

    def _rows_for(self, batch_size: int) -> list[str | None] | str | None:
        """Which adapter each row of a batch of `batch_size` gets now: None (no adapter: disabled, or no active
        one), one name for every row, or a list with one name (or None) per row."""
        if self._disabled:
            return None
        if self._row_adapters is None:
            return self.active_adapter
        names = self._row_adapters
        if batch_size != len(names):
            if batch_size % len(names):
                raise ValueError(f"adapter_names has {len(names)} entries but the batch has {batch_size} rows.")
            names = [name for name in names for _ in range(batch_size // len(names))]  # beams/samples per row
        return names[0] if len(set(names)) == 1 else names

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

    def save_pretrained(self, save_directory: str | os.PathLike, adapter_names: Sequence[str] | None = None) -> None:
        """Write the adapters (all by default) into `save_directory` in one folder swap: the adapter named
        "default" into the folder itself, any other into ``save_directory/<name>``. A folder saved to before is
        replaced as a whole; a folder holding anything else is refused."""
        names = list(self.adapter_names) if adapter_names is None else list(adapter_names)
        self._check_names(names)
        with adapter_folder(save_directory) as tmp:
            for name in names:
                self._write(tmp if name == DEFAULT_ADAPTER else tmp / name, name)

    def _write(self, folder: Path, name: str) -> None:
        write_adapter(folder, {"method": self.method, **self.adapter_config(name)}, self.adapter_state(name))

    def _read(self, folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        data = read_adapter_config(folder, self.title)
        method = data.get("method", "lora" if data.get("peft_type") == "LORA" else None)
        if method != self.method:
            raise AdapterMismatchError(f"{folder / CONFIG_NAME} is a {method!r} adapter, not {self.method!r}: load it "
                                       "with hificl.adapters.load_adapter_model, or pass another folder.")
        return data, read_adapter_weights(folder)

    def load_adapter(self, model_dir: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER,
                     is_trainable: bool = False) -> None:
        """Load a saved adapter under `adapter_name` (it becomes active if it is the only one)."""
        folder = Path(model_dir)
        config, tensors = self._read(folder)
        self._add_saved(adapter_name, config, folder)
        try:
            self._load_state(adapter_name, tensors, folder / WEIGHTS_NAME)
        except BaseException:
            self.delete_adapter(adapter_name)
            raise
        self._set_trainable(adapter_name, is_trainable and adapter_name == self.active_adapter)

    def restore_weights(self, model_dir: str | os.PathLike, adapter_name: str | None = None) -> None:
        """Replace the weights of adapter `adapter_name` (default: the active one) by those saved in `model_dir`,
        which must hold an adapter of the same settings (e.g. a checkpoint of this training run)."""
        folder = Path(model_dir)
        name = adapter_name or self.active_adapter
        config, tensors = self._read(folder)
        mine = json.loads(json.dumps({"method": self.method, **self.adapter_config(name)}))
        theirs = {k: v for k, v in config.items() if k != "format_version"}
        if self.method != "lora" and theirs != mine:
            changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise AdapterMismatchError(f"{folder} holds an adapter with other settings ({changed}) than adapter "
                                       f"{name!r}; load it with load_adapter instead.")
        self._load_state(name, tensors, folder / WEIGHTS_NAME)

    def _load_state(self, name: str, tensors: dict[str, torch.Tensor], path: Path) -> None:
        expected = self.adapter_state(name)
        check_tensors(path, tensors, expected)
        with torch.no_grad():
            for key, value in expected.items():
                value.copy_(tensors[key])

    def _set_trainable(self, name: str, trainable: bool) -> None:
        for tensor in self.adapter_state(name).values():
            tensor.requires_grad_(trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} holds a single adapter and cannot delete it; "
                                  "use unload() to restore the base model.")

    @classmethod
    def from_pretrained(cls, base_model: PreTrainedModel, model_dir: str | os.PathLike,
                        adapter_name: str = DEFAULT_ADAPTER, is_trainable: bool = False) -> "AdapterModel":
        """Load a saved adapter onto `base_model` (a frozen adapter unless `is_trainable`)."""
        data = read_adapter_config(model_dir, cls.title)  # fail on a missing or malformed folder first
        model = cls._empty(base_model, data)
        try:
            model.load_adapter(model_dir, adapter_name, is_trainable=is_trainable)
        except BaseException:
            model.unload()  # leave the caller's base model as it was
            raise
        return model

    @classmethod
    def _empty(cls, base_model: PreTrainedModel, config: dict[str, Any]) -> "AdapterModel":
        """An adapter model on `base_model` ready to load the saved adapter whose config is `config`."""
        raise NotImplementedError


def settings_from_saved(cls: type, data: dict[str, Any], error: type[Exception] = AdapterMismatchError) -> Any:
    """An adapter settings dataclass `cls` from a saved adapter_config.json (its own fields only; unknown fields
    are an error)."""
    fields = {k: v for k, v in data.items() if k not in ("method", "base_model", "format_version")}
    known_fields(fields, (f.name for f in dataclasses.fields(cls) if f.init), cls.__name__, error=error)
    return cls(**fields)


ADAPTERS: Registry[type[AdapterModel]] = Registry("adapter method")


def register_adapter(cls: type[AdapterModel]) -> type[AdapterModel]:
    """Class decorator: make `load_adapter_model` load saved adapters of ``cls.method``."""
    ADAPTERS.register(cls.method, cls)
    return cls


def saved_method(model_dir: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """The method of a saved adapter folder and its config (as saved)."""
    data = read_adapter_config(model_dir)
    method = data.get("method", "lora" if data.get("peft_type") == "LORA" else None)
    if method not in ADAPTERS:
        raise AdapterMismatchError(f"{Path(model_dir) / CONFIG_NAME} names no known adapter method ({method!r}); "
                                   f"known: {ADAPTERS.names()}.")
    return method, data


def load_adapter_model(base_model: PreTrainedModel, model_dir: str | os.PathLike,
                       is_trainable: bool = False) -> AdapterModel:
    """Load any saved adapter onto `base_model`, as the adapter model of the method its config names."""
    method, _ = saved_method(model_dir)
    return ADAPTERS.get(method).from_pretrained(base_model, model_dir, is_trainable=is_trainable)


# ------------------------------------------------------------------------------------------------ shifts
class ShiftModel(AdapterModel):
    """A frozen base model and one adapter of small trainable "shift" parameters (`shifts`) that a subclass hooks
    into it: the base of LIVE and MimIC. The adapter is named "default"; `row_mask(batch, device)` tells a hook
    which rows of the current batch it applies to."""

    config_class: ClassVar[type]

    def __init__(self, base_model: PreTrainedModel, config: Any):
        super().__init__(base_model)
        self.config = config
        self.shape: ModelShape | None = None
        self.shifts: nn.Module | None = None

    @property
    def adapter_names(self) -> list[str]:
        return [DEFAULT_ADAPTER] if self.shifts is not None else []

    @property
    def active_adapter(self) -> str | None:
        return DEFAULT_ADAPTER if self.shifts is not None else None

    @property
    def peft_config(self) -> dict[str, Any]:
        return {DEFAULT_ADAPTER: self.config}

    def row_mask(self, batch_size: int, device: torch.device) -> bool | torch.Tensor:
        """False: leave every row alone; True: shift every row; a boolean ``[batch]`` tensor: shift those rows."""
        rows = self._rows_for(batch_size)
        if rows is None:
            return False
        if isinstance(rows, str):
            return True
        return torch.tensor([name is not None for name in rows], device=device)

    def adapter_config(self, name: str) -> dict[str, Any]:
        return {**asdict(self.config), "base_model": asdict(self.shape)}

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        self._check_names([name])
        return dict(self.shifts.named_parameters())

    def delete_adapter(self, adapter_name: str) -> None:
        raise ValueError(f"A {self.title} model holds exactly one adapter; unload() it instead.")

    def _add_saved(self, name: str, config: dict[str, Any], folder: Path) -> None:
        if name != DEFAULT_ADAPTER:
            raise ValueError(f"A {self.title} model holds one adapter, named {DEFAULT_ADAPTER!r}.")
        self.shape.check(config.get("base_model"), folder / CONFIG_NAME)

    def load_adapter(self, model_dir, adapter_name: str = DEFAULT_ADAPTER, is_trainable: bool = False) -> None:
        """Load saved shifts (and their settings) into this model, replacing its own."""
        folder = Path(model_dir)
        config, tensors = self._read(folder)
        self._add_saved(adapter_name, config, folder)
        self._load_state(adapter_name, tensors, folder / WEIGHTS_NAME)
        self.config = settings_from_saved(self.config_class, config)
        self._set_trainable(adapter_name, is_trainable)
