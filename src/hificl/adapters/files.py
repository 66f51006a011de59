"""Adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's layout), written in one folder swap,
read with errors that name the file and the fix."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..core import AdapterMismatchError
from ..io import atomic_folder

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
DEFAULT_ADAPTER = "default"
FORMAT_VERSION = 1  # of hificl's own adapter_config.json (LIVE, MimIC); raise it when it changes meaning


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
    if "peft_type" not in data:  # hificl's own format (LIVE, MimIC; HiFICL before PEFT): PEFT's is versioned by PEFT
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
