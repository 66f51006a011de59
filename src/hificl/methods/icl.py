"""Zero-shot and k-shot in-context learning: demonstrations (image, question, answer) in front of the query."""

from __future__ import annotations

import random
import zlib
from typing import Any, Callable

import torch

from ..tasks import Example, Segment
from .base import Method


class ZeroShot(Method):
    """The query prompt alone."""

    name = "zero-shot"


class InContext(Method):
    """k demonstrations from the training split, formatted exactly as the query prompt with the answer filled in
    (the task's target: the majority answer for VQA). With k = 0 the prompt is the zero-shot prompt.

    Options:
        shots: k.
        selection: "random" (seeded per query, the same whatever the batch) or "retrieval" (RICES-style: the k
            pool examples nearest to the query by cosine similarity of their features, the nearest last, i.e.
            closest to the query).
        pool_size: draw demonstrations from the first N of a seeded shuffle of train (None: all of train for
            random, 1000 for retrieval, whose features are computed once per pool example).
        features: for retrieval, "model" (the backbone's last hidden state, mean-pooled over the prompt: image and
            question) or a callable ``features(list[Example]) -> Tensor[n, dim]``.
    """

    name = "icl"

    def __init__(self, shots: int = 8, selection: str = "random", pool_size: int | None = None,
                 features: str | Callable[[list[Example]], torch.Tensor] = "model", **options: Any):
        super().__init__(**options)
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
            raise ValueError(f"icl: shots must be an int >= 0, got {shots!r}.")
        if selection not in ("random", "retrieval"):
            raise ValueError(f"icl: selection must be 'random' or 'retrieval', got {selection!r}.")
        if pool_size is not None and (isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1):
            raise ValueError(f"icl: pool_size must be a positive int or null, got {pool_size!r}.")
        if features != "model" and not callable(features):
            raise ValueError(f"icl: features must be 'model' or a callable, got {features!r}.")
        self.shots, self.selection, self.features = shots, selection, features
        self.pool_size = pool_size if pool_size is not None or selection == "random" else 1000
        self.seed = 0
        self.pool: list[Example] = []
        self._pool_features: torch.Tensor | None = None

    def setup(self, backbone, task, seed: int) -> None:
        super().setup(backbone, task, seed)
        self.seed = seed
        self.pool = task.subset("train", self.pool_size, seed) if self.pool_size else list(task.splits["train"])
        if len(self.pool) < self.shots:
            raise ValueError(f"icl: {self.shots} shots but only {len(self.pool)} training examples.")
        self._pool_features = None

    def embed(self, examples: list[Example]) -> torch.Tensor:
        """L2-normalised features of examples (see `features`)."""
        if callable(self.features):
            features = self.features(examples).float()
        else:
            chunks = []
            model = self.backbone.model
            for start in range(0, len(examples), 8):
                batch = self.backbone.encode([self.task.query_prompt(e) for e in examples[start:start + 8]])
                batch = {k: v.to(self.backbone.device) for k, v in batch.items()}
                with torch.no_grad():
                    hidden = model(**batch, output_hidden_states=True).hidden_states[-1].float()
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                chunks.append(((hidden * mask).sum(1) / mask.sum(1)).cpu())
            features = torch.cat(chunks)
        return torch.nn.functional.normalize(features, dim=-1)

    def demonstrations(self, example: Example) -> list[Example]:
        """The same demonstrations for a query whatever the batch or order it comes in."""
        if self.selection == "retrieval":
            return self._nearest(example)
        rng = random.Random(zlib.crc32(f"{self.seed}:{example.id}".encode()))
        chosen: list[Example] = []
        while len(chosen) < self.shots:
            candidate = self.pool[rng.randrange(len(self.pool))]
            if candidate.id != example.id and candidate not in chosen:
                chosen.append(candidate)
        return chosen

    def _nearest(self, example: Example) -> list[Example]:
        if self._pool_features is None:
            self._pool_features = self.embed(self.pool)
        similarity = self._pool_features @ self.embed([example])[0]
        order = [int(i) for i in torch.argsort(similarity, descending=True) if self.pool[int(i)].id != example.id]
        return [self.pool[i] for i in reversed(order[: self.shots])]

    def prompt(self, example: Example) -> list[Segment]:
        segments: list[Segment] = []
        for demo in self.demonstrations(example):
            segments += self.task.demonstration(demo)
        return segments + self.task.query_prompt(example)

    def describe(self) -> dict[str, Any]:
        label = f"{self.shots}-shot ICL" + (" (retrieved)" if self.selection == "retrieval" else "")
        return {"method": label, "shots": self.shots, "selection": self.selection}
