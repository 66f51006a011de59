"""Result rows, typed: what one method measured on the test questions, for one replicate (`Row` with its seed,
epoch and per-question scores) or over its replicates (`aggregate`: means, the spread of the score and 95%
intervals). ``results.json`` holds them flat (every metric score under its own name) and is described by the JSON
schema shipped beside this module (`SCHEMA`, version `SCHEMA_VERSION`).

What is averaged over replicates is declared on each field (``over_replicates``: mean, max, or kept from the
first replicate) and every registered metric a row reports is averaged (`hificl.metrics`), so a new metric or
cost needs no change here."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field, fields
from importlib import resources
from typing import Any

from .metrics import METRICS
from .stats import spread

SCHEMA_VERSION = 1
SCHEMA = resources.files("hificl") / "schemas" / "results.schema.json"


class EpochChoice(str, enum.Enum):
    """Which epoch of a trained method a row reports (its value is what tables print)."""

    SELECTED = "selected on validation"
    LAST = "last epoch"
    SELECTED_IS_LAST = "selected on validation = last epoch"


def _mean(default: Any = None) -> Any:
    return field(default=default, metadata={"over_replicates": "mean"})


def _max() -> Any:
    return field(default=None, metadata={"over_replicates": "max"})


def _own() -> Any:  # one replicate's alone: not in an aggregated row
    return field(default=None, metadata={"over_replicates": "drop"})


@dataclass
class Row:
    """One method's result on the test questions. `scores` holds every metric measured, by name (the headline
    `metric` among them); `trained` tells a trained method from a training-free one (zero-shot, ICL)."""

    method: str  # the table's label
    id: str
    settings: dict[str, Any]
    trained: bool
    metric: str
    scores: dict[str, float]
    num_queries: int
    seconds_per_query: float = _mean()
    prompt_tokens_per_query: float = _mean()
    generation: dict[str, Any] | None = None
    trainable_params: int = 0
    adapter_params: int | None = None
    adapter: str | None = None  # the saved adapter a row evaluates (`hificl eval`)
    labelled_examples: float | None = _mean()
    unlabelled_examples: float | None = _mean()
    train_samples: int | None = None
    train_seconds: float | None = _mean()
    train_seconds_per_step: float | None = _mean()
    train_steps: float | None = _mean()
    train_peak_memory_mb: float | None = _max()
    epochs: float | None = _mean()  # epochs trained
    processes: int | None = None
    engine: str | None = None  # how the processes shared the model in training (DDP, FSDP2, ...)
    selection: EpochChoice | None = None
    seed: int | None = _own()
    epoch: int | None = _own()  # the epoch reported
    per_question: list[float] | None = _own()
    history: list[dict[str, Any]] | None = _own()
    spread: dict[str, Any] | None = None  # over replicates: `hificl.stats.Spread`
    seeds: list[int] | None = None
    replicate_scores: list[float] | None = None
    epochs_reported: list[int] | None = None

    @property
    def score(self) -> float:
        return self.scores[self.metric]

    def to_json(self) -> dict[str, Any]:
        """The row as results.json holds it: flat, every score under its metric's name, unset fields left out."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "scores"}
        data = {k: (v.value if isinstance(v, EpochChoice) else v) for k, v in data.items() if v is not None}
        return {**data, **self.scores}


def scores_of(metrics: dict[str, Any]) -> dict[str, float]:
    """The registered metrics' values among an evaluation's metrics."""
    return {name: float(value) for name, value in metrics.items()
            if name in METRICS and isinstance(value, (int, float))}


def aggregate(replicates: list[Row]) -> list[Row]:
    """A method's rows over its replicates: one per reported epoch (selected on validation, last epoch), or one
    where every replicate reports one epoch the same way; each with its fields over the replicates as declared,
    every metric's mean, the spread of the headline score and the replicates' own scores."""
    by_seed: dict[Any, list[Row]] = {}
    for row in replicates:
        by_seed.setdefault(row.seed, []).append(row)
    firsts = [rows[0] for rows in by_seed.values()]
    if all(len(rows) == 1 for rows in by_seed.values()) and len({r.selection for r in firsts}) == 1:
        groups = [firsts]
    else:
        def pick(rows: list[Row], choice: EpochChoice) -> Row:
            return next(r for r in rows if r.selection in (choice, EpochChoice.SELECTED_IS_LAST))

        groups = [[pick(rows, choice) for rows in by_seed.values()] for choice in (EpochChoice.SELECTED, EpochChoice.LAST)]
        for group, choice in zip(groups, (EpochChoice.SELECTED, EpochChoice.LAST)):
            group[0] = _with(group[0], selection=choice)
    return [_over(group) for group in groups]


def _with(row: Row, **changes: Any) -> Row:
    return Row(**{**{f.name: getattr(row, f.name) for f in fields(row)}, **changes})


def _over(group: list[Row]) -> Row:
    first = group[0]
    values: dict[str, Any] = {}
    for f in fields(Row):
        how = f.metadata.get("over_replicates")
        numbers = [getattr(r, f.name) for r in group]
        if how == "drop":
            values[f.name] = None
        elif how in ("mean", "max"):
            present = all(isinstance(v, (int, float)) for v in numbers)
            values[f.name] = (sum(numbers) / len(numbers) if how == "mean" else max(numbers)) if present else None
        else:
            values[f.name] = getattr(first, f.name)
    summary = spread([r.per_question for r in group])
    names = [name for name in first.scores if all(name in r.scores for r in group)]
    values["scores"] = {name: sum(r.scores[name] for r in group) / len(group) for name in names}
    values["scores"][first.metric] = summary.mean
    values.update(spread=summary.to_dict(), seeds=[r.seed for r in group], replicate_scores=[r.score for r in group],
                  epochs_reported=[r.epoch for r in group] if first.selection is not None else None)
    return Row(**values)


def efficiency_point(method: str, samples: int, epochs: int, selected_epochs: list[int], metric: str,
                     per_question: list[list[float]], train_seconds: list[float]) -> dict[str, Any]:
    """One point of the data-efficiency curve: the score of a method trained on `samples` examples, over seeds."""
    summary = spread(per_question)
    return {"method": method, "samples": samples, "epochs": epochs, "selected_epochs": selected_epochs,
            "metric": metric, "score": summary.mean, "spread": summary.to_dict(),
            "train_seconds": sum(train_seconds) / len(train_seconds)}


def schema() -> dict[str, Any]:
    """The JSON schema of results.json."""
    return json.loads(SCHEMA.read_text())


__all__ = ["EpochChoice", "Row", "SCHEMA", "SCHEMA_VERSION", "aggregate", "efficiency_point", "schema", "scores_of"]
