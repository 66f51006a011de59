"""A trainer that knows nothing of methods or tasks: it trains whatever parameters of a module require gradients,
on batches made by a `collate` function, with a loss given by a function.

AdamW, cosine schedule with linear warmup, gradient clipping, gradient accumulation, a seeded data order, a
validation callback and an atomic checkpoint after every epoch. Training resumes exactly from the last complete
checkpoint: the trainable weights, optimiser, schedule, RNG states and data order are all restored, so an
interrupted run ends with the same weights as an uninterrupted one. Devices and mixed precision go through
accelerate.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .io import atomic_folder, atomic_write_json

CHECKPOINT_PREFIX = "epoch-"


@dataclass
class TrainConfig:
    """Training settings (defaults: the paper's recipe).

    Attributes:
        epochs: passes over the training examples.
        batch_size: examples per micro-batch; grad_accum: micro-batches per optimiser step.
        lr, weight_decay: AdamW's; warmup_ratio: share of the steps with a linear warm-up, then cosine decay to 0.
        max_grad_norm: gradient clipping (0 disables it).
        seed: seeds the data order and torch's RNG.
        mixed_precision: "no", "bf16" or "fp16" (accelerate's autocast; trainable weights stay float32).
        select_metric: the validation metric that picks the best epoch (higher is better).
    """

    epochs: int = 3
    batch_size: int = 2
    grad_accum: int = 2
    lr: float = 5e-3
    weight_decay: float = 1e-3
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 3407
    mixed_precision: str = "no"
    select_metric: str = "accuracy"

    def __post_init__(self):
        for name in ("epochs", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"train.{name} must be a positive int, got {value!r}.")
        for name in ("lr", "weight_decay", "warmup_ratio", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"train.{name} must be a finite number >= 0, got {value!r}.")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr!r}.")
        if self.warmup_ratio >= 1:
            raise ValueError(f"train.warmup_ratio must be below 1, got {self.warmup_ratio!r}.")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"train.mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"train.seed must be an int, got {self.seed!r}.")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown train setting(s) {unknown}; known: {sorted(known)}.")
        return cls(**data)


@dataclass
class TrainResult:
    """What a training run did: per-epoch history, the selected epoch and the cost."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    last_epoch: int = 0
    steps: int = 0
    seconds: float = 0.0
    seconds_per_step: float = 0.0
    peak_memory_mb: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _accelerator(mixed_precision: str) -> Accelerator:
    """An Accelerator with this precision. accelerate keeps one process-wide state; a single-process run that
    asks for another precision than an earlier trainer (e.g. a comparison in one Python session) resets it."""
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, mixed_precision) and AcceleratorState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("The model has no trainable parameters: nothing to train.")
    return params


def _reset_peak_memory(device: torch.device) -> bool:
    """Start a fresh peak: CUDA's allocator statistics, or on Linux the process's resident-memory high-water
    mark (so methods trained one after another in one process each get their own peak). False where the OS
    does not allow it (the CPU peak then covers the whole process)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated tensor memory. CPU: peak resident memory of the process (model included) since the
    last `_reset_peak_memory` where the OS allows a reset, else since the process started."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError):  # no /proc (not Linux): the resource module's peak below
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # KiB
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    except ImportError:  # pragma: no cover - non-Unix
        return 0.0


class Trainer:
    """Train the parameters of `model` that require gradients.

    Args:
        model: the module (its frozen parameters are left alone).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        examples: the training items; `collate(list_of_items) -> batch dict` makes model inputs.
        config: a `TrainConfig`.
        output_dir: where the per-epoch checkpoints go (``epoch-<n>/``).
        validate: optional ``validate() -> dict of metrics``, called after every epoch.
        save_artifact: optional ``save_artifact(folder)`` writing the method's own files into each checkpoint
            (e.g. the adapter), so any epoch can be evaluated later.
        param_groups: optional ``[{"params": [parameter names], "lr": ...}]`` for parameters with their own
            learning rate; the other trainable parameters use ``config.lr``.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict], torch.Tensor],
                 examples: Sequence[Any], collate: Callable[[list], dict], config: TrainConfig,
                 output_dir: str | os.PathLike, validate: Callable[[], dict] | None = None,
                 save_artifact: Callable[[Path], None] | None = None,
                 param_groups: list[dict[str, Any]] | None = None, progress: bool = True):
        if not examples:
            raise ValueError("No training examples.")
        self.model, self.loss_fn, self.examples, self.collate = model, loss_fn, list(examples), collate
        self.config, self.output_dir = config, Path(output_dir)
        self.validate, self.save_artifact, self.progress = validate, save_artifact, progress
        self.accelerator = _accelerator(config.mixed_precision)
        self.params = _trainable(model)
        self.optimizer = torch.optim.AdamW(self._groups(param_groups), lr=config.lr, weight_decay=config.weight_decay)
        self.batches_per_epoch = math.ceil(len(self.examples) / config.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / config.grad_accum)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.warmup_steps = int(config.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: _lr_factor(step, self.total_steps, self.warmup_steps))
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)

    def _groups(self, param_groups: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        """Optimiser groups in a fixed order (checkpoints map optimiser state by parameter name)."""
        groups, claimed = [], set()
        for group in param_groups or []:
            unknown = sorted(set(group["params"]) - set(self.params))
            if unknown:
                raise ValueError(f"param_groups name parameters that are not trainable: {unknown[:3]}.")
            groups.append({**group, "params": [self.params[n] for n in group["params"]]})
            claimed |= set(group["params"])
        rest = [p for n, p in self.params.items() if n not in claimed]
        if rest:
            groups.append({"params": rest})
        self._ordered_names = [n for g in (param_groups or []) for n in g["params"]] + [
            n for n in self.params if n not in claimed]
        return groups

    # ---------------------------------------------------------------------------------------- checkpoints
    def _epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.config.seed * 1000 + epoch)
        return torch.randperm(len(self.examples), generator=generator).tolist()

    def _save_checkpoint(self, epoch: int, result: TrainResult) -> None:
        """Write ``epoch-<n>/`` through a temporary folder renamed into place: a crash leaves no half checkpoint."""
        with atomic_folder(self.output_dir / f"{CHECKPOINT_PREFIX}{epoch}") as tmp:
            weights = {name: p.detach().cpu().contiguous() for name, p in self.params.items()}
            save_file(weights, str(tmp / "trainable.safetensors"))
            state = self.optimizer.state_dict()
            names = self._ordered_names
            optimizer_tensors, optimizer_scalars = {}, {}
            for index, slots in state["state"].items():
                for key, value in slots.items():
                    if torch.is_tensor(value):
                        optimizer_tensors[f"{names[index]}::{key}"] = value.detach().cpu().contiguous()
                    else:
                        optimizer_scalars[f"{names[index]}::{key}"] = value
            save_file(optimizer_tensors, str(tmp / "optimizer.safetensors"))
            save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
            (tmp / "trainer_state.json").write_text(json.dumps({
                "epoch": epoch, "config": asdict(self.config), "result": result.to_dict(),
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]],
                "optimizer_scalars": optimizer_scalars, "scheduler": self.scheduler.state_dict(),
                "python_rng": _python_rng_to_json(random.getstate()),
            }, indent=2))
            if self.save_artifact is not None:
                self.save_artifact(tmp / "artifact")

    def latest_checkpoint(self) -> Path | None:
        epochs = []
        for path in self.output_dir.glob(f"{CHECKPOINT_PREFIX}*"):
            suffix = path.name[len(CHECKPOINT_PREFIX):]
            if suffix.isdigit() and (path / "trainer_state.json").is_file():
                epochs.append((int(suffix), path))
        return max(epochs)[1] if epochs else None

    def _load_checkpoint(self, path: Path) -> TrainResult:
        state = json.loads((path / "trainer_state.json").read_text())
        saved = {k: v for k, v in state["config"].items() if k != "select_metric"}
        current = {k: v for k, v in asdict(self.config).items() if k != "select_metric"}
        if saved != current:
            changed = sorted(k for k in current if saved.get(k) != current[k])
            raise ValueError(f"Cannot resume from {path}: the training settings changed ({changed}). Use the same "
                             "settings, or another output folder to start over.")
        weights = load_file(str(path / "trainable.safetensors"))
        if set(weights) != set(self.params):
            raise ValueError(f"Cannot resume from {path}: it holds other trainable parameters than this model.")
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(weights[name])
        tensors = load_file(str(path / "optimizer.safetensors"))
        names = self._ordered_names
        optimizer_state: dict[int, dict[str, Any]] = {}
        for key, value in list(tensors.items()) + list(state["optimizer_scalars"].items()):
            name, slot = key.split("::")
            optimizer_state.setdefault(names.index(name), {})[slot] = value
        current = self.optimizer.state_dict()["param_groups"]
        if len(current) != len(state["param_groups"]):
            raise ValueError(f"Cannot resume from {path}: it has other optimiser groups than this method.")
        groups = [dict(saved, params=now["params"]) for saved, now in zip(state["param_groups"], current)]
        self.optimizer.load_state_dict({"state": optimizer_state, "param_groups": groups})
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch"])
        random.setstate(_python_rng_from_json(state["python_rng"]))
        return TrainResult(**state["result"])

    # ------------------------------------------------------------------------------------------- training
    def train(self, resume: bool = True) -> TrainResult:
        """Run (or finish) training; with `resume`, continue from the last complete epoch checkpoint."""
        torch.manual_seed(self.config.seed)
        random.seed(self.config.seed)
        result, start_epoch = TrainResult(), 1
        checkpoint = self.latest_checkpoint() if resume else None
        if checkpoint is not None:
            result = self._load_checkpoint(checkpoint)
            start_epoch = result.last_epoch + 1
            print(f"hificl: resuming after epoch {result.last_epoch} from {checkpoint}", flush=True)
        device = self.accelerator.device
        _reset_peak_memory(device)
        bar = tqdm(total=self.total_steps, initial=result.steps, desc="train", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        self.model.train()
        for epoch in range(start_epoch, self.config.epochs + 1):
            started, losses = time.perf_counter(), []
            order = self._epoch_order(epoch)
            for first in range(0, self.batches_per_epoch, self.config.grad_accum):
                micro = range(first, min(first + self.config.grad_accum, self.batches_per_epoch))
                sizes = [len(order[b * self.config.batch_size:(b + 1) * self.config.batch_size]) for b in micro]
                step_loss = 0.0
                for b, size in zip(micro, sizes):
                    items = [self.examples[i] for i in order[b * self.config.batch_size:(b + 1) * self.config.batch_size]]
                    batch = _to_device(self.collate(items), device)
                    with self.accelerator.autocast():
                        loss = self.loss_fn(self.model, batch)
                    # weight micro-batches by size so an accumulated step averages over its examples
                    self.accelerator.backward(loss * size / sum(sizes))
                    step_loss += loss.item() * size / sum(sizes)
                if self.config.max_grad_norm > 0:
                    self.accelerator.clip_grad_norm_(list(self.params.values()), self.config.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                result.steps += 1
                losses.append(step_loss)
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{step_loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            record: dict[str, Any] = {"epoch": epoch, "train_loss": sum(losses) / len(losses),
                                      "seconds": time.perf_counter() - started}
            result.seconds += record["seconds"]
            if self.validate is not None:
                self.model.eval()
                record.update({f"val_{k}": v for k, v in self.validate().items()})
                self.model.train()
                key = f"val_{self.config.select_metric}"
                if key in record:
                    best = max((h for h in result.history + [record] if key in h), key=lambda h: h[key])
                    result.best_epoch = best["epoch"]
            result.history.append(record)
            result.last_epoch = epoch
            result.seconds_per_step = result.seconds / max(1, result.steps)
            result.peak_memory_mb = max(result.peak_memory_mb, _peak_memory_mb(device))
            bar.write(_epoch_line(record))
            self._save_checkpoint(epoch, result)
        bar.close()
        self.model.eval()
        atomic_write_json(self.output_dir / "train_result.json", result.to_dict())
        return result

    def checkpoint(self, epoch: int) -> Path:
        return self.output_dir / f"{CHECKPOINT_PREFIX}{epoch}"


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch.to(device) if torch.is_tensor(batch) else batch


def _epoch_line(record: dict[str, Any]) -> str:
    parts = [f"epoch {record['epoch']}", f"train loss {record['train_loss']:.4f}", f"{record['seconds']:.0f}s"]
    parts += [f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val_") and isinstance(v, float)]
    return " | ".join(parts)


def _python_rng_to_json(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng_from_json(data) -> tuple:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)
