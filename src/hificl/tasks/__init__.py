"""Task registry: `get_task(name, **options)` builds a `Task` by name."""

from __future__ import annotations

from typing import Callable

from .base import DEFAULT_TEMPLATE, Example, ImageRef, Segment, Task, majority_answer
from .easyvqa import easyvqa_task
from .jsonl import jsonl_task, read_jsonl

TASKS: dict[str, Callable[..., Task]] = {"easy-vqa": easyvqa_task, "jsonl": jsonl_task}


def register_task(name: str, factory: Callable[..., Task]) -> None:
    TASKS[name] = factory


def get_task(name: str, **options) -> Task:
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; known tasks: {sorted(TASKS)} (or register_task()).")
    try:
        return TASKS[name](**options)
    except TypeError as error:
        raise ValueError(f"Task {name!r}: bad option(s) {sorted(options)}: {error}") from None


__all__ = ["DEFAULT_TEMPLATE", "Example", "ImageRef", "Segment", "Task", "TASKS", "get_task", "jsonl_task",
           "majority_answer", "read_jsonl", "register_task", "easyvqa_task"]
