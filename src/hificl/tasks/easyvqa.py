"""easy-VQA (PyPI package `easy-vqa`, MIT): 64x64 images of one coloured shape, 13 one-word answers.

Train: 38,575 questions on 4,000 images; test: 9,673 questions on 1,000 images. Validation is held out of
train BY IMAGE (a seeded choice of images), so epoch selection never sees a training image.
"""

from __future__ import annotations

import random

from .base import Example, ImageRef, Task


def load_examples(split: str) -> list[Example]:
    """The questions of easy-VQA's "train" or "test" split, in the package's order, each with its image."""
    try:
        import easy_vqa
    except ImportError:
        raise ImportError("The easy-vqa task needs the package: pip install easy-vqa==1.0") from None
    questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    return [
        Example(f"{split}-{index}", question, (answer,), ImageRef(paths[image_id]))
        for index, (question, answer, image_id) in enumerate(zip(questions, answers, image_ids))
    ]


def easyvqa_task(validation_images: int = 200, *, seed: int, **task_options) -> Task:
    train, test = load_examples("train"), load_examples("test")
    images = sorted({example.image.path for example in train})
    held_out = set(random.Random(seed).sample(images, validation_images)) if validation_images else set()
    splits = {
        "train": [e for e in train if e.image.path not in held_out],
        "validation": [e for e in train if e.image.path in held_out],
        "test": test,
    }
    task_options.setdefault("metric", "exact_match")
    task_options.setdefault("max_new_tokens", 10)
    return Task("easy-vqa", splits, **task_options)
