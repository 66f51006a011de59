"""Tasks: examples, prompts and metrics. A task knows nothing of models or methods.

A prompt is a list of *segments*: text strings and `ImageRef`s. Backbones turn segments into model inputs with
their own image placeholder, so one task serves any model. Two kinds of text segment carry structure that a
backbone with a chat template needs: an `Instruction` (stated once, at the start of the prompt) and an `Answer`
(a demonstration's answer: the assistant's turn). Both are plain strings to everything else.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence, Union

from PIL import Image

from ..metrics import DEFAULT_STOP_STRINGS, Metric, get_metric, postprocess_generation

DEFAULT_TEMPLATE = "{image}Question: {question}\nAnswer:"


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


class Instruction(str):
    """The task's instruction. Backbones put it first in the prompt, once, even when it comes after
    demonstrations in the segment list (a query prompt starts with it; demonstrations do not repeat it)."""


class Answer(str):
    """An answer as it follows its prompt: ``prefix + text + suffix`` as a string (a base prompt shows it so),
    with the bare answer in `text` (what a chat template puts in the assistant's turn)."""

    text: str
    prefix: str
    suffix: str

    def __new__(cls, text: str, prefix: str = " ", suffix: str = "\n") -> "Answer":
        answer = super().__new__(cls, f"{prefix}{text}{suffix}")
        answer.text, answer.prefix, answer.suffix = text, prefix, suffix
        return answer

    def __reduce__(self):
        return Answer, (self.text, self.prefix, self.suffix)


Segment = Union[str, ImageRef]


@dataclass(frozen=True)
class CorpusScore:
    """A metric computed over a whole evaluated set.

    Attributes:
        score: the headline number (for CIDEr-D the corpus score, the mean of the per-example scores).
        per_example: one score per prediction, in order.
        details: further metrics of the set (e.g. CHAIR), written beside the headline number.
    """

    score: float
    per_example: list[float]
    details: dict = field(default_factory=dict)


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


@dataclass(frozen=True)
class Query:
    """A query without its answers: all a method trained on unlabelled data is ever given (a task's prompts need
    only the question and the image)."""

    id: str
    question: str
    image: ImageRef | None = None


def unlabelled(example: Example) -> Query:
    """`example` without its answers."""
    return Query(example.id, example.question, example.image)


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
        template: the query prompt, with `{question}` (optional when no example has a question, e.g. captions)
            and optionally `{image}` (where the image goes).
        answer_prefix: put between the prompt and the answer in demonstrations and training targets.
        answer_suffix: ends an answer (the generation stops there).
        metric: the name of a metric in `hificl.metrics.METRICS` (per-example, or corpus-level like "cider_d",
            which `score_corpus` scores over the whole evaluated set). Its pre-flight runs here, before any training.
        stop_strings: generation is cut at the first of these.
        max_new_tokens: generation budget.
        instruction: text stated once at the start of every prompt (empty: none).
    """

    name: str
    splits: dict[str, list[Example]]
    template: str = DEFAULT_TEMPLATE
    answer_prefix: str = " "
    answer_suffix: str = "\n"
    metric: str = "vqa_accuracy"
    stop_strings: tuple[str, ...] = DEFAULT_STOP_STRINGS
    max_new_tokens: int = 20
    instruction: str = ""

    def __post_init__(self):
        for split in ("train", "test"):
            if not self.splits.get(split):
                raise ValueError(f"Task {self.name!r} has no {split!r} examples.")
        if "{question}" not in self.template and any(e.question for examples in self.splits.values() for e in examples):
            raise ValueError(f"Task {self.name!r}: the template must contain '{{question}}', got {self.template!r}.")
        metric = self.scorer
        if not metric.computed:
            raise ValueError(f"Task {self.name!r}: {self.metric!r} is reported beside a task's metric, it cannot be "
                             "the metric itself.")
        if metric.check is not None:
            metric.check()

    @property
    def scorer(self) -> Metric:
        """The task's `Metric`."""
        return get_metric(self.metric)

    def reported_metrics(self, examples: Sequence[Example]) -> list[str]:
        """The names of the metrics `score_corpus` reports for `examples`: the task's metric first."""
        return [self.metric]

    def query_prompt(self, example: Example) -> list[Segment]:
        """The prompt that asks `example`'s question, opened by the instruction (if any)."""
        prompt = self._body(example)
        return [Instruction(self.instruction)] + prompt if self.instruction else prompt

    def _body(self, example: Example) -> list[Segment]:
        before, _, after = self.template.partition("{image}")
        if "{image}" not in self.template:
            before, after = "", self.template
        segments: list[Segment] = []
        if before:
            segments.append(before.format(question=example.question))
        if example.image is not None:
            segments.append(example.image)
        if after:
            segments.append(after.format(question=example.question))
        return segments

    def target_text(self, example: Example) -> Answer:
        """What the model must produce after the prompt: prefix, answer, suffix."""
        return Answer(example.target, self.answer_prefix, self.answer_suffix)

    def demonstration(self, example: Example) -> list[Segment]:
        """`example` as an in-context demonstration: its prompt (without the instruction, which opens the whole
        prompt once) with the answer filled in."""
        return self._body(example) + [self.target_text(example)]

    def postprocess(self, generation: str) -> str:
        return postprocess_generation(generation, self.stop_strings)

    def score(self, prediction: str, example: Example) -> float | None:
        """The per-example score; None under a corpus metric (see `score_corpus`)."""
        metric = self.scorer
        return None if metric.corpus_level else metric.per_example(prediction, list(example.answers))

    def score_corpus(self, predictions: Sequence[str], examples: Sequence[Example]) -> CorpusScore:
        """Score a whole evaluated set: the mean of per-example scores, or the corpus metric (CIDEr-D over the
        set, the references being each example's `answers`)."""
        if len(predictions) != len(examples):
            raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples.")
        score, per_example = self.scorer.score(predictions, [e.answers for e in examples], [e.id for e in examples])
        return CorpusScore(score, per_example)

    def subset(self, split: str, limit: int | None, seed: int) -> list[Example]:
        """The first `limit` examples of a shuffle of `split` seeded by `seed` (all of them, shuffled, if `limit`
        is None)."""
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
