"""Bring your own task: one JSON object per line.

Fields of a line: ``question`` (or ``prompt``), ``answer`` (a string) or ``answers`` (a list of strings),
optional ``image`` (a path, absolute or relative to the JSONL file's folder), optional ``id`` and ``target``
(the answer to train on and to show in demonstrations; default: the most frequent of ``answers``).

    {"image": "images/0001.png", "question": "What colour is the shape?", "answers": ["red"]}
    {"prompt": "Translate to French: cat", "answer": "chat"}
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

from PIL import Image

from ..core.validate import integer
from .base import Example, ImageRef, Task, split_off_validation

KNOWN_FIELDS = {"id", "image", "question", "prompt", "answer", "answers", "target"}


def read_jsonl(path: str | Path) -> list[Example]:
    """Read and validate a JSONL task file; every error names the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Task file not found: {path}")
    examples, seen = [], set()
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            where = f"{path} line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{where}: not UTF-8 text (byte {error.start + 1} of the line); save the file as "
                                 "UTF-8.") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg}).") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: each line must be a JSON object.")
            unknown = sorted(set(record) - KNOWN_FIELDS)
            if unknown:
                raise ValueError(f"{where}: unknown field(s) {unknown}; known fields: {sorted(KNOWN_FIELDS)}.")
            question = record.get("question", record.get("prompt"))
            if not isinstance(question, str) or not visible(question):
                raise ValueError(f"{where}: needs a 'question' (or 'prompt') string with visible text (not only "
                                 "spaces, control or zero-width characters).")
            answers = record.get("answers", [record["answer"]] if "answer" in record else None)
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                raise ValueError(f"{where}: needs 'answer' (a string) or 'answers' (a non-empty list of strings).")
            if not all(visible(a) for a in answers):
                raise ValueError(f"{where}: an answer has no visible text; give every answer some text (or drop the "
                                 "line).")
            image = None
            if record.get("image") is not None:
                if not isinstance(record["image"], str):
                    raise ValueError(f"{where}: 'image' must be a path string.")
                image_path = Path(record["image"])
                image_path = image_path if image_path.is_absolute() else path.parent / image_path
                if not image_path.is_file():
                    raise FileNotFoundError(f"{where}: image file not found: {image_path}")
                check_image(image_path, where)
                image = ImageRef(str(image_path))
            example_id = str(record.get("id", f"{path.stem}-{number}"))
            if example_id in seen:
                raise ValueError(f"{where}: duplicate id {example_id!r}.")
            seen.add(example_id)
            target = record.get("target", "")
            if not isinstance(target, str) or ("target" in record and not target.strip()):
                raise ValueError(f"{where}: 'target' must be a non-empty string.")
            examples.append(Example(example_id, question.strip(), tuple(answers), image, target))
    if not examples:
        raise ValueError(f"{path}: no examples.")
    return examples


def visible(text: str) -> bool:
    """Whether `text` has a character that shows: not only whitespace, control or format (zero-width) ones."""
    return any(not (c.isspace() or unicodedata.category(c) in ("Cc", "Cf", "Zs", "Zl", "Zp")) for c in text)


def check_image(path: Path, where: str) -> None:
    """Open the image's header and check its data (cheap: no decoding to pixels), so a file that is not an image
    is found when the task is read, not when a batch first shows it."""
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{where}: {path} is not a readable image ({error}); replace the file or drop the "
                         "line.") from None


def jsonl_task(train: str, test: str, validation: str | None = None, validation_size: int = 0,
               *, seed: int, name: str | None = None, **task_options) -> Task:
    """A task from JSONL files. Without a validation file, `validation_size` examples of train are held out."""
    integer(validation_size, "task.validation_size", minimum=0)
    train_examples = read_jsonl(train)
    if validation:
        validation_examples = read_jsonl(validation)
    elif validation_size:
        if validation_size >= len(train_examples):
            raise ValueError(f"validation_size {validation_size} would hold out all {len(train_examples)} examples of "
                             f"{train} for validation, leaving none to train on: lower it (e.g. to "
                             f"{max(1, len(train_examples) // 5)}), or give a validation file.")
        train_examples, validation_examples = split_off_validation(train_examples, validation_size, seed)
    else:
        validation_examples = []
    splits = {"train": train_examples, "validation": validation_examples, "test": read_jsonl(test)}
    return Task(name or Path(train).parent.name or "jsonl", splits, **task_options)
