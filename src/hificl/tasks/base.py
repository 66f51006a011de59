"""Tasks: examples, prompts and metrics. A task knows nothing of models or methods.

A prompt is a list of *segments*: text strings and `ImageRef`s. Backbones turn segments into model inputs with
their own image placeholder, so one task serves any model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from PIL import Image

from ..metrics import get_metric, postprocess_generation

DEFAULT_TEMPLATE = "{image}Question: {question}\nAnswer:"
DEFAULT_STOP = ("\n", "Question", "Answer", "Image", "Short")


@dataclass(frozen=True)
class ImageRef:
    """An image by path, opened when a backbone encodes it."""

    path: str

    def load(self) -> Image.Image:
        try:
            with Image.open(self.path) as image:
                return image.convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"Image not found: {self.path}. Fix the path in the task data.") from None
        except OSError as error:
            raise ValueError(f"Cannot read image {self.path}: {error}. Replace or remove that example.") from None


Segment = Union[str, ImageRef]


@dataclass(frozen=True)
class Example:
    """One query: an optional image, the question (or prompt text) and its reference answers.

    `answers` holds every acceptable answer (e.g. VQA's 10 annotators); `target` is the single answer used for
    training and for in-context demonstrations (the majority answer unless the data gives one).
    """

    id: str
    question: str
    answers: tuple[str, ...]
    image: ImageRef | None = None
    target: str = ""

    def __post_init__(self):
        if not self.answers:
            raise ValueError(f"Example {self.id!r} has no answer.")
        if not self.target:
            object.__setattr__(self, "target", majority_answer(self.answers))


def majority_answer(answers) -> str:
    """The most frequent answer; ties go to the one seen first."""
    counts: dict[str, int] = {}
    for answer in answers:
        counts[answer] = counts.get(answer, 0) + 1
    return max(counts, key=lambda a: counts[a])


@dataclass
class Task:
    """A task's data splits, prompt format and metric.

    Attributes:
        name: the task's name in results.
        splits: "train", "validation" and "test" lists of examples.
        template: the query prompt, with `{question}` and optionally `{image}` (where the image goes).
        answer_prefix: put between the prompt and the answer in demonstrations and training targets.
        answer_suffix: ends an answer (the generation stops there).
        metric: a name from `hificl.metrics.METRICS`.
        stop_strings: generation is cut at the first of these.
        max_new_tokens: generation budget.
    """

    name: str
    splits: dict[str, list[Example]]
    template: str = DEFAULT_TEMPLATE
    answer_prefix: str = " "
    answer_suffix: str = "\n"
    metric: str = "vqa_accuracy"
    stop_strings: tuple[str, ...] = DEFAULT_STOP
    max_new_tokens: int = 20
    _metric_fn: object = field(init=False, repr=False)

    def __post_init__(self):
        if "{question}" not in self.template:
            raise ValueError(f"Task {self.name!r}: the template must contain '{{question}}', got {self.template!r}.")
        self._metric_fn = get_metric(self.metric)
        for split in ("train", "test"):
            if not self.splits.get(split):
                raise ValueError(f"Task {self.name!r} has no {split!r} examples.")

    def query_prompt(self, example: Example) -> list[Segment]:
        """The prompt that asks `example`'s question."""
        before, _, after = self.template.partition("{image}")
        if "{image}" not in self.template:
            before, after = "", self.template
        segments: list[Segment] = []
        if before:
            segments.append(before.format(question=example.question))
        if example.image is not None:
            segments.append(example.image)
        segments.append(after.format(question=example.question))
        return segments

    def target_text(self, example: Example) -> str:
        """What the model must produce after the prompt: prefix, answer, suffix."""
        return f"{self.answer_prefix}{example.target}{self.answer_suffix}"

    def demonstration(self, example: Example) -> list[Segment]:
        """`example` as an in-context demonstration: its prompt with the answer filled in."""
        return self.query_prompt(example) + [self.target_text(example)]

    def postprocess(self, generation: str) -> str:
        return postprocess_generation(generation, self.stop_strings)

    def score(self, prediction: str, example: Example) -> float:
        return self._metric_fn(prediction, list(example.answers))

    def subset(self, split: str, limit: int | None = None, seed: int = 3407) -> list[Example]:
        """The first `limit` examples of a seeded shuffle of `split` (all of them, shuffled, if no limit)."""
        if split not in self.splits:
            raise ValueError(f"Task {self.name!r} has no split {split!r}; it has {sorted(self.splits)}.")
        examples = list(self.splits[split])
        random.Random(seed).shuffle(examples)
        return examples if limit is None else examples[:limit]


def split_off_validation(train: list[Example], size: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out `size` examples of a seeded shuffle of `train` for validation (epoch selection)."""
    examples = list(train)
    random.Random(seed).shuffle(examples)
    return examples[size:], examples[:size]


def existing_path(path: str | Path, where: str) -> str:
    """`path` as a string if the file exists, else a FileNotFoundError naming `where` it came from."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{where}: image file not found: {path}")
    return str(path)
