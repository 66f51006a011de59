"""Zero-shot and k-shot in-context learning: demonstrations (image, question, answer) in front of the query."""

from __future__ import annotations

import random
import zlib
from typing import Any

from ..tasks import Example, Segment
from .base import Method


class ZeroShot(Method):
    """The query prompt alone."""

    name = "zero-shot"


class InContext(Method):
    """k demonstrations drawn at random (seeded per query) from the training split, formatted exactly as the
    query prompt with the answer filled in. With k = 0 the prompt is the zero-shot prompt."""

    name = "icl"

    def __init__(self, shots: int = 8, **options: Any):
        super().__init__(**options)
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
            raise ValueError(f"icl: shots must be an int >= 0, got {shots!r}.")
        self.shots = shots
        self.seed = 0
        self.pool: list[Example] = []

    def setup(self, backbone, task, seed: int) -> None:
        super().setup(backbone, task, seed)
        self.seed, self.pool = seed, list(task.splits["train"])
        if len(self.pool) < self.shots:
            raise ValueError(f"icl: {self.shots} shots but only {len(self.pool)} training examples.")

    def demonstrations(self, example: Example) -> list[Example]:
        """The same demonstrations for a query whatever the batch or order it comes in."""
        rng = random.Random(zlib.crc32(f"{self.seed}:{example.id}".encode()))
        chosen: list[Example] = []
        while len(chosen) < self.shots:
            candidate = self.pool[rng.randrange(len(self.pool))]
            if candidate.id != example.id and candidate not in chosen:
                chosen.append(candidate)
        return chosen

    def prompt(self, example: Example) -> list[Segment]:
        segments: list[Segment] = []
        for demo in self.demonstrations(example):
            segments += self.task.demonstration(demo)
        return segments + self.task.query_prompt(example)

    def describe(self) -> dict[str, Any]:
        return {"method": f"{self.shots}-shot ICL", "shots": self.shots}
