"""Training checkpoints: one folder per checkpoint -- the trainable weights, the optimiser's state by parameter name,
the schedule, where training stands and the record so far, and the run's fingerprint -- written by the main
process through one atomic folder swap; listed oldest first, checked against the current run before it is
resumed (a mismatch names what changed), loaded, and discarded (``--restart``)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .distributed import load_optimizer_state, set_whole_
from .io import atomic_folder, remove_folder

logger = logging.getLogger(__name__)
EPOCH_PREFIX = "epoch-"
ARTIFACT = "artifact"  # the method's own files in an epoch's checkpoint (its adapter)
STEP_PREFIX = "step-"
STATE_FILE = "trainer_state.json"


class ResumeMismatchError(ValueError):
    """A checkpoint in the output folder was written by a run with other settings."""


class DamagedCheckpointError(ValueError):
    """A checkpoint's files cannot be read (truncated, overwritten, edited by hand)."""


_DAMAGE = (OSError, ValueError, KeyError, TypeError, SafetensorError)


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON state; a damaged one raises `DamagedCheckpointError` naming the file."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        state["result"]["steps"]
        return state
    except _DAMAGE as error:
        raise DamagedCheckpointError(f"{path / STATE_FILE} is damaged ({error})") from None


@dataclass
class Position:
    """Where training stands: the next epoch and optimiser step within it, and that epoch's partial record."""

    epoch: int = 1
    step_in_epoch: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def write_checkpoint(folder: Path, weights: dict[str, torch.Tensor], names: list[str], optimizer: dict[str, Any],
                     scheduler: dict[str, Any], state: dict[str, Any], artifact: Callable[[Path], None] | None = None
                     ) -> None:
    """Write a checkpoint folder in one swap: the whole trainable `weights` by name, the optimiser's state dict
    (whole tensors) keyed by the parameter names in its order (`names`), the scheduler's state and `state` (JSON),
    and ``artifact(folder / ARTIFACT)``. The layout names no engine, so any engine resumes it."""
    with atomic_folder(folder) as tmp:
        save_file({n: w.detach().cpu().contiguous() for n, w in weights.items()}, str(tmp / "trainable.safetensors"))
        tensors, scalars = {}, {}
        for index, slots in optimizer["state"].items():
            for key, value in slots.items():
                if torch.is_tensor(value):
                    tensors[f"{names[index]}::{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{names[index]}::{key}"] = value
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer["param_groups"]]
        (tmp / STATE_FILE).write_text(json.dumps({**state, "param_groups": groups, "optimizer_scalars": scalars,
                                                  "scheduler": scheduler}, indent=2))
        if artifact is not None:
            artifact(tmp / ARTIFACT)


def _checkpoint_folders(folder: Path) -> list[tuple[str, Path]]:
    """The checkpoint folders in `folder` (named ``epoch-<n>`` or ``step-<n>``, finished by their swap), with their
    prefix."""
    found = []
    for path in folder.glob("*-*"):
        prefix = next((p for p in (EPOCH_PREFIX, STEP_PREFIX) if path.name.startswith(p)), None)
        if prefix and path.name[len(prefix):].isdigit() and (path / STATE_FILE).is_file():
            found.append((prefix, path))
    return found


def damaged_checkpoints(folder: Path) -> list[DamagedCheckpointError]:
    """The errors of the checkpoints in `folder` whose state cannot be read, by folder name."""
    errors = []
    for _, path in sorted(_checkpoint_folders(folder), key=lambda found: found[1].name):
        try:
            read_state(path)
        except DamagedCheckpointError as error:
            errors.append(error)
    return errors


def epoch_weights(folder: Path, epoch: int) -> dict[str, torch.Tensor]:
    """The whole trainable weights saved at the end of `epoch` in `folder`, by parameter name."""
    return _read_tensors(folder / f"{EPOCH_PREFIX}{epoch}" / "trainable.safetensors")


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """The readable checkpoints in `folder`, as (optimiser steps done, path), oldest first (at equal steps an
    epoch's checkpoint after a mid-epoch one). One whose state cannot be read is left out, with a warning naming
    it."""
    found = []
    for prefix, path in _checkpoint_folders(folder):
        try:
            found.append((read_state(path)["result"]["steps"], prefix == EPOCH_PREFIX, path))
        except DamagedCheckpointError as error:
            logger.warning("%s: it is skipped (an earlier checkpoint is used, if any).", error)
    return [(steps, path) for steps, _, path in sorted(found)]


def _leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {dotted key: leaf value}."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def check_resumable(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise `ResumeMismatchError` naming every setting of `current` that the checkpoint's state `saved` differs in."""
    current = json.loads(json.dumps(current))
    before, now = _leaves({k: saved.get(k) for k in current}), _leaves(current)
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        details = "; ".join(f"{c}: {before.get(c)!r} -> {now.get(c)!r}" for c in changed[:6])
        raise ResumeMismatchError(
            f"Cannot resume from {path}: the run's settings changed since it was written ({details}). Use another "
            "output folder (--output-dir), or --restart to discard the checkpoints in this one and train from "
            "scratch.")


def read_checkpoint(path: Path, params: dict[str, torch.nn.Parameter], names: list[str], optimizer,
                    scheduler) -> dict[str, Any]:
    """Restore `params`, the optimiser and the scheduler from a checkpoint; returns its JSON state. Files that
    cannot be read raise `DamagedCheckpointError` naming them (`params` may then be partly restored: the caller
    restores another checkpoint or stops)."""
    state = read_state(path)
    weights, tensors = (_read_tensors(path / name) for name in ("trainable.safetensors", "optimizer.safetensors"))
    if set(weights) != set(params):
        raise ResumeMismatchError(f"Cannot resume from {path}: it holds other trainable parameters than this "
                                  "model. Use another output folder, or --restart.")
    for name, param in params.items():
        set_whole_(param, weights[name])
    saved: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(state["optimizer_scalars"].items()):
        name, slot = key.split("::")
        saved.setdefault(names.index(name), {})[slot] = value
    load_optimizer_state(optimizer, [params[name] for name in names], {"state": saved,
                                                                      "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    return state


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except _DAMAGE as error:
        raise DamagedCheckpointError(f"{file} is damaged ({error})") from None


def discard_checkpoints(folder: Path) -> None:
    """Remove the checkpoints in `folder` (damaged ones too), each in one rename."""
    for _, path in _checkpoint_folders(folder):
        remove_folder(path)


__all__ = ["ARTIFACT", "DamagedCheckpointError", "damaged_checkpoints", "epoch_weights", "EPOCH_PREFIX", "STEP_PREFIX", "Position", "ResumeMismatchError", "check_resumable", "discard_checkpoints",
           "list_checkpoints", "read_checkpoint", "write_checkpoint"]
