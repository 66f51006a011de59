"""What `hificl train | eval | compare` do: set up the run (`hificl.protocol.Run`), compose each configured
method's parts on its backbone and task, train them by the protocol's one path, evaluate them on the test
questions and write typed result rows (`hificl.results`) and the report (`hificl.report`).

A method with randomness of its own (training, random demonstrations) runs once per seed of ``seeds`` on the same
data, and its row reports the mean, the spread over seeds and 95% bootstrap confidence intervals (`hificl.stats`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .distributed import whole_parameters
from .evaluator import EvalResult
from .io import atomic_write_json
from .methods import Method, Parts, method_for_adapter, trained_data
from .protocol import Run, holding
from .report import write_report
from .results import SCHEMA_VERSION, Row, aggregate, efficiency_point, scores_of
from .run_config import RunConfig

logger = logging.getLogger(__name__)


def _row(run: Run, method: Method, label: str, evaluation: EvalResult, replicate: int, **values: Any) -> Row:
    """A replicate's row: the method, what the evaluation measured (every registered metric) and `values`."""
    metrics = evaluation.metrics
    return Row(method=label, id=method.id, settings=method.describe(), trained=method.trainable,
               metric=metrics["metric"], scores=scores_of(metrics), num_queries=metrics["num_queries"],
               seconds_per_query=metrics["seconds_per_query"],
               prompt_tokens_per_query=metrics["prompt_tokens_per_query"], generation=metrics["generation"],
               seed=replicate, per_question=[p["score"] for p in evaluation.predictions], **values)


def run_replicate(run: Run, method: Method, replicate: int) -> list[Row]:
    """Build, (train,) evaluate and close one replicate of a method; returns its rows (two for a trained method
    whose validation-selected epoch is not the last), each with the per-question scores it was computed from."""
    seeds, folder, label = run.seeds(replicate), run.folder(method, replicate), run.label(method)
    parts: Parts = method.build(run.backbone, run.task, seeds)
    try:
        budget = {f"{k}_examples": v for k, v in method.data_budget(len(run.training_examples(method, seeds))).items()}
        params = parts.adapter.get_nb_trainable_parameters()[0] if parts.adapter else 0
        if not method.trainable:
            evaluation = run.evaluate_parts(parts, folder, label)
            return [_row(run, method, label, evaluation, replicate, trainable_params=params,
                         **{**budget, "labelled_examples": parts.prompter.labelled_used})]
        trained = run.train_and_select(method, parts, folder / "train", seeds)
        result = trained.result
        cost = {"train_seconds": result.seconds, "train_seconds_per_step": result.seconds_per_step,
                "train_steps": result.steps, "train_peak_memory_mb": result.peak_memory_mb,
                "train_samples": len(run.train_examples), "epochs": result.last_epoch,
                "processes": result.processes, "engine": result.engine, "history": result.history}
        rows = []
        for choice, epoch in trained.reported_epochs():
            trained.restore(epoch)
            evaluation = run.evaluate_parts(parts, folder / f"test-epoch-{epoch}", label)
            rows.append(_row(run, method, label, evaluation, replicate, trainable_params=params, epoch=epoch,
                             selection=choice, **budget, **cost))
        return rows
    finally:
        run.close(parts)


def run_method(run: Run, method: Method) -> tuple[list[Row], list[Row]]:
    """Every replicate of a method, and its aggregated rows (mean, spread and confidence intervals)."""
    replicates = [row for seed in (run.replicate_seeds if method.random else [run.data_seed])
                  for row in run_replicate(run, method, seed)]
    return replicates, aggregate(replicates)


def data_efficiency(run: Run) -> list[dict[str, Any]]:
    """The score of the first trainable method against the number of training samples, over the seeds."""
    trainable = [method for method in run.methods if method.trainable]
    if not trainable or not run.efficiency_points:
        return []
    method = trainable[0]
    points = []
    for point in run.efficiency_points:
        examples = run.task.subset("train", point["samples"], run.data_seed)
        scores, seconds, epochs = [], [], []
        for replicate in run.replicate_seeds:
            seeds = run.seeds(replicate)
            parts = method.build(run.backbone, run.task, seeds)
            try:
                folder = run.output_dir / "data-efficiency" / f"{point['samples']}-samples" / f"seed-{replicate}"
                trained = run.train_and_select(method, parts, folder / "train", seeds, examples, point["epochs"])
                trained.restore(trained.selected_epoch)
                evaluation = run.evaluate_parts(parts, folder, f"{point['samples']} samples")
                scores.append([p["score"] for p in evaluation.predictions])
                seconds.append(trained.result.seconds)
                epochs.append(trained.selected_epoch)
            finally:
                run.close(parts)
        points.append(efficiency_point(run.label(method), point["samples"], point["epochs"], epochs, run.task.metric,
                                       scores, seconds))
    return points


def _results(run: Run, rows: list[Row], replicates: list[Row], efficiency: list[dict[str, Any]]) -> dict[str, Any]:
    """results.json's content (`hificl.results.SCHEMA`)."""
    return {"schema_version": SCHEMA_VERSION, **run.report_header(), "rows": [r.to_json() for r in rows],
            "replicates": [r.to_json() for r in replicates], "data_efficiency": efficiency}


def compare(config: RunConfig, restart: bool = False) -> dict[str, Any]:
    """Run every configured method under one protocol and write the report."""
    started = time.perf_counter()
    phases: list[dict[str, Any]] = []  # wall time of each phase, in order

    def phase(name: str, since: float) -> float:
        now = time.perf_counter()
        phases.append({"phase": name, "seconds": now - since})
        return now

    with holding(config):
        run = Run(config, restart)
        run.write_test_ids()
        clock = phase("load backbone and data", started)
        rows, replicates = [], []
        for method in run.methods:
            mine, aggregated = run_method(run, method)
            replicates += mine
            rows += aggregated
            clock = phase(run.label(method), clock)
        efficiency = data_efficiency(run)
        if efficiency:
            phase("data efficiency", clock)
        results = {**_results(run, rows, replicates, efficiency), "phases": phases,
                   "total_seconds": time.perf_counter() - started}
        if run.main:
            write_report(results, run.output_dir)
    return results


def train(config: RunConfig, restart: bool = False) -> dict[str, Any]:
    """Train the (single) trainable method of the config and save its selected adapter to output_dir/adapter."""
    with holding(config):
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
            with whole_parameters(parts.adapter):
                if run.main:
                    parts.adapter.save_pretrained(run.output_dir / "adapter")
        finally:
            run.close(parts)
        summary = {**run.report_header(), "train": trained.result.to_dict(), "selected_epoch": trained.selected_epoch,
                   "adapter": str(run.output_dir / "adapter")}
        if run.main:
            atomic_write_json(run.output_dir / "train_summary.json", summary)
    return summary


def evaluate_config(config: RunConfig, adapter: str | None = None) -> dict[str, Any]:
    """Evaluate every configured method on the test subset. A trainable method is evaluated with the saved
    `adapter` (a folder from `hificl train`), under the settings it was saved with: its row names them, its size
    and the training data the adapter recorded, whatever the config's entry for the method says."""
    with holding(config):
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
                method, trained_on, seeds = method_for_adapter(adapter), trained_data(adapter), [run.data_seed]
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
                             "train_samples": trained_on.get("train_examples"),
                             "labelled_examples": trained_on.get("labelled_examples"),
                             "unlabelled_examples": trained_on.get("unlabelled_examples")} if parts.adapter else {})
                    mine.append(_row(run, method, method.label, evaluation, replicate, **size))
                finally:
                    run.close(parts)
            replicates += mine
            rows += aggregate(mine)
        results = _results(run, rows, replicates, [])
        if trained_on is not None:  # the adapter's own training data, not the config's
            results["num_train"] = trained_on.get("train_examples")
        if run.main:
            write_report(results, run.output_dir)
    return results


__all__ = ["compare", "data_efficiency", "evaluate_config", "run_method", "run_replicate", "train"]
