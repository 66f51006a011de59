"""Task registry: `get_task(name, **options)` builds a `Task` by name.

A task factory takes its options and ``seed``, the run's data seed (`hificl.seeding`): the pipeline passes it,
so a task config never states a seed of its own."""

from __future__ import annotations

import inspect
from typing import Callable

from ..core.validate import unknown_options
from ..registry import Registry
from .base import (DEFAULT_TEMPLATE, Answer, CorpusScore, Example, ImageRef, Instruction, Query, Segment, Task,
                   majority_answer, unlabelled)
from .capitals import capitals_task
from .coco import CaptionTask, coco_captions_task, read_karpathy
from .easyvqa import easyvqa_task
from .jsonl import jsonl_task, read_jsonl
from .vqav2 import okvqa_task, read_vqa, vqav2_task

TASKS: Registry[Callable[..., Task]] = Registry("task")
for _name, _factory in (("easy-vqa", easyvqa_task), ("jsonl", jsonl_task), ("vqav2", vqav2_task),
                        ("ok-vqa", okvqa_task), ("coco-captions", coco_captions_task), ("capitals", capitals_task)):
    TASKS.register(_name, _factory)


def register_task(name: str, factory: Callable[..., Task], replace: bool = False) -> None:
    """Serve `factory(seed=..., **options) -> Task` as task `name` (see `hificl.tasks` for the seed). Options
    beyond the factory's named parameters (its ``**options``) must be `Task` fields, or be listed in
    ``factory.extra_options``: anything else is refused before the factory runs."""
    TASKS.register(name, factory, replace=replace)


def get_task(name: str, *, seed: int, **options) -> Task:
    """The task `name` built with `options` and the run's data `seed` (which examples a task holds out of train
    for validation; `hificl.seeding`)."""
    factory = TASKS.get(name)
    if "seed" in options:
        raise ValueError(f"Task {name!r}: 'seed' is not a task option: the run's `seed` is the task's data seed.")
    accepted = inspect.signature(factory).parameters
    passes_on = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    seeded = "seed" in accepted or passes_on
    known = {n for n, p in accepted.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"seed"}
    if passes_on:  # a factory's further options are `Task` fields, and any it names in `extra_options`
        known |= set(Task.__dataclass_fields__) - {"name", "splits"} | set(getattr(factory, "extra_options", ()))
    if set(options) - known:
        raise ValueError(unknown_options(f"Task {name!r}", options, known))
    missing = [n for n, p in accepted.items() if p.default is p.empty and p.kind is not p.VAR_KEYWORD
               and n not in options and n != "seed"]
    if missing:
        raise ValueError(f"Task {name!r} needs option(s) {missing} (e.g. --set task.{missing[0]}=...).")
    return factory(**options, **({"seed": seed} if seeded else {}))


__all__ = ["Answer", "CaptionTask", "CorpusScore", "DEFAULT_TEMPLATE", "Example", "ImageRef",
           "Instruction", "Query", "Segment", "Task", "TASKS", "capitals_task", "coco_captions_task", "easyvqa_task", "get_task", "jsonl_task",
           "majority_answer", "okvqa_task", "unlabelled", "read_jsonl", "read_karpathy", "read_vqa", "register_task", "vqav2_task"]
