"""What `hificl train | eval | compare` do, on top of the trainer, the evaluator, methods and tasks.

Protocol (the paper's, with its flaws fixed): training uses the first N of a seeded shuffle of the train split;
a held-out validation split picks the epoch (never the test set); the test numbers are reported for the epoch
chosen on validation AND for the last epoch.
"""

from __future__ import annotations

import gc
import platform
import re
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from .backbones import Backbone, load_backbone
from .evaluator import evaluate
from .io import atomic_write_json
from .methods import Method, get_method
from .run_config import RunConfig
from .tasks import Task, get_task
from .trainer import TrainConfig, Trainer


def _method_slug(method: Method) -> str:
    """A folder name for a method's results, e.g. "4-shot ICL (retrieved)" -> "4-shot-icl-retrieved"."""
    return re.sub(r"[^a-z0-9.]+", "-", method.describe()["method"].lower()).strip("-")


class Run:
    """One configured run: the backbone, the task and its data subsets are loaded once and shared by methods."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.output_dir = Path(config.output_dir)
        task_options = {k: v for k, v in config.task.items() if k != "name"}
        self.task: Task = get_task(config.task["name"], **task_options)
        self.methods = [_build_method(spec) for spec in config.methods]
        self.backbone: Backbone = load_backbone(config.backbone, config.dtype, config.chat_template)
        if torch.cuda.is_available():
            self.backbone.model.to("cuda")
        self.train_examples = self.task.subset("train", config.train_samples, config.seed)
        self.validation_examples = (self.task.subset("validation", config.validation_samples, config.seed)
                                    if config.validation_samples and self.task.splits.get("validation") else [])
        self.test_examples = self.task.subset("test", config.test_samples, config.seed)

    # ------------------------------------------------------------------------------------------ training
    def train_method(self, method: Method, folder: Path, train_examples=None, epochs: int | None = None) -> dict[str, Any]:
        """Train `method` (already set up); returns the training record. Checkpoints go to `folder`. The
        method's own ``train`` overrides (e.g. LoRA's learning rate) apply on top of the run's settings."""
        overrides = dict(method.train_overrides)
        if epochs is not None:
            overrides["epochs"] = epochs
        config = TrainConfig.from_dict({**vars(self.config.train), **overrides})
        examples = train_examples if train_examples is not None else self.train_examples

        def validate():
            result = evaluate(method, self.validation_examples, self.config.eval, progress=False)
            return {"accuracy": result.metrics["accuracy"]}

        trainer = Trainer(method.model, method.loss, examples, method.training_batch, config, folder,
                          validate=validate if self.validation_examples else None, save_artifact=method.save,
                          param_groups=method.param_groups(config.lr), progress=self.config.progress)
        result = trainer.train()
        return {"result": result, "trainer": trainer}

    # -------------------------------------------------------------------------------------------- eval
    def evaluate_method(self, method: Method, folder: Path, label: str) -> dict[str, Any]:
        evaluation = evaluate(method, self.test_examples, self.config.eval, progress=self.config.progress, desc=label)
        evaluation.save(folder)
        return evaluation.metrics

    def run_method(self, method: Method) -> list[dict[str, Any]]:
        """Set up, (train,) evaluate and close one method; returns its result rows (two for a trained method
        whose validation-selected epoch is not the last: "selected on validation" and "last epoch")."""
        folder = self.output_dir / _method_slug(method)
        method.setup(self.backbone, self.task, self.config.seed)
        try:
            described = method.describe()
            base_row = {"method": described["method"], "settings": described,
                        "trainable_params": method.num_trainable_parameters()}
            if not method.trainable:
                return [{**base_row, **self.evaluate_method(method, folder, described["method"])}]
            training = self.train_method(method, folder / "train")
            result = training["result"]
            checkpoints = {epoch: training["trainer"].checkpoint(epoch) for epoch in range(1, result.last_epoch + 1)}
            del training  # the trainer's optimiser state and buffers are not needed to evaluate: free them
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
                method.load(checkpoints[epoch] / "artifact")
                metrics = self.evaluate_method(method, folder / f"test-epoch-{epoch}", described["method"])
                rows.append({**base_row, **cost, **metrics, "epoch": epoch, "selection": selection})
            return rows
        finally:
            method.close()

    def data_efficiency(self) -> list[dict[str, Any]]:
        """Accuracy of the trainable method against the number of training samples."""
        trainable = [spec for spec in self.config.methods if _build_method(spec).trainable]
        if not trainable or not self.config.data_efficiency:
            return []
        spec = trainable[0]
        points = []
        for point in self.config.data_efficiency:
            method = _build_method(spec)
            method.setup(self.backbone, self.task, self.config.seed)
            try:
                examples = self.task.subset("train", point["samples"], self.config.seed)
                folder = self.output_dir / "data-efficiency" / f"{point['samples']}-samples"
                training = self.train_method(method, folder / "train", examples, point["epochs"])
                result = training["result"]
                epoch = result.best_epoch or result.last_epoch
                method.load(training["trainer"].checkpoint(epoch) / "artifact")
                metrics = self.evaluate_method(method, folder, f"{point['samples']} samples")
                points.append({"method": method.describe()["method"], "samples": point["samples"],
                               "epochs": point["epochs"], "epoch": epoch, "accuracy": metrics["accuracy"],
                               "train_seconds": result.seconds})
            finally:
                method.close()
        return points

    def write_test_ids(self) -> None:
        """The ids of the test questions, beside the results (the published evaluation subset)."""
        atomic_write_json(self.output_dir / "test_ids.json", [example.id for example in self.test_examples])

    def report_header(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(), "task": self.task.name, "backbone": self.backbone.name,
            "num_train": len(self.train_examples), "num_validation": len(self.validation_examples),
            "num_test": len(self.test_examples),
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
    method.setup(run.backbone, run.task, config.seed)
    training = run.train_method(method, run.output_dir / "train")
    result = training["result"]
    epoch = result.best_epoch or result.last_epoch
    method.load(training["trainer"].checkpoint(epoch) / "artifact")
    method.save(run.output_dir / "adapter")
    summary = {**run.report_header(), "train": result.to_dict(), "selected_epoch": epoch,
               "adapter": str(run.output_dir / "adapter")}
    atomic_write_json(run.output_dir / "train_summary.json", summary)
    method.close()
    return summary


def evaluate_config(config: RunConfig, adapter: str | None = None) -> dict[str, Any]:
    """Evaluate every configured method on the test subset; trainable methods need `adapter` (a saved folder)."""
    from .report import write_report

    run = Run(config)
    run.write_test_ids()
    rows = []
    for method in run.methods:
        method.setup(run.backbone, run.task, config.seed)
        try:
            if method.trainable:
                if adapter is None:
                    raise ValueError(f"Method {method.name!r} is trainable: give --adapter FOLDER (from `hificl train`).")
                method.load(adapter)
            described = method.describe()
            metrics = run.evaluate_method(method, run.output_dir / _method_slug(method), described["method"])
            rows.append({"method": described["method"], "settings": described,
                         "trainable_params": method.num_trainable_parameters(), **metrics})
        finally:
            method.close()
    results = {**run.report_header(), "rows": rows, "data_efficiency": []}
    write_report(results, run.output_dir)
    return results
