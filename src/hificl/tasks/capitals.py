"""Country -> capital: 170 real facts shipped with the package, a small text task on which the embedded
SmolLM2-135M-Instruct learns the answer format in context (it knows most capitals but, asked zero-shot in this
format, rambles). A seeded split into train / validation / test."""

from __future__ import annotations

import random
from pathlib import Path

from .base import Task
from .jsonl import read_jsonl

DATA = Path(__file__).with_name("data") / "capitals.jsonl"


def capitals_task(test_size: int = 60, validation_size: int = 20, *, seed: int, **task_options) -> Task:
    examples = read_jsonl(DATA)
    if test_size + validation_size >= len(examples):
        raise ValueError(f"capitals: test_size + validation_size must leave training examples (of {len(examples)}).")
    random.Random(seed).shuffle(examples)
    splits = {"test": examples[:test_size], "validation": examples[test_size:test_size + validation_size],
              "train": examples[test_size + validation_size:]}
    task_options.setdefault("template", "Country: {question}\nCapital:")
    task_options.setdefault("metric", "exact_match")
    task_options.setdefault("stop_strings", ("\n",))
    task_options.setdefault("max_new_tokens", 8)
    return Task("capitals", splits, **task_options)
