"""The protocol of a run: one configured run's task, data subsets, methods and backbone (`Run`, loaded once and
shared by its methods), and the one path by which any method is trained and its epoch chosen
(`Run.train_and_select` -> `Trained`). The commands built on it are in `hificl.pipeline`.

Protocol (the paper's, with its flaws fixed): training uses the first N of a seeded shuffle of the train split;
a held-out validation split picks the epoch (never the test set); the test numbers are reported for the epoch
chosen on validation AND for the last epoch. Several processes (``accelerate launch`` / ``torchrun``) run the same
protocol: each loads the backbone on its own device, training and evaluation split the work (`hificl.trainer`,
`hificl.evaluator`), and the main process alone writes files and logs. A run holds its output folder
(`hificl.io.folder_lock`) while it writes there (`holding`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import transformers

from .backbones import Backbone, load_backbone
from .backbones.identity import backbone_identity
from .checkpoints import epoch_weights
from . import zero
from .distributed import (check_engine, is_sharded_model, keeps_backbone_off_device, process_state, set_whole_,
                          shard_for_evaluation, sharding_engine)
from .evaluator import EvalResult, evaluate
from .io import atomic_write_json, folder_lock
from .methods import Method, Parts, distinct_labels, get_method
from .metrics import get_metric
from .results import EpochChoice
from .run_config import RunConfig
from .seeding import Seeds
from .settings import Selection, TrainConfig
from .tasks import Example, Task, get_task, unlabelled
from .trainer import Checkpointing, Trainer, TrainResult, Validation

logger = logging.getLogger(__name__)


def _digest(examples) -> str:
    """A short hash of examples in order: their ids, questions, image paths and, for labelled examples, their
    answers and targets (unlabelled queries have none to read)."""
    def record(e):
        labels = [list(e.answers), e.target] if isinstance(e, Example) else []
        return json.dumps([e.id, e.question, e.image.path if e.image else None] + labels)

    return hashlib.sha1("\n".join(record(e) for e in examples).encode()).hexdigest()[:16]


class Run:
    """One configured run: the backbone, the task and its data subsets are loaded once and shared by methods."""

    def __init__(self, config: RunConfig, restart: bool = False, trains: bool = True):
        self.config, self.restart = config, restart
        self.state = process_state()
        self.output_dir = Path(config.output_dir)
        self.data_seed = config.seed
        self.replicate_seeds = list(config.seeds or [config.seed])
        task_options = {k: v for k, v in config.task.items() if k != "name"}
        self.task: Task = get_task(config.task["name"], seed=self.data_seed, **task_options)
        self.methods = [build_method(spec) for spec in config.methods]
        seen: dict[str, int] = {}
        for index, method in enumerate(self.methods):
            if method.id in seen:
                raise ValueError(f"methods[{seen[method.id]}] and methods[{index}] are the same method with the same "
                                 f"settings ({method.label}, id {method.id}): remove one, or change its options.")
            seen[method.id] = index
        self.labels = distinct_labels(self.methods)  # what tables call each method: never two alike
        self.train_examples = self.task.subset("train", self._budget("train", config.train_samples), self.data_seed)
        self.validation_examples = (
            self.task.subset("validation", self._budget("validation", config.validation_samples), self.data_seed)
            if config.validation_samples and self.task.splits.get("validation") else [])
        self.test_examples = self.task.subset("test", self._budget("test", config.test_samples), self.data_seed)
        if config.validation_samples and not self.validation_examples:
            logger.warning("validation_samples is %d but task %r has no validation examples: no epoch is chosen on "
                           "validation (the last epoch is reported). Give the task a validation split (e.g. "
                           "task.validation_size for a JSONL task), or set validation_samples: 0.",
                           config.validation_samples, self.task.name)
        self.efficiency_points = self._efficiency_points()
        for method in self.methods:
            if method.trainable:
                train = self.train_config(method)
                self.selection(train)  # a bad select_metric fails now, not after an epoch
                if train.mixed_precision != config.train.mixed_precision and self.state.num_processes > 1:
                    raise ValueError(f"Method {method.label}: a mixed_precision of its own ({train.mixed_precision}) "
                                     "needs a single process (accelerate fixes the precision of a launched run); "
                                     "set train.mixed_precision for the whole run instead.")
        if trains and any(method.trainable for method in self.methods):
            check_engine()  # before minutes of loading a backbone too large for one device
        self._backbone: Backbone | None = self._load_backbone()
        self.backbone_identity = backbone_identity(config.backbone, self.backbone.model)
        self.backbone_name = self.backbone.name

    def _load_backbone(self) -> Backbone:
        """The backbone on this process's device; under FSDP2 and ZeRO-3 where it loaded (the CPU), until the
        engine shards it onto the devices (training, or `shard_for_evaluation`): it is never whole on one device."""
        with zero.loading_whole() if sharding_engine() == "DeepSpeed" else contextlib.nullcontext():
            backbone = load_backbone(self.config.backbone, self.config.dtype, self.config.chat_template)
        if not keeps_backbone_off_device():
            backbone.model.to(self.state.device)
        return backbone

    @property
    def backbone(self) -> Backbone:
        """The run's backbone, loaded anew when a sharding engine (FSDP2, DeepSpeed) held the last one."""
        if self._backbone is None:
            self._backbone = self._load_backbone()
        return self._backbone

    def close(self, parts: Parts) -> None:
        """Give the backbone back as it was after a method's parts are done: their adapter removed, and a backbone
        that a sharding engine sharded in place (or DeepSpeed's engine cast and placed) released: the next method
        loads it whole again."""
        engine_held = sharding_engine() == "DeepSpeed" and parts.adapter is not None
        parts.close()
        if engine_held or is_sharded_model(self._backbone.model):
            self._backbone = None

    def _budget(self, split: str, requested: int | None) -> int | None:
        """How many examples of `split` the run uses: `requested`, clipped (with a warning) to what the split
        holds, so every report states the number actually used."""
        available = len(self.task.splits[split])
        if requested is not None and requested > available:
            logger.warning("%s_samples is %d but the %s split of task %r holds %d examples: using all %d (the "
                           "results say %d).", split, requested, split, self.task.name, available, available, available)
            return available
        return requested

    def _efficiency_points(self) -> list[dict[str, int]]:
        """The data-efficiency points as run: samples clipped to the train split (with a warning), a point that
        then repeats an earlier one's sample count dropped."""
        available, points = len(self.task.splits["train"]), []
        for point in self.config.data_efficiency:
            samples = min(point["samples"], available)
            if samples < point["samples"]:
                logger.warning("data_efficiency point %d samples: the train split holds %d examples, so it trains "
                               "on %d.", point["samples"], available, samples)
            if any(p["samples"] == samples for p in points):
                logger.warning("data_efficiency point %d samples is dropped: it would train on the same %d "
                               "examples as an earlier point.", point["samples"], samples)
                continue
            points.append({"samples": samples, "epochs": point["epochs"]})
        return points

    def label(self, method: Method) -> str:
        return self.labels.get(method.id, method.label)

    @property
    def main(self) -> bool:
        return self.state.is_main_process

    def seeds(self, replicate: int) -> Seeds:
        return Seeds(data=self.data_seed, replicate=replicate)

    def folder(self, method: Method, replicate: int | None = None) -> Path:
        """A method's results folder: named by its id, with a sub-folder per seed for replicated methods."""
        folder = self.output_dir / method.id
        return folder / f"seed-{replicate}" if method.random else folder

    # ------------------------------------------------------------------------------------------ training
    def train_config(self, method: Method, epochs: int | None = None) -> TrainConfig:
        """The run's training settings with the method's own overrides (e.g. LoRA's learning rate)."""
        overrides = dict(method.train_overrides)
        if epochs is not None:
            overrides["epochs"] = epochs
        return TrainConfig.from_dict({**asdict(self.config.train), **overrides})

    def selection(self, config: TrainConfig) -> Selection:
        """The validation metric that picks the epoch: the configured one, or the task's; checked to be one the
        task reports on validation."""
        name = config.select_metric or self.task.metric
        reported = self.task.reported_metrics(self.validation_examples) if self.validation_examples else [self.task.metric]
        if name not in reported:
            raise ValueError(f"train.select_metric {name!r} is not a metric task {self.task.name!r} reports on "
                             f"validation ({', '.join(reported)}); leave it unset to use the task's metric "
                             f"{self.task.metric!r}.")
        return Selection(name, get_metric(name).higher_is_better)

    def fingerprint(self, method: Method, examples) -> dict[str, Any]:
        """What defines a training run beyond its training settings: a checkpoint is resumed only under the same.
        Data enter through digests of the examples (a moved data folder still resumes), the backbone through its
        config and the fingerprints of its files (`hificl.backbones.identity`: the same path with other weights is
        another run), evaluation through the settings that change validation scores (not the batch size)."""
        config = self.config
        task = {k: v for k, v in config.task.items() if not (isinstance(v, str) and Path(v).exists())}
        return {"method": {"name": method.name, **json.loads(json.dumps(method.options, default=str))},
                "task": task, "backbone": {"spec": config.backbone, "dtype": config.dtype,
                                           "chat_template": config.chat_template, **self.backbone_identity},
                "train_data": {"count": len(examples), "digest": _digest(examples)},
                "validation_data": {"count": len(self.validation_examples),
                                    "digest": _digest(self.validation_examples)},
                "eval": {"num_beams": config.eval.num_beams, "max_new_tokens": config.eval.max_new_tokens}}

    def training_examples(self, method: Method, seeds: Seeds, examples=None) -> list:
        """What a method trains on: the run's training examples, or for a method trained on unlabelled queries
        those outside its labelled pool, stripped of their answers."""
        examples = examples if examples is not None else self.train_examples
        if not method.unlabelled:
            return examples
        labelled = method.labelled_ids(self.task, seeds)
        return [unlabelled(e) for e in examples if e.id not in labelled]

    def train_and_select(self, method: Method, parts: Parts, folder: Path, seeds: Seeds, train_examples=None,
                         epochs: int | None = None) -> "Trained":
        """Train a method's parts (checkpoints in `folder`) and choose the epoch on validation: the one path every
        command trains by. A method trained on unlabelled queries picks no epoch on labelled validation questions:
        its last epoch is used. The trainer is closed (optimiser state released) before this returns."""
        config = self.train_config(method, epochs)
        selection = self.selection(config)
        examples = self.training_examples(method, seeds, train_examples)
        budget = method.data_budget(len(examples))
        parts.adapter.record_training(method.name, method.options, data={
            "task": self.task.name, "train_examples": len(examples), "digest": _digest(examples),
            **{f"{k}_examples": v for k, v in budget.items()}})
        validation = self.validation_examples if not method.unlabelled else []
        reported = self.task.reported_metrics(validation) if validation else []

        def validate():
            result = evaluate(parts.model, parts.prompter, self.backbone, self.task, self.validation_examples,
                              self.config.eval, progress=False, warmup=False)
            return {name: result.metrics[name] for name in reported}

        trainer = Trainer(parts.model, parts.objective, examples, config, seeds.replicate,
                          Checkpointing(folder, parts.adapter.save_pretrained, self.fingerprint(method, examples)),
                          Validation(validate, selection) if validation else None, parts.param_groups,
                          progress=self.config.progress)
        try:
            if self.restart:
                trainer.discard_checkpoints()
            return Trained(trainer.train(), folder, parts.adapter)
        finally:
            trainer.close()

    # -------------------------------------------------------------------------------------------- eval
    def evaluate_parts(self, parts: Parts, folder: Path, label: str) -> EvalResult:
        shard_for_evaluation(parts.model, self.config.train.mixed_precision)  # FSDP2, ZeRO-3: never whole on a device
        evaluation = evaluate(parts.model, parts.prompter, self.backbone, self.task, self.test_examples,
                              self.config.eval, progress=self.config.progress, desc=label)
        if self.main:
            evaluation.save(folder)
        return evaluation

    def write_test_ids(self) -> None:
        """The ids of the test questions, beside the results (the published evaluation subset)."""
        if self.main:
            atomic_write_json(self.output_dir / "test_ids.json", [example.id for example in self.test_examples])

    def report_header(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(), "task": self.task.name, "metric": self.task.metric,
            "backbone": self.backbone_name, "num_train": len(self.train_examples),
            "num_validation": len(self.validation_examples), "num_test": len(self.test_examples),
            "seeds": self.replicate_seeds,
            "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "device": str(self.state.device), "processes": self.state.num_processes,
                            "threads": torch.get_num_threads(), "machine": platform.machine(),
                            "python": platform.python_version()},
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }


@dataclass
class Trained:
    """A finished training: its record, and the adapter whose weights can be set to those of any of its epochs."""

    result: TrainResult
    folder: Path
    adapter: Any

    @property
    def selected_epoch(self) -> int:
        """The epoch chosen on validation, or the last where there was none."""
        return self.result.best_epoch or self.result.last_epoch

    def reported_epochs(self) -> list[tuple[EpochChoice, int]]:
        """The epochs a results table reports, with how each was chosen."""
        best, last = self.result.best_epoch, self.result.last_epoch
        if best is None:
            return [(EpochChoice.LAST, last)]
        if best == last:
            return [(EpochChoice.SELECTED_IS_LAST, last)]
        return [(EpochChoice.SELECTED, best), (EpochChoice.LAST, last)]

    def restore(self, epoch: int) -> None:
        """Set the adapter's trainable weights to those saved at the end of `epoch` (on every process; a sharded
        weight takes its shard)."""
        params = dict(self.adapter.named_parameters())
        for name, value in epoch_weights(self.folder, epoch).items():
            set_whole_(params[name], value)


def build_method(spec: dict[str, Any]) -> Method:
    """A method from its config entry: ``{name, options..., train: {TrainConfig overrides}}``."""
    options = {k: v for k, v in spec.items() if k not in ("name", "train")}
    method = get_method(spec["name"], **options)
    overrides = spec.get("train") or {}
    if not isinstance(overrides, dict):
        raise ValueError(f"Method {spec['name']!r}: 'train' must be a mapping of training settings, got {overrides!r}.")
    if overrides and not method.trainable:
        raise ValueError(f"Method {spec['name']!r} is not trained, so it takes no 'train' settings.")
    TrainConfig.from_dict(overrides)  # checks the names and values now, before anything runs
    method.train_overrides = dict(overrides)
    return method


@contextlib.contextmanager
def holding(config: RunConfig) -> Iterator[None]:
    """The run's output folder, locked by the main process while the run writes there."""
    if process_state().is_main_process:
        with folder_lock(config.output_dir):
            yield
    else:
        yield
