"""Prompters: how a query is shown to the model, the task side of a method (like lm-evaluation-harness's
few-shot context). Zero-shot shows the query alone; k-shot puts k demonstrations in front of it, drawn at random
or retrieved by similarity."""

from __future__ import annotations

import random
import zlib
from typing import Callable

import torch

from .backbones import Backbone
from .core.validate import choice, integer
from .tasks import Example, Segment, Task


class Prompter:
    """The base prompter: the query prompt alone (zero-shot)."""

    def __init__(self, task: Task):
        self.task = task

    def prompt(self, example: Example) -> list[Segment]:
        """The segments the model sees for `example` (without its answer)."""
        return self.task.query_prompt(example)

    @property
    def shots(self) -> int:
        return 0

    @property
    def labelled_used(self) -> int:
        """How many distinct labelled examples the prompts shown so far held (demonstrations)."""
        return 0


class KShot(Prompter):
    """k demonstrations from the training split, formatted exactly as the query prompt with the answer filled in
    (the task's target: the majority answer for VQA), then the query. With k = 0 the prompt is the zero-shot one.

    Args:
        shots: k.
        selection: "random" (seeded per query, the same whatever the batch) or "retrieval" (RICES-style: the k
            pool examples nearest to the query by cosine similarity of their features, the nearest last, i.e.
            closest to the query).
        pool_size: draw demonstrations from the first N of a seeded shuffle of train (None: all of train for
            random, 1000 for retrieval, whose features are computed once per pool example).
        features: for retrieval, "model" (the backbone's last hidden state, mean-pooled over the prompt: image and
            question) or a callable ``features(list[Example]) -> Tensor[n, dim]``.
        data_seed: which examples form the pool (the run's data seed); demos_seed: the random draws.
    """

    def __init__(self, task: Task, backbone: Backbone | None, shots: int, selection: str = "random",
                 pool_size: int | None = None, features: str | Callable[[list[Example]], torch.Tensor] = "model",
                 data_seed: int = 0, demos_seed: int = 0):
        super().__init__(task)
        self._shots = integer(shots, "icl: shots", minimum=0)
        self.selection = choice(selection, "icl: selection", ("random", "retrieval"))
        integer(pool_size, "icl: pool_size", allow_none=True)
        if features != "model" and not callable(features):
            raise ValueError(f"icl: features must be 'model' or a callable, got {features!r}.")
        self.backbone, self.features, self.demos_seed = backbone, features, demos_seed
        if pool_size is None and selection == "retrieval":
            pool_size = 1000
        self.pool = task.subset("train", pool_size, data_seed) if pool_size else list(task.splits["train"])
        if len(self.pool) < shots:
            raise ValueError(f"icl: {shots} shots but only {len(self.pool)} training examples.")
        self._pool_features: torch.Tensor | None = None
        self.draw = 0  # a later draw of random demonstrations (e.g. a teacher's next epoch)
        self.used: set[str] = set()  # the ids of the demonstrations shown so far

    @property
    def shots(self) -> int:
        return self._shots

    @property
    def labelled_used(self) -> int:
        return len(self.used)

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
        """The same demonstrations for a query (and `draw`) whatever the batch or order it comes in."""
        if self.selection == "retrieval":
            return self._nearest(example)
        key = f"{self.demos_seed}:{example.id}" if not self.draw else f"{self.demos_seed}:{self.draw}:{example.id}"
        rng = random.Random(zlib.crc32(key.encode()))
        if sum(candidate.id != example.id for candidate in self.pool) < self._shots:
            raise ValueError(f"icl: {self._shots} demonstrations for {example.id!r} but the pool holds only "
                             f"{len(self.pool)} examples, the query among them: draw queries from outside the pool.")
        chosen: list[Example] = []
        while len(chosen) < self._shots:
            candidate = self.pool[rng.randrange(len(self.pool))]
            if candidate.id != example.id and candidate not in chosen:
                chosen.append(candidate)
        return chosen

    def _nearest(self, example: Example) -> list[Example]:
        if self._pool_features is None:
            self._pool_features = self.embed(self.pool)
        similarity = self._pool_features @ self.embed([example])[0]
        order = [int(i) for i in torch.argsort(similarity, descending=True) if self.pool[int(i)].id != example.id]
        return [self.pool[i] for i in reversed(order[: self._shots])]

    def prompt(self, example: Example) -> list[Segment]:
        segments: list[Segment] = []
        for demo in self.demonstrations(example):
            self.used.add(demo.id)
            segments += self.task.demonstration(demo)
        return segments + self.task.query_prompt(example)
