"""What `hificl train | eval | compare` do: compose each configured method's parts (`hificl.methods`) on the
run's backbone and task, and hand them to the trainer and the evaluator.

Protocol (the paper's, with its flaws fixed): training uses the first N of a seeded shuffle of the train split;
a held-out validation split picks the epoch (never the test set); the test numbers are reported for the epoch
chosen on validation AND for the last epoch.
"""

from __future__ import annotations

import gc
import platform
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import transformers

from .backbones import Backbone, load_backbone
from .evaluator import evaluate
from .io import atomic_write_json
from .methods import Method, Parts, get_method, method_for_adapter
from .metrics import get_metric
from .run_config import RunConfig
from .seeding import Seeds
from .tasks import Task, get_task
from .trainer import Selection, TrainConfig, Trainer


def _method_slug(method: Method) -> str:
    """A folder name for a method's results, e.g. "4-shot ICL (retrieved)" -> "4-shot-icl-retrieved"."""
    return re.sub(r"[^a-z0-9.]+", "-", method.label.lower()).strip("-")


class Run:
    """One configured run: the backbone, the task and its data subsets are loaded once and shared by methods."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.seeds = Seeds(data=config.seed, replicate=config.seed)
        task_options = {k: v for k, v in config.task.items() if k != "name"}
        self.task: Task = get_task(config.task["name"], seed=self.seeds.data, **task_options)
        self.methods = [_build_method(spec) for spec in config.methods]
        self.backbone: Backbone = load_backbone(config.backbone, config.dtype, config.chat_template)
        if torch.cuda.is_available():
            self.backbone.model.to("cuda")
        self.train_examples = self.task.subset("train", config.train_samples, self.seeds.data)
        self.validation_examples = (self.task.subset("validation", config.validation_samples, self.seeds.data)
                                    if config.validation_samples and self.task.splits.get("validation") else [])
        self.test_examples = self.task.subset("test", config.test_samples, self.seeds.data)
        for method in self.methods:
            if method.trainable:
                self.selection(self.train_config(method))  # a bad select_metric fails now, not after an epoch

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

    def train_method(self, method: Method, parts: Parts, folder: Path, train_examples=None,
                     epochs: int | None = None) -> tuple[Any, Trainer]:
        """Train a method's parts; returns the `TrainResult` and the trainer. Checkpoints go to `folder`."""
        config = self.train_config(method, epochs)
        selection = self.selection(config)
        examples = train_examples if train_examples is not None else self.train_examples
        reported = self.task.reported_metrics(self.validation_examples) if self.validation_examples else []

        def validate():
            result = evaluate(parts.model, parts.prompter, self.backbone, self.task, self.validation_examples,
                              self.config.eval, progress=False)
            return {name: result.metrics[name] for name in reported}

        trainer = Trainer(parts.model, parts.objective, examples, config, folder, seed=self.seeds.order,
                          validate=validate if self.validation_examples else None, selection=selection,
                          save_artifact=parts.adapter.save_pretrained, param_groups=parts.param_groups,
                          progress=self.config.progress)
        return trainer.train(), trainer

    # -------------------------------------------------------------------------------------------- eval
    def evaluate_parts(self, parts: Parts, folder: Path, label: str) -> dict[str, Any]:
        evaluation = evaluate(parts.model, parts.prompter, self.backbone, self.task, self.test_examples,
                              self.config.eval, progress=self.config.progress, desc=label)
        evaluation.save(folder)
        return evaluation.metrics

    def run_method(self, method: Method) -> list[dict[str, Any]]:
        """Build, (train,) evaluate and close one method; returns its result rows (two for a trained method
        whose validation-selected epoch is not the last: "selected on validation" and "last epoch")."""
        folder = self.output_dir / _method_slug(method)
        parts = method.build(self.backbone, self.task, self.seeds)
        try:
            base_row = {"method": method.label, "settings": method.describe(),
                        "trainable_params": parts.adapter.get_nb_trainable_parameters()[0] if parts.adapter else 0}
            if not method.trainable:
                return [{**base_row, **self.evaluate_parts(parts, folder, method.label)}]
            result, trainer = self.train_method(method, parts, folder / "train")
            checkpoints = {epoch: trainer.checkpoint(epoch) for epoch in range(1, result.last_epoch + 1)}
            del trainer  # the trainer's optimiser state and buffers are not needed to evaluate: free them
            gc.collect()  # before the timed test evaluation
            cost = {"train_seconds": result.seconds, "train_seconds_per_step": result.seconds_per_step,
                    "train_steps": result.steps, "train_peak_memory_mb": result.peak_memory_mb,
                    "train_samples": len(self.train_examples), "epochs": result.last_epoch,
                    "history": result.history}
            rows = []
            epochs = [("last epoch", result.last_epoch)]
            if result.best_epoch is not None and result.best_epoch != result.last_epoch:
                epochs.insert(0, ("selected on validation", result.best_epoch))
            elif result.best_epoch is not None:
                epochs = [("selected on validation = last epoch", result.last_epoch)]
            for selection, epoch in epochs:
                parts.adapter.restore_weights(checkpoints[epoch] / "artifact")
                metrics = self.evaluate_parts(parts, folder / f"test-epoch-{epoch}", method.label)
                rows.append({**base_row, **cost, **metrics, "epoch": epoch, "selection": selection})
            return rows
        finally:
            parts.close()

    def data_efficiency(self) -> list[dict[str, Any]]:
        """The score of the first trainable method against the number of training samples."""
        trainable = [method for method in self.methods if method.trainable]
        if not trainable or not self.config.data_efficiency:
            return []
        method = trainable[0]
        points = []
        for point in self.config.data_efficiency:
            parts = method.build(self.backbone, self.task, self.seeds)
            try:
                examples = self.task.subset("train", point["samples"], self.seeds.data)
                folder = self.output_dir / "data-efficiency" / f"{point['samples']}-samples"
                result, trainer = self.train_method(method, parts, folder / "train", examples, point["epochs"])
                epoch = result.best_epoch or result.last_epoch
                parts.adapter.restore_weights(trainer.checkpoint(epoch) / "artifact")
                metrics = self.evaluate_parts(parts, folder, f"{point['samples']} samples")
                points.append({"method": method.label, "samples": point["samples"], "epochs": point["epochs"],
                               "epoch": epoch, "metric": metrics["metric"], "score": metrics[metrics["metric"]],
                               "train_seconds": result.seconds})
            finally:
                parts.close()
        return points

    def write_test_ids(self) -> None:
        """The ids of the test questions, beside the results (the published evaluation subset)."""
        atomic_write_json(self.output_dir / "test_ids.json", [example.id for example in self.test_examples])

    def report_header(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(), "task": self.task.name, "metric": self.task.metric,
            "backbone": self.backbone.name, "num_train": len(self.train_examples),
            "num_validation": len(self.validation_examples), "num_test": len(self.test_examples),
            "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "device": str(self.backbone.device), "threads": torch.get_num_threads(),
                            "machine": platform.machine(), "python": platform.python_version()},
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }


def _build_method(spec: dict[str, Any]) -> Method:
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


def compare(config: RunConfig) -> dict[str, Any]:
    """Run every configured method under one protocol and write the report."""
    from .report import write_report

    started = time.perf_counter()
    run = Run(config)
    run.write_test_ids()
    rows = []
    for method in run.methods:
        rows += run.run_method(method)
    results = {**run.report_header(), "rows": rows, "data_efficiency": run.data_efficiency()}
    results["total_seconds"] = time.perf_counter() - started
    write_report(results, run.output_dir)
    return results


def train(config: RunConfig) -> dict[str, Any]:
    """Train the (single) trainable method of the config and save its selected adapter to output_dir/adapter."""
    run = Run(config)
    trainable = [m for m in run.methods if m.trainable]
    if len(trainable) != 1:
        raise ValueError(f"`train` needs exactly one trainable method in 'methods', found "
                         f"{[m.name for m in trainable]}; e.g. --set 'methods=[{{name: hificl}}]'.")
    method = trainable[0]
    parts = method.build(run.backbone, run.task, run.seeds)
    try:
        result, trainer = run.train_method(method, parts, run.output_dir / "train")
        epoch = result.best_epoch or result.last_epoch
        parts.adapter.restore_weights(trainer.checkpoint(epoch) / "artifact")
        parts.adapter.save_pretrained(run.output_dir / "adapter")
    finally:
        parts.close()
    summary = {**run.report_header(), "train": result.to_dict(), "selected_epoch": epoch,
               "adapter": str(run.output_dir / "adapter")}
    atomic_write_json(run.output_dir / "train_summary.json", summary)
    return summary


def evaluate_config(config: RunConfig, adapter: str | None = None) -> dict[str, Any]:
    """Evaluate every configured method on the test subset. A trainable method is evaluated with the saved
    `adapter` (a folder from `hificl train`), under the settings it was saved with: its row names them and its
    size, whatever the config's entry for the method says."""
    from .report import write_report

    run = Run(config)
    run.write_test_ids()
    rows = []
    for configured in run.methods:
        if configured.trainable:
            if adapter is None:
                raise ValueError(f"Method {configured.name!r} is trainable: give --adapter FOLDER (from `hificl train`).")
            method = method_for_adapter(adapter)
            parts = method.load(run.backbone, run.task, run.seeds, adapter)
        else:
            method = configured
            parts = method.build(run.backbone, run.task, run.seeds)
        try:
            metrics = run.evaluate_parts(parts, run.output_dir / _method_slug(method), method.label)
            size = {"adapter_params": parts.adapter.num_adapter_parameters(), "adapter": str(adapter)} if parts.adapter else {}
            rows.append({"method": method.label, "settings": method.describe(), "trainable_params": 0, **size,
                         **metrics})
        finally:
            parts.close()
    results = {**run.report_header(), "rows": rows, "data_efficiency": []}
    write_report(results, run.output_dir)
    return results
