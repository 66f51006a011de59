"""Uncertainty of a result: the mean and spread of a method's score over replicates (seeds), and 95% bootstrap
confidence intervals over the test questions and over the replicates.

A method measured on S replicates has a score per test question per replicate, ``scores[s][q]`` (for a corpus
metric such as CIDEr-D, the per-question scores the corpus computation gives, whose mean is the corpus score).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Spread:
    """A score over replicates: the mean, the standard deviation of the replicates' scores (0 for one), and two
    95% percentile-bootstrap intervals of the mean: resampling the test questions (the same resample for every
    replicate), and resampling the replicates and the questions both."""

    mean: float
    std: float
    replicates: int
    ci_questions: tuple[float, float]
    ci_questions_and_seeds: tuple[float, float]

    def to_dict(self) -> dict:
        return asdict(self)


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def spread(scores: Sequence[Sequence[float]], resamples: int = BOOTSTRAP_RESAMPLES, level: float = LEVEL,
           seed: int = 0) -> Spread:
    """The `Spread` of per-question scores ``scores[replicate][question]`` (every replicate scores the same
    questions, in the same order)."""
    table = np.asarray(scores, dtype=np.float64)
    if table.ndim != 2 or table.shape[0] == 0 or table.shape[1] == 0:
        raise ValueError(f"scores must be a non-empty [replicates][questions] table, got shape {table.shape}.")
    if not np.isfinite(table).all():
        raise ValueError("scores hold a non-finite value.")
    replicates, questions = table.shape
    means = table.mean(axis=1)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, questions, size=(resamples, questions))
    over_questions = table[:, rows].mean(axis=2).mean(axis=0)  # [resamples]
    picks = rng.integers(0, replicates, size=(resamples, replicates))
    rows_both = rng.integers(0, questions, size=(resamples, questions))
    both = np.array([table[picks[b]][:, rows_both[b]].mean() for b in range(resamples)])
    std = float(means.std(ddof=1)) if replicates > 1 else 0.0
    return Spread(float(means.mean()), std if math.isfinite(std) else 0.0, replicates,
                  _percentiles(over_questions, level), _percentiles(both, level))
