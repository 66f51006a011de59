"""Measurements of the embedded VLM on easy-VQA TEST images, through the library's tasks, prompters, evaluator
and metrics (greedy decoding throughout):

* ``see``: asked "Describe the image.", does the reply name the right colour and shape?
* ``multi_image``: the same for the LAST of 4..8 images whose earlier images carry their descriptions in the
  context (does the model read the right image?).
* ``icl``: the main job's own zero-shot and k-shot rows (`hificl compare`'s packaged config, its test questions,
  prompts, demonstrations and metric), so the build and the README report one curve.
"""

from __future__ import annotations

import random
import re
from collections import Counter

from hificl.evaluator import GenerationConfig, evaluate
from hificl.metrics import Metric, register_metric
from hificl.methods import get_method
from hificl.prompting import Prompter
from hificl.run_config import load_run_config
from hificl.seeding import Seeds
from hificl.tasks import Example, ImageRef, Task, get_task

from .labels import COLORS, SHAPES, Split
from .stages import TEMPLATE

MAIN_CONFIG = "embedded-easyvqa"
DESCRIBE = "Describe the image."


def mentions(reply: str, vocabulary) -> list[str]:
    """Colour or shape words of a reply, in order ("grey" = gray, "square" = rectangle)."""
    words = re.findall(r"[a-z]+", reply.lower())
    words = ["gray" if w == "grey" else "rectangle" if w in ("square", "rectangular") else w for w in words]
    return [w for w in words if w in vocabulary]


def names_correctly(reply: str, color: str, shape: str, strict: bool = False) -> bool:
    """The first colour and the first shape the reply names are right (``strict``: and it names no other
    colour or shape)."""
    colors, shapes = mentions(reply, COLORS), mentions(reply, SHAPES)
    if strict:
        return set(colors) == {color} and set(shapes) == {shape}
    return colors[:1] == [color] and shapes[:1] == [shape]


NAMES_COLOR_AND_SHAPE = register_metric(Metric(
    "names_color_and_shape", "colour and shape named",
    per_example=lambda reply, answers: float(names_correctly(reply, answers[0], answers[1]))), replace=True)


class FixedDemos(Prompter):
    """Demonstrations chosen per query beforehand (here: the earlier images of a multi-image sequence)."""

    def __init__(self, task: Task, demos: dict[str, list[Example]]):
        super().__init__(task)
        self.demos = demos

    def prompt(self, example: Example):
        return [s for demo in self.demos[example.id] for s in self.task.demonstration(demo)] + self.task.query_prompt(example)


def _description_task(examples: list[Example]) -> Task:
    return Task("easy-vqa descriptions", {"train": examples, "test": examples}, template=TEMPLATE,
                metric=NAMES_COLOR_AND_SHAPE.name, stop_strings=("\n",), answer_suffix="\n\n", max_new_tokens=20)


def _describe(split: Split, image_id: int, target: str = "") -> Example:
    return Example(f"{split.name}-image-{image_id}", DESCRIBE, (split.colors[image_id], split.shapes[image_id]),
                   ImageRef(split.paths[image_id]), target=target or "-")


def see(backbone, split: Split, limit: int | None = None) -> dict:
    examples = [_describe(split, i) for i in split.image_ids[:limit]]
    task = _description_task(examples)
    result = evaluate(backbone.model, Prompter(task), backbone, task, examples,
                      GenerationConfig(batch_size=50, max_new_tokens=12), progress=False)
    replies = [p["prediction"] for p in result.predictions]
    truth = [(e.answers[0], e.answers[1]) for e in examples]
    n = len(examples)
    return {"accuracy": result.metrics[task.metric],
            "accuracy_strict": sum(names_correctly(r, c, s, strict=True) for r, (c, s) in zip(replies, truth)) / n,
            "color_accuracy": sum(mentions(r, COLORS)[:1] == [c] for r, (c, _) in zip(replies, truth)) / n,
            "shape_accuracy": sum(mentions(r, SHAPES)[:1] == [s] for r, (_, s) in zip(replies, truth)) / n,
            "n_images": n, "criterion": "first colour and first shape named are right (strict: no other named)",
            "seconds_per_image": result.metrics["seconds_per_query"],
            "examples": [{"truth": f"{c} {s}", "reply": r} for r, (c, s) in list(zip(replies, truth))[:5]]}


def multi_image(backbone, split: Split, n_sequences: int = 64, seed: int = 0) -> dict:
    rng = random.Random(seed)
    queries, demos, previous = [], {}, {}
    for index in range(n_sequences):
        ids = rng.sample(split.image_ids, rng.randint(4, 8))
        query = _describe(split, ids[-1])
        query = Example(f"sequence-{index}", query.question, query.answers, query.image)
        demos[query.id] = [_describe(split, i, f"The image shows a {split.description(i)}.") for i in ids[:-1]]
        previous[query.id] = (split.colors[ids[-2]], split.shapes[ids[-2]])
        queries.append(query)
    task = _description_task(queries)
    result = evaluate(backbone.model, FixedDemos(task, demos), backbone, task, queries,
                      GenerationConfig(batch_size=8, max_new_tokens=20), progress=False)
    copied = [names_correctly(p["prediction"], *previous[q.id]) and previous[q.id] != tuple(q.answers)
              for p, q in zip(result.predictions, queries)]
    return {"last_image_accuracy": result.metrics[task.metric], "n_sequences": n_sequences,
            "images_per_sequence": "4-8", "described_previous_image_instead": sum(copied) / n_sequences}


def icl(backbone, shots=(0, 1, 2, 4, 8)) -> dict:
    """Zero-shot and k-shot exact match on the main job's test questions, as `hificl compare` measures them."""
    config = load_run_config(MAIN_CONFIG)
    seeds = Seeds(config.seed, config.seed)
    task = get_task(config.task["name"], seed=seeds.data, **{k: v for k, v in config.task.items() if k != "name"})
    queries = task.subset("test", config.test_samples, seeds.data)
    majority = Counter(e.target for e in task.splits["train"]).most_common(1)[0][0]
    result = {"config": MAIN_CONFIG, "n_questions": len(queries), "majority_answer": majority,
              "majority_rate": sum(q.target == majority for q in queries) / len(queries), "shots": {}}
    for k in shots:
        prompter = get_method("icl", shots=k).prompter(backbone, task, seeds) if k else Prompter(task)
        evaluation = evaluate(backbone.model, prompter, backbone, task, queries, config.eval, progress=False,
                              desc=f"{k}-shot")
        hits = [p["score"] for p in evaluation.predictions]
        yes_no = [h for h, q in zip(hits, queries) if q.target in ("yes", "no")]
        other = [h for h, q in zip(hits, queries) if q.target not in ("yes", "no")]
        if k == 0:  # SmolLM2's own style: full sentences, not the task's one-word answers
            result["zero_shot_verbose_rate"] = sum(
                len(p["raw"].split("\n", 1)[0].split()) >= 3 for p in evaluation.predictions) / len(queries)
        result["shots"][str(k)] = {
            "accuracy": evaluation.metrics[task.metric], "yes_no_accuracy": sum(yes_no) / max(1, len(yes_no)),
            "color_shape_accuracy": sum(other) / max(1, len(other)),
            "seconds_per_query": evaluation.metrics["seconds_per_query"],
            "examples": [{"question": p["question"], "answer": p["answers"][0], "reply": p["prediction"]}
                         for p in evaluation.predictions[:6]],
        }
    return result
