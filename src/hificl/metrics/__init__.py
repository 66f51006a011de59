"""Evaluation metrics: VQA accuracy, exact match, CIDEr-D and CHAIR.

Self-contained: nothing here imports from the rest of ``hificl``.
``cider_d`` additionally needs ``pycocoevalcap`` and a Java runtime, both
checked only when it is called.

``METRICS`` maps names to per-example scorers ``(prediction, answers) -> float``
for answer-style tasks; corpus metrics (``cider_d``, ``chair``) have their own
signatures and are not in the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .chair import COCO_CATEGORIES, canonical_category, chair, extract_objects
from .cider import cider_d
from .vqa import exact_match, normalize_answer, postprocess_generation, vqa_accuracy

__all__ = [
    "normalize_answer",
    "vqa_accuracy",
    "exact_match",
    "postprocess_generation",
    "cider_d",
    "chair",
    "extract_objects",
    "canonical_category",
    "COCO_CATEGORIES",
    "METRICS",
    "get_metric",
]

PerExampleMetric = Callable[[str, Sequence[str]], float]

METRICS: dict[str, PerExampleMetric] = {
    "vqa_accuracy": vqa_accuracy,
    "exact_match": exact_match,
}


def get_metric(name: str) -> PerExampleMetric:
    """Look up a per-example metric by name.

    Raises:
        ValueError: for an unknown name; the message lists the known ones.
    """
    try:
        return METRICS[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(METRICS))
        raise ValueError(f"unknown metric {name!r}; known metrics: {known}") from None
