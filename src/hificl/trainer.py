"""A trainer that knows nothing of methods or tasks: it trains whatever parameters of a module require gradients,
on the batches and with the loss of an objective (``objective.batch(items)``, ``objective.loss(model, batch)``).

AdamW, cosine schedule with linear warm-up, gradient clipping, gradient accumulation, a seeded data order, a
validation callback that picks the best epoch by a named metric, an atomic checkpoint after every epoch and, with
``checkpoint_every``, every N optimiser steps in between.

Several processes (``accelerate launch`` / ``torchrun``: DDP, one process per GPU, or gloo processes on a CPU).
An optimiser step is ``grad_accum`` micro-batches of ``batch_size`` examples, the same ones in the same order
whatever the number of processes: the micro-batches of a step are dealt out to the processes (halved where there
are fewer than processes, so any config runs on any number of them), each term of the loss is weighed by the
micro-batch's share of the step's elements (answer tokens, positions: `hificl.objectives`), so the step's loss is
the same mean however it is split, and the gradients are summed across processes. A process with no micro-batch
left in a step runs a copy of one with weight 0, so every process takes part in every gradient exchange. The main process alone
writes checkpoints and logs. Under FSDP2 and DeepSpeed ZeRO, which shard the weights or their optimiser state,
checkpoints are gathered whole (`hificl.distributed`) and DeepSpeed's engine clips and steps where a step ends.

Resuming continues from the most advanced complete checkpoint with exactly the remaining batches of its epoch,
on any number of processes: the trainable weights, optimiser, schedule and position are restored, and the random
state of every step is derived from (seed, step, process), so it needs no saving. A checkpoint records the run's
fingerprint (method, task, backbone, data, settings); resuming under another one is refused with what changed.
A non-finite loss stops training before anything is saved from that step on. A damaged checkpoint is named and the
one before it resumed. Ctrl-C or SIGTERM stops training after the current step, with a step checkpoint
(`StopRequests`), so a stopped run loses nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from accelerate.utils import DistributedType, gather_object, send_to_device
from torch import nn
from tqdm.auto import tqdm

from .checkpoints import (EPOCH_PREFIX, STEP_PREFIX, DamagedCheckpointError, Position, check_resumable,
                          damaged_checkpoints, discard_checkpoints, list_checkpoints, read_checkpoint, read_state,
                          write_checkpoint)
from .distributed import (accelerator_for, engine_name, is_sharded, micro_batch, optimizer_state, prepare_sharded,
                          whole, whole_parameters)
from . import zero
from .io import atomic_write_json, remove_folder
from .memory import peak_memory_mb, reset_peak_memory
from .settings import Selection, TrainConfig

logger = logging.getLogger(__name__)


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal: SIGINT (Ctrl-C) or SIGTERM (what a scheduler sends before it kills a job).
    `signum` is the signal; `checkpoint`, where training was, the step checkpoint written before stopping."""

    def __init__(self, signum: int, checkpoint: Path | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.checkpoint = signum, checkpoint


class StopRequests:
    """While training: the first SIGINT or SIGTERM asks the trainer to stop after the current optimiser step (it
    writes a step checkpoint first, so nothing is lost); a second one stops at once. Outside the main thread
    (where Python allows no handlers) signals keep their own behaviour."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        logger.warning("%s received: stopping after this step, with a checkpoint (send it again to stop at once).",
                       signal.Signals(signum).name)


class Objective(Protocol):
    def batch(self, items: list) -> Any: ...

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor: ...


@dataclass
class TrainResult:
    """What a training run did: per-epoch history, the selected epoch and the cost. `seconds_per_step` excludes
    the run's first step (a warm-up: kernel selection, first-call caches)."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    last_epoch: int = 0
    steps: int = 0
    seconds: float = 0.0
    seconds_per_step: float = 0.0
    timed_steps: int = 0
    timed_seconds: float = 0.0
    peak_memory_mb: float = 0.0
    processes: int = 1
    engine: str = "single process"  # or "DDP", "FSDP2", "DeepSpeed ZeRO-3": how the processes shared the model
    examples_per_process: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """The learning-rate factor of optimiser step `step` (from 0) of `total`: linear warm-up over `warmup` steps,
    then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def step_seed(seed: int, step: int, process: int) -> int:
    """The random seed of optimiser step `step` on process `process` (dropout draws), so a resumed run draws what
    an uninterrupted one would, without saving random states."""
    return (seed * 1_000_003 + step * 7_919 + process * 104_729) % (2**63)


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("The model has no trainable parameters: nothing to train.")
    return params


@dataclass(frozen=True)
class Validation:
    """Validation after every epoch: ``run() -> {metric: value}``, and the metric (with its direction) that picks
    the best epoch."""

    run: Callable[[], dict]
    selection: Selection


@dataclass(frozen=True)
class Checkpointing:
    """Where the checkpoints go (``epoch-<n>/``, and the latest ``step-<n>/``) and what they hold besides the
    trainer's state: ``save_artifact(folder)`` writes the method's own files into each epoch's checkpoint (its
    adapter, so any epoch can be evaluated later); `fingerprint` is what defines the run beyond the training
    settings (method, task, backbone, data): a checkpoint written under another one is never resumed."""

    folder: Path
    save_artifact: Callable[[Path], None] | None = None
    fingerprint: dict[str, Any] | None = None


class Trainer:
    """Train the parameters of `model` that require gradients.

    Args:
        model: the module (its frozen parameters are left alone).
        objective: builds batches from training items (``objective.batch``) and the loss (``objective.loss``);
            an objective with ``set_epoch(epoch)`` is told each epoch before its batches are built, and one with
            ``prepare(items, progress=...)`` is given every training item once before training (on every process;
            not when a resumed run has no step left).
        examples: the training items.
        config: a `TrainConfig`.
        seed: the order of the examples in each epoch, and the random state during training (dropout).
        checkpoints: where and what the checkpoints hold (`Checkpointing`, or just their folder).
        validation: optional `Validation` after every epoch, which picks the best epoch.
        param_groups: optional ``[{"params": [parameter names], "lr": ..., "weight_decay": ...}]`` for parameters
            with their own settings; the other trainable parameters use the config's.
        progress: a progress bar (steps, loss, ETA) on the main process.
    """

    def __init__(self, model: nn.Module, objective: Objective, examples: Sequence[Any], config: TrainConfig, seed: int,
                 checkpoints: Checkpointing | str | os.PathLike, validation: Validation | None = None,
                 param_groups: list[dict[str, Any]] | None = None, progress: bool = True):
        if not examples:
            raise ValueError("No training examples.")
        if not isinstance(checkpoints, Checkpointing):
            checkpoints = Checkpointing(Path(checkpoints))
        self.objective, self.examples = objective, list(examples)
        self.config, self.output_dir, self.seed = config, Path(checkpoints.folder), seed
        self.validation, self.progress = validation, progress
        self.save_artifact = checkpoints.save_artifact
        self.fingerprint = json.loads(json.dumps(checkpoints.fingerprint or {}, default=str))
        self.accelerator = accelerator_for(config.mixed_precision, config.log_with, self.output_dir)
        kind = self.accelerator.distributed_type
        if kind not in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU,
                        DistributedType.FSDP, DistributedType.DEEPSPEED) or engine_name(self.accelerator) == "FSDP1":
            configured = engine_name(self.accelerator) if kind == DistributedType.FSDP else kind.value
            raise ValueError(f"hificl trains on one process, or on several with DDP, FSDP2 or DeepSpeed ZeRO; this "
                             f"run is configured for {configured}. Launch it with DDP (`accelerate launch --multi_gpu "
                             "...`, `torchrun ...`), FSDP2 (fsdp_version: 2) or DeepSpeed (accelerate/zero3.yaml).")
        self.processes = self.accelerator.num_processes
        self.unwrapped = model
        self.params = _trainable(model)
        self.optimizer = torch.optim.AdamW(self._groups(param_groups), lr=config.lr, weight_decay=config.weight_decay)
        self.batches_per_epoch = math.ceil(len(self.examples) / config.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / config.grad_accum)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.warmup_steps = int(config.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: cosine_with_warmup(step, self.total_steps, self.warmup_steps))
        if kind == DistributedType.DEEPSPEED:  # the engine clips and steps where hificl's steps end
            zero.configure(self.accelerator.state.deepspeed_plugin, config.batch_size, self.processes,
                           config.max_grad_norm)
        self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        self.engine = engine_name(self.accelerator)
        if is_sharded(self.accelerator):  # sharded in place: FSDP2's parameters are now shards (DTensors)
            self.params = _trainable(model)
            prepare_sharded(model)  # validation and evaluation generate sharded

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

    # ---------------------------------------------------------------------------------------- the data
    def _epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        return torch.randperm(len(self.examples), generator=generator).tolist()

    def _epoch_steps(self, epoch: int) -> list[list[list[int]]]:
        """The epoch's optimiser steps, each a list of micro-batches (lists of example indices)."""
        order, size, accum = self._epoch_order(epoch), self.config.batch_size, self.config.grad_accum
        micro = [order[i:i + size] for i in range(0, len(order), size)]
        return [micro[i:i + accum] for i in range(0, len(micro), accum)]

    def _my_slots(self, step: list[list[int]]) -> list[tuple[list[int], bool]]:
        """This process's share of a step: (micro-batch, whether it counts) pairs, as many on every process. The
        step's micro-batches are dealt out in turn; where there are fewer than processes, the largest are halved
        until there are enough (or every one holds a single example), so any `grad_accum` runs on any number of
        processes. Missing slots repeat the step's first micro-batch without counting."""
        micro = [list(chunk) for chunk in step]
        while len(micro) < self.processes and max(len(chunk) for chunk in micro) > 1:
            largest = max(range(len(micro)), key=lambda j: len(micro[j]))
            chunk, half = micro[largest], (len(micro[largest]) + 1) // 2
            micro[largest:largest + 1] = [chunk[:half], chunk[half:]]
        rank, slots = self.accelerator.process_index, math.ceil(len(micro) / self.processes)
        mine = micro[rank::self.processes]
        return [(chunk, True) for chunk in mine] + [(micro[0], False)] * (slots - len(mine))

    # ---------------------------------------------------------------------------------------- checkpoints
    def _state(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: the run's fingerprint, the training settings and seed."""
        return {**self.fingerprint, "config": self.config.optimisation(), "seed": self.seed,
                "examples": len(self.examples)}

    def _save_checkpoint(self, name: str, position: Position, result: TrainResult, artifact: bool) -> None:
        """Write ``<name>/``: every process gathers the whole trainable weights and optimiser state (shards under
        FSDP2, partitions under ZeRO), the main process writes them once; never weights that are not finite."""
        weights = {n: whole(p).cpu() for n, p in self.params.items()}
        if not all(torch.isfinite(w).all() for w in weights.values()):
            raise NonFiniteLossError(f"The trainable weights hold NaN or inf after step {result.steps}; nothing "
                                     "is saved from here on. Lower train.lr or train.max_grad_norm.")
        optimizer = optimizer_state(self.optimizer, [self.params[n] for n in self._ordered_names])
        with whole_parameters(self.unwrapped) if artifact else contextlib.nullcontext():
            if self.accelerator.is_main_process:
                write_checkpoint(self.output_dir / name, weights, self._ordered_names, optimizer,
                                 self.scheduler.state_dict(),
                                 {**self._state(), "position": asdict(position), "result": result.to_dict()},
                                 self.save_artifact if artifact else None)
        self.accelerator.wait_for_everyone()

    def latest_checkpoint(self) -> Path | None:
        found = list_checkpoints(self.output_dir)
        return found[-1][1] if found else None

    def _load_checkpoint(self, path: Path) -> tuple[Position, TrainResult]:
        check_resumable(path, read_state(path), self._state())
        state = read_checkpoint(path, self.params, self._ordered_names, self.optimizer, self.scheduler)
        return Position(**state["position"]), TrainResult(**state["result"])

    def _resume(self) -> tuple[Position, TrainResult] | None:
        """Load the most advanced readable checkpoint (a damaged one is named and the one before it used);
        None where there is none."""
        found = [path for _, path in list_checkpoints(self.output_dir)]
        damaged = damaged_checkpoints(self.output_dir)
        if not found and damaged:
            raise self._none_intact(damaged[0])
        for index, checkpoint in enumerate(reversed(found)):
            try:
                position, result = self._load_checkpoint(checkpoint)
            except DamagedCheckpointError as error:
                if index == len(found) - 1:
                    raise self._none_intact(error) from None
                logger.warning("%s: resuming from the checkpoint before it.", error)
                continue
            result.processes = self.processes
            logger.info("resuming at epoch %d, step %d of %d, from %s", position.epoch, position.step_in_epoch,
                        self.steps_per_epoch, checkpoint)
            return position, result
        return None

    def _none_intact(self, error: DamagedCheckpointError) -> DamagedCheckpointError:
        return DamagedCheckpointError(f"{error}, and no checkpoint in {self.output_dir} is intact: rerun with "
                                      "--restart to train from scratch (it discards them), or put back the files "
                                      "from a copy.")

    def discard_checkpoints(self) -> None:
        """Remove this output folder's checkpoints (for ``--restart``)."""
        if self.accelerator.is_main_process:
            discard_checkpoints(self.output_dir)
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------------------------------- training
    def train(self, resume: bool = True) -> TrainResult:
        """Run (or finish) training; with `resume`, continue from the most advanced complete checkpoint."""
        device = self.accelerator.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), StopRequests() as stop:
            self._stop = stop
            return self._train(resume, device)

    def _stop_requested(self, device: torch.device) -> int | None:
        """The signal asking to stop, if any process received one (every process then stops at the same step)."""
        signum = self._stop.signum or 0
        if self.processes > 1:
            signum = int(self.accelerator.gather(torch.tensor([signum], device=device)).max())
        return signum or None

    def _train(self, resume: bool, device: torch.device) -> TrainResult:
        position, result = Position(), TrainResult(processes=self.processes)
        if resume:
            position, result = self._resume() or (position, result)
        result.engine = self.engine
        main = self.accelerator.is_main_process
        if self.config.log_with:
            self.accelerator.init_trackers("hificl", config=self.config.optimisation())
        if self.config.gradient_checkpointing:
            self.unwrapped.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        finished = position.epoch > self.config.epochs
        if hasattr(self.objective, "prepare") and not finished:  # work on every item before the first batch
            self.objective.prepare(self.examples, progress=self.progress)
        reset_peak_memory(device)
        bar = tqdm(total=self.total_steps, initial=result.steps, desc="train", unit="step",
                   disable=not (self.progress and main), dynamic_ncols=True)
        self.model.train()
        self._warm, self._examples_seen = False, 0
        try:
            for epoch in range(position.epoch, self.config.epochs + 1):
                if position.epoch != epoch:
                    position = Position(epoch)
                self._run_epoch(position, result, device, bar)
        finally:
            bar.close()
            if self.config.gradient_checkpointing:
                self.unwrapped.activation_checkpointing_disable()
            self.model.eval()
        if self.config.log_with:
            self.accelerator.end_training()
        seen = [self._examples_seen]
        if self.processes > 1:
            seen = gather_object(seen)
        result.examples_per_process = seen  # the examples this run's processes trained on (after any resume)
        if main:
            atomic_write_json(self.output_dir / "train_result.json", result.to_dict())
        return result

    def _run_epoch(self, position: Position, result: TrainResult, device: torch.device, bar) -> None:
        epoch = position.epoch
        if hasattr(self.objective, "set_epoch"):
            self.objective.set_epoch(epoch)

        steps = self._epoch_steps(epoch)
        for index in range(position.step_in_epoch, len(steps)):
            started = time.perf_counter()
            step_loss = self._step(steps[index], result.steps, device)
            if not math.isfinite(step_loss):
                raise NonFiniteLossError(
                    f"The training loss is {step_loss} at step {result.steps + 1} (epoch {epoch}): training stopped "
                    f"and nothing was saved from this step on. Lower train.lr (now {self.config.lr:g}) or check the "
                    "data; the last good checkpoint, if any, is in " f"{self.output_dir}.")
            seconds = time.perf_counter() - started
            result.steps += 1
            if self._warm:  # the first step this process runs is a warm-up (kernel selection, caches): not timed
                result.timed_steps += 1
                result.timed_seconds += seconds
                result.seconds_per_step = result.timed_seconds / result.timed_steps
            self._warm = True
            result.seconds += seconds
            position.seconds += seconds
            position.losses.append(step_loss)
            position.step_in_epoch = index + 1
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{step_loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            logger.debug("step %d of %d done, loss %.4f", result.steps, self.total_steps, step_loss)
            if self.config.log_with:
                self.accelerator.log({"train/loss": step_loss, "train/lr": self.scheduler.get_last_lr()[0]},
                                     step=result.steps)
            every = self.config.checkpoint_every
            if every and result.steps % every == 0 and position.step_in_epoch < len(steps):
                self._save_step_checkpoint(position, result)
            signum = self._stop_requested(device)
            if signum is not None:
                self._save_step_checkpoint(position, result)
                raise Interrupted(signum, self.output_dir / f"{STEP_PREFIX}{result.steps}")
        record: dict[str, Any] = {"epoch": epoch, "train_loss": sum(position.losses) / len(position.losses),
                                  "seconds": position.seconds}
        if self.validation is not None:
            self.model.eval()
            record.update({f"val_{k}": v for k, v in self.validation.run().items()})
            self.model.train()
            if f"val_{self.validation.selection.metric}" not in record:
                raise ValueError(f"Validation reported no {self.validation.selection.metric!r} (it reported "
                                 f"{sorted(k[4:] for k in record if k.startswith('val_'))}), so no epoch can be "
                                 "chosen by it; set train.select_metric to one of those.")
        result.history.append(record)
        if self.validation is not None:
            result.best_epoch = self.validation.selection.best(result.history)
        result.last_epoch = epoch
        result.peak_memory_mb = max(result.peak_memory_mb, peak_memory_mb(device))
        logger.info(_epoch_line(record))
        if self.config.log_with:
            self.accelerator.log({k.replace("val_", "val/"): v for k, v in record.items()
                                  if k.startswith("val_") and isinstance(v, (int, float))}, step=result.steps)
        self._save_checkpoint(f"{EPOCH_PREFIX}{epoch}", Position(epoch + 1), result, artifact=True)
        self._remove_step_checkpoints()

    def _save_step_checkpoint(self, position: Position, result: TrainResult) -> None:
        """The latest mid-epoch checkpoint; the one before it is removed once this one is in place."""
        name = f"{STEP_PREFIX}{result.steps}"
        self._save_checkpoint(name, position, result, artifact=False)
        self._remove_step_checkpoints(but=name)

    def _remove_step_checkpoints(self, but: str | None = None) -> None:
        """Remove the mid-epoch checkpoints (main process) but `but`: a newer checkpoint supersedes them."""
        if self.accelerator.is_main_process:
            for _, path in list_checkpoints(self.output_dir):
                if path.name.startswith(STEP_PREFIX) and path.name != but:
                    remove_folder(path)

    def _counts(self, batch: Any, chunk: list[int]) -> list[int]:
        """How many elements each loss term of a micro-batch is a mean over (`hificl.objectives`); an objective
        that does not say is weighed by examples."""
        return self.objective.counts(batch) if hasattr(self.objective, "counts") else [len(chunk)]

    def _terms(self, batch: Any) -> list[tuple[float, torch.Tensor]]:
        if hasattr(self.objective, "terms"):
            return self.objective.terms(self.model, batch)
        return [(1.0, self.objective.loss(self.model, batch))]

    def _step(self, step: list[list[int]], done: int, device: torch.device) -> float:
        """One optimiser step; returns its loss: each term's mean over all of the step's elements (answer tokens,
        positions), whatever the micro-batches and processes, summed with its weight."""
        torch.manual_seed(step_seed(self.seed, done, self.accelerator.process_index))
        slots = self._my_slots(step)
        batches = [send_to_device(self.objective.batch([self.examples[i] for i in chunk]), device)
                   for chunk, _ in slots]
        counts = [[c if real else 0 for c in self._counts(batch, chunk)]
                  for batch, (chunk, real) in zip(batches, slots)]
        totals = [sum(column) for column in zip(*counts)]
        if self.processes > 1:  # the step's elements over every process
            totals = self.accelerator.reduce(torch.tensor(totals, dtype=torch.float64, device=device), "sum").tolist()
        local = 0.0
        for index, (batch, (chunk, real), mine) in enumerate(zip(batches, slots, counts)):
            last = index == len(slots) - 1
            with micro_batch(self.accelerator, self.model, last):
                with self.accelerator.autocast():
                    terms = self._terms(batch)
                    # each mean weighed by this micro-batch's share of the step's elements (1.0 for a step of one
                    # micro-batch on one process: the objective's own loss, exactly)
                    shares = [weight * (n / total if total else 0.0) for (weight, _), n, total in
                              zip(terms, mine, totals)]
                    loss = shares[0] * terms[0][1]
                    for share, (_, mean) in zip(shares[1:], terms[1:]):
                        loss = loss + share * mean
                # every engine averages gradients over processes: scaling by their number makes it a sum
                self.accelerator.backward(loss * self.processes)
            local += loss.item()
            self._examples_seen += len(chunk) if real else 0
        if self.processes > 1:
            local = float(self.accelerator.reduce(torch.tensor(local, dtype=torch.float64, device=device), "sum"))
        step_loss = local
        if math.isfinite(step_loss):
            if self.config.max_grad_norm > 0:
                self.accelerator.clip_grad_norm_(list(self.params.values()), self.config.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss

    def close(self) -> None:
        """Release what only training needs (the optimiser's state, the prepared model, the accelerator's
        references), so that evaluation after it runs without them."""
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:  # not destroyed: the engine's hooks gather
            self.accelerator.deepspeed_engine_wrapped = None  # ZeRO-3 weights for the evaluation after training, its
            # partitions hold the float32 weights an epoch is restored into; it goes with the backbone (`Run.close`)
        self.optimizer = self.scheduler = self.model = None
        self.params = {}
        self.accelerator.free_memory()  # drops the accelerator's references and collects garbage


def _epoch_line(record: dict[str, Any]) -> str:
    parts = [f"epoch {record['epoch']}", f"train loss {record['train_loss']:.4f}", f"{record['seconds']:.0f}s"]
    parts += [f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val_") and isinstance(v, float)]
    return " | ".join(parts)
