"""Evaluation metrics by name: VQA accuracy, exact match, CIDEr-D, and CHAIR (reported by caption tasks).

`get_metric(name)` gives a `Metric` (see `hificl.metrics.base`): how it scores, whether it is corpus-level,
which direction is better and how it is shown. ``cider_d`` additionally needs ``pycocoevalcap`` and a Java
runtime, checked by its pre-flight (`Metric.check`) before any training.
"""

from __future__ import annotations

from .base import METRICS, Metric, MetricUnavailableError, get_metric, register_metric
from .chair import COCO_CATEGORIES, canonical_category, chair, extract_objects
from .cider import cider_d, require_cider
from .vqa import DEFAULT_STOP_STRINGS, exact_match, normalize_answer, postprocess_generation, vqa_accuracy

for _metric in (
    Metric("vqa_accuracy", "VQA accuracy", per_example=vqa_accuracy),
    Metric("exact_match", "exact match", per_example=exact_match),
    Metric("cider_d", "CIDEr-D", corpus=cider_d, percent=False, check=require_cider),
    Metric("chair_s", "CHAIR_s", higher_is_better=False, computed=False),
    Metric("chair_i", "CHAIR_i", higher_is_better=False, computed=False),
    Metric("chair_recall", "object recall", computed=False),
):
    register_metric(_metric)

__all__ = [
    "COCO_CATEGORIES", "DEFAULT_STOP_STRINGS", "METRICS", "Metric", "MetricUnavailableError", "canonical_category",
    "chair", "cider_d", "exact_match", "extract_objects", "get_metric", "normalize_answer", "postprocess_generation",
    "register_metric", "require_cider", "vqa_accuracy",
]
