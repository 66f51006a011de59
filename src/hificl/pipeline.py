"""What `hificl train | eval | compare` do: compose each configured method's parts (`hificl.methods`) on the
run's backbone and task, and hand them to the trainer and the evaluator.

Protocol (the paper's, with its flaws fixed): training uses the first N of a seeded shuffle of the train split;
a held-out validation split picks the epoch (never the test set); the test numbers are reported for the epoch
chosen on validation AND for the last epoch. A method with randomness of its own (training, random
demonstrations) runs once per seed of ``seeds`` on the same data, and its row reports the mean, the spread over
seeds and 95% bootstrap confidence intervals (`hificl.stats`).

Several processes (``accelerate launch`` / ``torchrun``) run the same pipeline: each loads the backbone on its
own device, training and evaluation split the work (`hificl.trainer`, `hificl.evaluator`), and the main process
alone writes files and logs. A run holds its output folder (`hificl.io.folder_lock`) while it writes there.
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

from .adapters import saved_method
from .backbones import Backbone, load_backbone
from .backbones.identity import backbone_identity
from .checkpoints import epoch_artifact
from .distributed import process_state, refuse_sharding_engines
from .evaluator import EvalResult, evaluate
from .io import atomic_write_json, folder_lock
from .methods import Method, Parts, distinct_labels, get_method, method_for_adapter
from .metrics import get_metric
from .run_config import RunConfig
from .seeding import Seeds
from .stats import spread
from .tasks import Example, Task, get_task, unlabelled
from .settings import Selection, TrainConfig
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
        self.methods = [_build_method(spec) for spec in config.methods]
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
            refuse_sharding_engines()  # before minutes of loading a backbone too large for one device
        self.backbone: Backbone = load_backbone(config.backbone, config.dtype, config.chat_template)
        self.backbone.model.to(self.state.device)
        self.backbone_identity = backbone_identity(config.backbone, self.backbone.model)

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
        evaluation = evaluate(parts.model, parts.prompter, self.backbone, self.task, self.test_examples,
                              self.config.eval, progress=self.config.progress, desc=label)
        if self.main:
            evaluation.save(folder)
        return evaluation

    def run_replicate(self, method: Method, replicate: int) -> list[dict[str, Any]]:
        """Build, (train,) evaluate and close one replicate of a method; returns its result rows (two for a
        trained method whose validation-selected epoch is not the last: "selected on validation", "last epoch").
        Each row holds the per-question scores it was computed from."""
        seeds, folder = self.seeds(replicate), self.folder(method, replicate)
        parts = method.build(self.backbone, self.task, seeds)
        try:
            budget = method.data_budget(len(self.training_examples(method, seeds)))
            base_row = {"method": self.label(method), "id": method.id, "settings": method.describe(), "seed": replicate,
                        "trainable_params": parts.adapter.get_nb_trainable_parameters()[0] if parts.adapter else 0,
                        **{f"{k}_examples": v for k, v in budget.items()}}
            if not method.trainable:
                metrics = _row_metrics(self.evaluate_parts(parts, folder, self.label(method)))
                return [{**base_row, "labelled_examples": parts.prompter.labelled_used, **metrics}]
            trained = self.train_and_select(method, parts, folder / "train", seeds)
            result = trained.result
            cost = {"train_seconds": result.seconds, "train_seconds_per_step": result.seconds_per_step,
                    "train_steps": result.steps, "train_peak_memory_mb": result.peak_memory_mb,
                    "train_samples": len(self.train_examples), "epochs": result.last_epoch,
                    "processes": result.processes, "history": result.history}
            rows = []
            for selection, epoch in trained.reported_epochs():
                trained.restore(epoch)
                evaluation = self.evaluate_parts(parts, folder / f"test-epoch-{epoch}", self.label(method))
                rows.append({**base_row, **cost, **_row_metrics(evaluation), "epoch": epoch, "selection": selection})
            return rows
        finally:
            parts.close()

    def run_method(self, method: Method) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Every replicate of a method, and its aggregated rows (mean, spread and confidence intervals)."""
        replicates = [row for seed in (self.replicate_seeds if method.random else [self.data_seed])
                      for row in self.run_replicate(method, seed)]
        return replicates, aggregate(replicates)

    def data_efficiency(self) -> list[dict[str, Any]]:
        """The score of the first trainable method against the number of training samples, over the seeds."""
        trainable = [method for method in self.methods if method.trainable]
        if not trainable or not self.efficiency_points:
            return []
        method = trainable[0]
        points = []
        for point in self.efficiency_points:
            examples = self.task.subset("train", point["samples"], self.data_seed)
            scores, seconds, epochs = [], [], []
            for replicate in self.replicate_seeds:
                seeds = self.seeds(replicate)
                parts = method.build(self.backbone, self.task, seeds)
                try:
                    folder = self.output_dir / "data-efficiency" / f"{point['samples']}-samples" / f"seed-{replicate}"
                    trained = self.train_and_select(method, parts, folder / "train", seeds, examples, point["epochs"])
                    trained.restore(trained.selected_epoch)
                    evaluation = self.evaluate_parts(parts, folder, f"{point['samples']} samples")
                    scores.append([p["score"] for p in evaluation.predictions])
                    seconds.append(trained.result.seconds)
                    epochs.append(trained.selected_epoch)
                finally:
                    parts.close()
            summary = spread(scores)
            points.append({"method": self.label(method), "samples": point["samples"], "epochs": point["epochs"],
                           "selected_epochs": epochs, "metric": self.task.metric, "score": summary.mean,
                           "spread": summary.to_dict(), "train_seconds": sum(seconds) / len(seconds)})
        return points

    def write_test_ids(self) -> None:
        """The ids of the test questions, beside the results (the published evaluation subset)."""
        if self.main:
            atomic_write_json(self.output_dir / "test_ids.json", [example.id for example in self.test_examples])

    def report_header(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(), "task": self.task.name, "metric": self.task.metric,
            "backbone": self.backbone.name, "num_train": len(self.train_examples),
            "num_validation": len(self.validation_examples), "num_test": len(self.test_examples),
            "seeds": self.replicate_seeds,
            "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "device": str(self.backbone.device), "processes": self.state.num_processes,
                            "threads": torch.get_num_threads(), "machine": platform.machine(),
                            "python": platform.python_version()},
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }


def _row_metrics(evaluation: EvalResult) -> dict[str, Any]:
    return {**evaluation.metrics, "per_question": [p["score"] for p in evaluation.predictions]}


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

    def reported_epochs(self) -> list[tuple[str, int]]:
        """The epochs a results table reports, with how each was chosen."""
        best, last = self.result.best_epoch, self.result.last_epoch
        if best is None:
            return [("last epoch", last)]
        if best == last:
            return [("selected on validation = last epoch", last)]
        return [("selected on validation", best), ("last epoch", last)]

    def restore(self, epoch: int) -> None:
        """Set the adapter's weights to those saved at the end of `epoch`."""
        self.adapter.restore_weights(epoch_artifact(self.folder, epoch))


_MEANS = ("seconds_per_query", "prompt_tokens_per_query", "train_seconds", "train_seconds_per_step", "train_steps",
          "epochs", "labelled_examples", "unlabelled_examples")


def aggregate(replicates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A method's rows over its replicates: one per reported epoch ("selected on validation" and "last epoch",
    or one row where every replicate's selected epoch is its last), each with the mean of every number, the
    spread of the score (`hificl.stats.Spread`) and the replicates' own scores."""
    by_seed: dict[int, list[dict[str, Any]]] = {}
    for row in replicates:
        by_seed.setdefault(row["seed"], []).append(row)
    firsts = [rows[0] for rows in by_seed.values()]
    if all(len(rows) == 1 for rows in by_seed.values()) and len({r.get("selection") for r in firsts}) == 1:
        groups = [(firsts[0].get("selection"), firsts)]
    else:
        groups = [("selected on validation", [next(r for r in rows if r["selection"].startswith("selected"))
                                              for rows in by_seed.values()]),
                  ("last epoch", [next(r for r in rows if r["selection"].endswith("last epoch"))
                                  for rows in by_seed.values()])]
    aggregated = []
    for selection, group in groups:
        first, metric = group[0], group[0]["metric"]
        summary = spread([row["per_question"] for row in group])
        row = {k: v for k, v in first.items() if k not in ("per_question", "history", "seed", "epoch")}
        row.update({metric: summary.mean, "spread": summary.to_dict(), "seeds": [r["seed"] for r in group],
                    "replicate_scores": [r[metric] for r in group]})
        if selection is not None:
            row.update({"selection": selection, "epochs_reported": [r["epoch"] for r in group]})
        for key in _MEANS + ("chair_s", "chair_i", "chair_recall"):
            values = [r[key] for r in group if isinstance(r.get(key), (int, float))]
            if len(values) == len(group):
                row[key] = sum(values) / len(values)
        if "train_peak_memory_mb" in first:
            row["train_peak_memory_mb"] = max(r["train_peak_memory_mb"] for r in group)
        aggregated.append(row)
    return aggregated


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


@contextlib.contextmanager
def _holding(config: RunConfig) -> Iterator[None]:
    """The run's output folder, locked by the main process while the run writes there."""
    if process_state().is_main_process:
        with folder_lock(config.output_dir):
            yield
    else:
        yield


def compare(config: RunConfig, restart: bool = False) -> dict[str, Any]:
    """Run every configured method under one protocol and write the report."""
    from .report import write_report

    started = time.perf_counter()
    phases: list[dict[str, Any]] = []  # wall time of each phase, in order

    def phase(name: str, since: float) -> float:
        now = time.perf_counter()
        phases.append({"phase": name, "seconds": now - since})
        return now

    with _holding(config):
        run = Run(config, restart)
        run.write_test_ids()
        clock = phase("load backbone and data", started)
        rows, replicates = [], []
        for method in run.methods:
            mine, aggregated = run.run_method(method)
            replicates += mine
            rows += aggregated
            clock = phase(run.label(method), clock)
        efficiency = run.data_efficiency()
        if efficiency:
            phase("data efficiency", clock)
        results = {**run.report_header(), "rows": rows, "replicates": replicates, "data_efficiency": efficiency,
                   "phases": phases}
        results["total_seconds"] = time.perf_counter() - started
        if run.main:
            write_report(results, run.output_dir)
    return results


def train(config: RunConfig, restart: bool = False) -> dict[str, Any]:
    """Train the (single) trainable method of the config and save its selected adapter to output_dir/adapter."""
    with _holding(config):
        run = Run(config, restart)
        trainable = [m for m in run.methods if m.trainable]
        if len(trainable) != 1:
            raise ValueError(f"`train` needs exactly one trainable method in 'methods', found "
                             f"{[m.name for m in trainable]}; e.g. --set 'methods=[{{name: hificl}}]'.")
        method, seeds = trainable[0], run.seeds(run.replicate_seeds[0])
        if len(run.replicate_seeds) > 1:
            logger.warning("`train` trains one adapter: with seed %d (the first of seeds)", run.replicate_seeds[0])
        parts = method.build(run.backbone, run.task, seeds)
        try:
            trained = run.train_and_select(method, parts, run.output_dir / "train", seeds)
            trained.restore(trained.selected_epoch)
            if run.main:
                parts.adapter.save_pretrained(run.output_dir / "adapter")
        finally:
            parts.close()
        summary = {**run.report_header(), "train": trained.result.to_dict(), "selected_epoch": trained.selected_epoch,
                   "adapter": str(run.output_dir / "adapter")}
        if run.main:
            atomic_write_json(run.output_dir / "train_summary.json", summary)
    return summary


def evaluate_config(config: RunConfig, adapter: str | None = None) -> dict[str, Any]:
    """Evaluate every configured method on the test subset. A trainable method is evaluated with the saved
    `adapter` (a folder from `hificl train`), under the settings it was saved with: its row names them and its
    size, whatever the config's entry for the method says."""
    from .report import write_report

    with _holding(config):
        run = Run(config, trains=False)
        trainable = [m.name for m in run.methods if m.trainable]
        if len(trainable) > 1:
            raise ValueError(f"`eval` evaluates one saved adapter, but 'methods' holds {len(trainable)} trainable "
                             f"methods ({trainable}): keep one.")
        run.write_test_ids()
        rows, replicates, trained_on = [], [], None
        for configured in run.methods:
            if configured.trainable:
                if adapter is None:
                    raise ValueError(f"Method {configured.name!r} is trainable: give --adapter FOLDER (from `hificl "
                                     "train`).")
                method = method_for_adapter(adapter)
                trained_on = (saved_method(adapter)[1].get("trained_by") or {}).get("data") or {}
                seeds = [run.data_seed]
            else:
                method = configured
                seeds = run.replicate_seeds if method.random else [run.data_seed]
            mine = []
            for replicate in seeds:
                parts = (method.load(run.backbone, run.task, run.seeds(replicate), adapter) if configured.trainable
                         else method.build(run.backbone, run.task, run.seeds(replicate)))
                try:
                    evaluation = run.evaluate_parts(parts, run.folder(method, replicate), method.label)
                    size = ({"adapter_params": parts.adapter.num_adapter_parameters(), "adapter": str(adapter),
                             **{k: v for k, v in trained_on.items() if k.endswith("_examples")}}
                            if parts.adapter else {})
                    mine.append({"method": method.label, "id": method.id, "settings": method.describe(),
                                 "seed": replicate, "trainable_params": 0, **size, **_row_metrics(evaluation)})
                finally:
                    parts.close()
            replicates += mine
            rows += aggregate(mine)
        results = {**run.report_header(), "rows": rows, "replicates": replicates, "data_efficiency": []}
        if trained_on is not None:  # the adapter's own training data, not the config's
            results["num_train"] = trained_on.get("train_examples")
        if run.main:
            write_report(results, run.output_dir)
    return results


def inspect(config: RunConfig, adapter: str, queries: int = 64) -> dict[str, Any]:
    """What a saved HiFICL adapter (trained or distilled) does on the config's test questions: the attention share
    of its virtual slots per layer and head, and what its virtual values write, read through the LM head; written
    to output_dir as inspect.json, virtual_share.png and inspect.md."""
    from .inspect import virtual_attention_share, virtual_value_tokens, write_inspection
    from .adapters import HiFICLModel, load_adapter_model
    from .prompting import Prompter

    with _holding(config):
        run = Run(config, trains=False)
        method = method_for_adapter(adapter)
        model = load_adapter_model(run.backbone.model, adapter)
        try:
            if not isinstance(model, HiFICLModel):
                raise ValueError(f"{adapter} holds a {type(model).title} adapter: inspect reads virtual key-value pairs "
                                 "(HiFICL adapters, trained or distilled).")
            examples = run.test_examples[:queries]
            share = virtual_attention_share(model, Prompter(run.task), run.backbone, examples, config.eval.batch_size)
            tokens = virtual_value_tokens(model, run.backbone.tokenizer)
        finally:
            model.unload()
        if run.main:
            write_inspection(run.output_dir, share, tokens, method.label, len(examples))
    return {"method": method.label, "virtual_share": share.tolist(), "value_tokens": tokens,
            "queries": len(examples)}
