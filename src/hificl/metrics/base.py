"""`Metric`: a score by name, with what results need to know of it (corpus-level or not, which direction is
better, how to show it), and the registry of metrics."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

from ..registry import Registry

PerExample = Callable[[str, Sequence[str]], float]
Corpus = Callable[[Mapping[Hashable, str], Mapping[Hashable, Sequence[str]]], tuple[float, dict[Hashable, float]]]


class MetricUnavailableError(ImportError, RuntimeError):
    """A metric cannot run on this machine (a missing package or program); the message says how to install it.
    (An ImportError and a RuntimeError both, so code that caught either before still catches it.)"""


@dataclass(frozen=True)
class Metric:
    """A metric of generated answers against references.

    Attributes:
        name: its key in results and configs (e.g. "vqa_accuracy").
        title: how tables and plots name it.
        per_example: ``(prediction, references) -> score``, or None for a metric scored only over a whole set.
        corpus: ``({id: prediction}, {id: references}) -> (score, {id: score})`` for corpus-level metrics (CIDEr-D:
            its idf weights come from the whole set); None for per-example metrics (the set's score is the mean).
        higher_is_better: the direction that picks the best epoch.
        percent: shown as a percentage (fractions in [0, 1]); otherwise as a plain number.
        check: a pre-flight that raises `MetricUnavailableError` when the metric cannot run here (run before any
            training).
        computed: False for metrics a task reports beside its headline metric (CHAIR on captions): they have a
            name, a direction and a display, but no scoring function of their own here.
    """

    name: str
    title: str
    per_example: PerExample | None = None
    corpus: Corpus | None = None
    higher_is_better: bool = True
    percent: bool = True
    check: Callable[[], None] | None = None
    computed: bool = True

    @property
    def corpus_level(self) -> bool:
        return self.corpus is not None

    def format(self, value: float | None) -> str:
        if value is None:
            return "-"
        return f"{value:.2%}" if self.percent else f"{value:.4f}"

    def scale(self, value: float) -> float:
        """The value as plotted: x100 for percentages."""
        return 100 * value if self.percent else value

    def score(self, predictions: Sequence[str], references: Sequence[Sequence[str]],
              ids: Sequence[Hashable]) -> tuple[float, list[float]]:
        """The set's score and one score per prediction, in order."""
        if not self.computed:
            raise ValueError(f"Metric {self.name!r} is reported by its task; it has no scoring function of its own.")
        if len(predictions) != len(references) or len(ids) != len(predictions):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references.")
        if self.corpus is not None:
            if len(set(ids)) != len(ids):
                raise ValueError(f"Example ids must be unique to score {self.name}.")
            score, per_id = self.corpus(dict(zip(ids, predictions)), dict(zip(ids, references)))
            return score, [per_id[i] for i in ids]
        scores = [self.per_example(p, list(r)) for p, r in zip(predictions, references)]
        return sum(scores) / len(scores), scores


METRICS: Registry[Metric] = Registry("metric")


def register_metric(metric: Metric, replace: bool = False) -> Metric:
    return METRICS.register(metric.name, metric, replace=replace)


def get_metric(name: str) -> Metric:
    return METRICS.get(name)
