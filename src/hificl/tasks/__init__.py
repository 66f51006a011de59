"""Task registry: `get_task(name, **options)` builds a `Task` by name."""

from __future__ import annotations

from typing import Callable

from .base import (CORPUS_METRICS, DEFAULT_TEMPLATE, Answer, CorpusScore, Example, ImageRef, Instruction, Segment,
                   Task, majority_answer)
from .capitals import capitals_task
from .coco import CaptionTask, coco_captions_task, read_karpathy
from .easyvqa import easyvqa_task
from .jsonl import jsonl_task, read_jsonl
from .vqav2 import okvqa_task, read_vqa, vqav2_task

TASKS: dict[str, Callable[..., Task]] = {"easy-vqa": easyvqa_task, "jsonl": jsonl_task, "vqav2": vqav2_task,
                                         "ok-vqa": okvqa_task, "coco-captions": coco_captions_task,
                                         "capitals": capitals_task}


def register_task(name: str, factory: Callable[..., Task]) -> None:
    TASKS[name] = factory


def get_task(name: str, **options) -> Task:
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; known tasks: {sorted(TASKS)} (or register_task()).")
    try:
        return TASKS[name](**options)
    except TypeError as error:
        raise ValueError(f"Task {name!r}: bad option(s) {sorted(options)}: {error}") from None


__all__ = ["Answer", "CORPUS_METRICS", "CaptionTask", "CorpusScore", "DEFAULT_TEMPLATE", "Example", "ImageRef",
           "Instruction", "Segment", "Task", "TASKS", "capitals_task", "coco_captions_task", "easyvqa_task", "get_task", "jsonl_task",
           "majority_answer", "okvqa_task", "read_jsonl", "read_karpathy", "read_vqa", "register_task", "vqav2_task"]
