"""A trainer that knows nothing of methods or tasks: it trains whatever parameters of a module require gradients,
on the batches and with the loss of an objective (``objective.batch(items)``, ``objective.loss(model, batch)``).

AdamW, cosine schedule with linear warmup, gradient clipping, gradient accumulation, a seeded data order, a
validation callback that picks the best epoch by a named metric, and an atomic checkpoint after every epoch.
Training resumes exactly from the last complete checkpoint: the trainable weights, optimiser, schedule, RNG
state and data order are all restored, so an interrupted run ends with the same weights as an uninterrupted one.
The process-global random generators are forked for the run (dropout draws from them), so training leaves the
caller's random state untouched. Devices, mixed precision and trackers (TensorBoard, Weights & Biases, ...) go
through accelerate.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import LoggerType, send_to_device
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .core.validate import choice, integer, known_fields, number
from .io import atomic_folder, atomic_write_json

logger = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "epoch-"
TRACKERS = tuple(t.value for t in LoggerType)


class Objective(Protocol):
    def batch(self, items: list) -> Any: ...

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor: ...


@dataclass
class TrainConfig:
    """Training settings (defaults: the paper's recipe).

    Attributes:
        epochs: passes over the training examples.
        batch_size: examples per micro-batch; grad_accum: micro-batches per optimiser step.
        lr, weight_decay: AdamW's; warmup_ratio: share of the steps with a linear warm-up, then cosine decay to 0.
        max_grad_norm: gradient clipping (0 disables it).
        mixed_precision: "no", "bf16" or "fp16" (accelerate's autocast; trainable weights stay float32).
        select_metric: the validation metric that picks the best epoch (null: the task's own metric); its
            direction (higher or lower is better) comes from the metric registry.
        log_with: accelerate trackers that also receive the training metrics ("tensorboard", "wandb", ...; their
            files go under the run's output folder).
    """

    epochs: int = 3
    batch_size: int = 2
    grad_accum: int = 2
    lr: float = 5e-3
    weight_decay: float = 1e-3
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    select_metric: str | None = None
    log_with: list[str] = field(default_factory=list)

    def __post_init__(self):
        for name in ("epochs", "batch_size", "grad_accum"):
            integer(getattr(self, name), f"train.{name}")
        for name in ("weight_decay", "max_grad_norm"):
            number(getattr(self, name), f"train.{name}")
        number(self.lr, "train.lr", positive=True)
        number(self.warmup_ratio, "train.warmup_ratio", below=1)
        choice(self.mixed_precision, "train.mixed_precision", ("no", "bf16", "fp16"))
        if self.select_metric is not None and not isinstance(self.select_metric, str):
            raise ValueError(f"train.select_metric must be a metric name or null, got {self.select_metric!r}.")
        if isinstance(self.log_with, str):
            self.log_with = [self.log_with]
        if not isinstance(self.log_with, list):
            raise ValueError(f"train.log_with must be a list of tracker names, got {self.log_with!r}.")
        for tracker in self.log_with:
            choice(tracker, "train.log_with entries", TRACKERS)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known_fields(data, cls.__dataclass_fields__, "train setting")
        return cls(**data)

    def optimisation(self) -> dict[str, Any]:
        """The settings that change what training computes (not how it is logged or which epoch is chosen)."""
        return {k: v for k, v in asdict(self).items() if k not in ("select_metric", "log_with")}


@dataclass(frozen=True)
class Selection:
    """How the best epoch is chosen: by `metric` of the validation results, higher or lower being better."""

    metric: str
    higher_is_better: bool = True

    def best(self, history: list[dict[str, Any]]) -> int | None:
        key = f"val_{self.metric}"
        scored = [h for h in history if key in h]
        if not scored:
            return None
        pick = max if self.higher_is_better else min
        return pick(scored, key=lambda h: h[key])["epoch"]


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


def _accelerator(mixed_precision: str, log_with: list[str], project_dir: Path) -> Accelerator:
    """An Accelerator with this precision. accelerate keeps one process-wide state; a single-process run that
    asks for another precision than an earlier trainer (e.g. a comparison in one Python session) resets it."""
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, mixed_precision) and AcceleratorState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(),
                       log_with=list(log_with) or None, project_dir=str(project_dir))


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """The learning-rate factor of optimiser step `step` (from 0) of `total`: linear warm-up over `warmup` steps,
    then cosine decay to 0."""
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
        objective: builds batches from training items (``objective.batch``) and the loss (``objective.loss``).
        examples: the training items.
        config: a `TrainConfig`.
        output_dir: where the per-epoch checkpoints go (``epoch-<n>/``).
        seed: the order of the examples in each epoch, and the random state during training (dropout).
        validate: optional ``validate() -> dict of metrics``, called after every epoch.
        selection: which validation metric picks the best epoch (needed with `validate`).
        save_artifact: optional ``save_artifact(folder)`` writing the method's own files into each checkpoint
            (e.g. the adapter), so any epoch can be evaluated later.
        param_groups: optional ``[{"params": [parameter names], "lr": ..., "weight_decay": ...}]`` for parameters
            with their own settings; the other trainable parameters use the config's.
    """

    def __init__(self, model: nn.Module, objective: Objective, examples: Sequence[Any], config: TrainConfig,
                 output_dir: str | os.PathLike, seed: int, validate: Callable[[], dict] | None = None,
                 selection: Selection | None = None, save_artifact: Callable[[Path], None] | None = None,
                 param_groups: list[dict[str, Any]] | None = None, progress: bool = True):
        if not examples:
            raise ValueError("No training examples.")
        if validate is not None and selection is None:
            raise ValueError("A validation callback needs a `selection` saying which metric picks the epoch.")
        self.model, self.objective, self.examples = model, objective, list(examples)
        self.config, self.output_dir, self.seed = config, Path(output_dir), seed
        self.validate, self.selection = validate, selection
        self.save_artifact, self.progress = save_artifact, progress
        self.accelerator = _accelerator(config.mixed_precision, config.log_with, self.output_dir)
        self.params = _trainable(model)
        self.optimizer = torch.optim.AdamW(self._groups(param_groups), lr=config.lr, weight_decay=config.weight_decay)
        self.batches_per_epoch = math.ceil(len(self.examples) / config.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / config.grad_accum)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.warmup_steps = int(config.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: cosine_with_warmup(step, self.total_steps, self.warmup_steps))
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
        generator = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        return torch.randperm(len(self.examples), generator=generator).tolist()

    def _state(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: the training settings and the seed."""
        return {"config": self.config.optimisation(), "seed": self.seed}

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
                "epoch": epoch, **self._state(), "result": result.to_dict(),
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]],
                "optimizer_scalars": optimizer_scalars, "scheduler": self.scheduler.state_dict(),
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
        saved, current = {**state.get("config", {}), "seed": state.get("seed")}, {**self.config.optimisation(), "seed": self.seed}
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
        current_groups = self.optimizer.state_dict()["param_groups"]
        if len(current_groups) != len(state["param_groups"]):
            raise ValueError(f"Cannot resume from {path}: it has other optimiser groups than this method.")
        groups = [dict(saved, params=now["params"]) for saved, now in zip(state["param_groups"], current_groups)]
        self.optimizer.load_state_dict({"state": optimizer_state, "param_groups": groups})
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch"])
        return TrainResult(**state["result"])

    # ------------------------------------------------------------------------------------------- training
    def train(self, resume: bool = True) -> TrainResult:
        """Run (or finish) training; with `resume`, continue from the last complete epoch checkpoint."""
        device = self.accelerator.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            return self._train(resume, device)

    def _train(self, resume: bool, device: torch.device) -> TrainResult:
        result, start_epoch = TrainResult(), 1
        checkpoint = self.latest_checkpoint() if resume else None
        if checkpoint is not None:
            result = self._load_checkpoint(checkpoint)
            start_epoch = result.last_epoch + 1
            logger.info("resuming after epoch %d from %s", result.last_epoch, checkpoint)
        if self.config.log_with:
            self.accelerator.init_trackers("hificl", config=self.config.optimisation())
        _reset_peak_memory(device)
        bar = tqdm(total=self.total_steps, initial=result.steps, desc="train", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        self.model.train()
        for epoch in range(start_epoch, self.config.epochs + 1):
            started, losses = time.perf_counter(), []
            order = self._epoch_order(epoch)
            for first in range(0, self.batches_per_epoch, self.config.grad_accum):
                micro = range(first, min(first + self.config.grad_accum, self.batches_per_epoch))
                chunks = [order[b * self.config.batch_size:(b + 1) * self.config.batch_size] for b in micro]
                total = sum(len(chunk) for chunk in chunks)
                step_loss = 0.0
                for chunk in chunks:
                    batch = send_to_device(self.objective.batch([self.examples[i] for i in chunk]), device)
                    with self.accelerator.autocast():
                        loss = self.objective.loss(self.model, batch)
                    # weight micro-batches by size so an accumulated step averages over its examples
                    self.accelerator.backward(loss * len(chunk) / total)
                    step_loss += loss.item() * len(chunk) / total
                if self.config.max_grad_norm > 0:
                    self.accelerator.clip_grad_norm_(list(self.params.values()), self.config.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                result.steps += 1
                losses.append(step_loss)
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{step_loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                if self.config.log_with:
                    self.accelerator.log({"train/loss": step_loss, "train/lr": self.scheduler.get_last_lr()[0]},
                                         step=result.steps)
            record: dict[str, Any] = {"epoch": epoch, "train_loss": sum(losses) / len(losses),
                                      "seconds": time.perf_counter() - started}
            result.seconds += record["seconds"]
            if self.validate is not None:
                self.model.eval()
                record.update({f"val_{k}": v for k, v in self.validate().items()})
                self.model.train()
                if f"val_{self.selection.metric}" not in record:
                    raise ValueError(f"Validation reported no {self.selection.metric!r} (it reported "
                                     f"{sorted(k[4:] for k in record if k.startswith('val_'))}), so no epoch can be "
                                     "chosen by it; set train.select_metric to one of those.")
            result.history.append(record)
            if self.validate is not None:
                result.best_epoch = self.selection.best(result.history)
            result.last_epoch = epoch
            result.seconds_per_step = result.seconds / max(1, result.steps)
            result.peak_memory_mb = max(result.peak_memory_mb, _peak_memory_mb(device))
            logger.info(_epoch_line(record))
            if self.config.log_with:
                self.accelerator.log({k.replace("val_", "val/"): v for k, v in record.items()
                                      if k.startswith("val_") and isinstance(v, (int, float))}, step=result.steps)
            self._save_checkpoint(epoch, result)
        bar.close()
        if self.config.log_with:
            self.accelerator.end_training()
        self.model.eval()
        atomic_write_json(self.output_dir / "train_result.json", result.to_dict())
        return result

    def checkpoint(self, epoch: int) -> Path:
        return self.output_dir / f"{CHECKPOINT_PREFIX}{epoch}"


def _epoch_line(record: dict[str, Any]) -> str:
    parts = [f"epoch {record['epoch']}", f"train loss {record['train_loss']:.4f}", f"{record['seconds']:.0f}s"]
    parts += [f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val_") and isinstance(v, float)]
    return " | ".join(parts)
