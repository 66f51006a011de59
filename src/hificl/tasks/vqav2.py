"""VQAv2 and OK-VQA from their official files on local disk, with COCO images.

Layout (file names are options; the defaults are the official ones)::

    ROOT/v2_OpenEnded_mscoco_train2014_questions.json   {"data_subtype": "train2014", "questions": [
                                                          {"image_id", "question", "question_id"}, ...]}
    ROOT/v2_mscoco_train2014_annotations.json            {"annotations": [{"question_id", "image_id",
                                                          "answers": [{"answer", ...}, x10], ...}, ...]}
    ROOT/v2_OpenEnded_mscoco_val2014_questions.json, ROOT/v2_mscoco_val2014_annotations.json
    IMAGE_ROOT/train2014/COCO_train2014_000000000009.jpg   (COCO images, IMAGE_ROOT defaults to ROOT)
    IMAGE_ROOT/val2014/COCO_val2014_000000000042.jpg

OK-VQA ships the same format (OpenEnded_mscoco_{train,val}2014_questions.json, mscoco_{train,val}2014_annotations.json).

Splits (the paper's protocol with its flaws fixed):

* test: the official val questions; for VQAv2 a fixed subset of `test_size` (10,000) questions, namely
  ``sorted(random.Random(subset_seed).sample(sorted(question_ids), test_size))`` with subset_seed 3407 (part of the
  subset's definition, not the run's seed: it stays the same whatever seed a run uses). The
  pipeline writes the chosen ids beside the results (test_ids.json). OK-VQA: the whole val set (5,046).
* validation: the questions on `validation_images` train images chosen with the run's data seed (held out by image,
  so epoch selection never sees a training image).
* train: the other train questions; the run config trains on the first N of a seeded shuffle of them.

Each example's `answers` are the 10 annotators' answers (scored with the official VQA accuracy); its `target` (the
training answer and the answer shown in demonstrations) is the most frequent of them. The authors' code trained on
the first annotator's answer instead, a known flaw.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..metrics import DEFAULT_STOP_STRINGS
from .base import DEFAULT_TEMPLATE, Example, ImageRef, Task

VQA_INSTRUCTION = "Instruction: Provide an answer to the question. Use the image to answer.\n"
VQAV2_FILES = {
    "train_questions": "v2_OpenEnded_mscoco_train2014_questions.json",
    "train_annotations": "v2_mscoco_train2014_annotations.json",
    "val_questions": "v2_OpenEnded_mscoco_val2014_questions.json",
    "val_annotations": "v2_mscoco_val2014_annotations.json",
}
OKVQA_FILES = {key: name.replace("v2_", "") for key, name in VQAV2_FILES.items()}
PUBLISHED_SUBSET_SEED = 3407  # defines the published VQAv2 test subset (test_ids.json); never the run's seed


def read_json(path: Path, key: str) -> tuple[dict, list]:
    """The JSON object in `path` and its list under `key`, with errors that name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"Dataset file not found: {path}")
    try:
        with path.open(encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}).") from None
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(f"{path}: expected a JSON object with a list {key!r} (the official format).")
    return data, data[key]


def require_field(record, name: str, kind: type, where: str):
    value = record.get(name) if isinstance(record, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{where}: needs {name!r} ({kind.__name__}), got {value!r}.")
    return value


def read_vqa(questions_file: str | Path, annotations_file: str | Path, image_root: str | Path) -> list[Example]:
    """Examples of an official VQA questions + annotations pair, sorted by question id.

    Images are ``image_root/<subtype>/COCO_<subtype>_<image_id:012d>.jpg`` where <subtype> is the questions
    file's ``data_subtype`` (e.g. "val2014"). Image files are opened only when used; the folder must exist.
    """
    questions_file, annotations_file = Path(questions_file), Path(annotations_file)
    meta, questions = read_json(questions_file, "questions")
    _, annotations = read_json(annotations_file, "annotations")
    subtype = meta.get("data_subtype")
    if not isinstance(subtype, str) or not subtype:
        raise ValueError(f"{questions_file}: needs 'data_subtype' (e.g. \"val2014\"): it names the image folder.")
    image_dir = Path(image_root) / subtype
    if not image_dir.is_dir():
        raise FileNotFoundError(f"Image folder not found: {image_dir} (COCO {subtype} images, for "
                                f"{questions_file.name}).")
    answers: dict[int, tuple[str, ...]] = {}
    for index, record in enumerate(annotations):
        where = f"{annotations_file} annotations[{index}]"
        question_id = require_field(record, "question_id", int, where)
        given = require_field(record, "answers", list, where)
        texts = tuple(require_field(a, "answer", str, f"{where}.answers") for a in given)
        if not texts:
            raise ValueError(f"{where}: empty 'answers'.")
        answers[question_id] = texts
    examples, seen = [], set()
    for index, record in enumerate(questions):
        where = f"{questions_file} questions[{index}]"
        question_id = require_field(record, "question_id", int, where)
        image_id = require_field(record, "image_id", int, where)
        question = require_field(record, "question", str, where)
        if question_id in seen:
            raise ValueError(f"{where}: duplicate question_id {question_id}.")
        seen.add(question_id)
        if question_id not in answers:
            raise ValueError(f"{where}: question_id {question_id} has no annotation in {annotations_file}.")
        image = ImageRef(str(image_dir / f"COCO_{subtype}_{image_id:012d}.jpg"))
        examples.append(Example(str(question_id), question.strip(), answers[question_id], image))
    if not examples:
        raise ValueError(f"{questions_file}: no questions.")
    return sorted(examples, key=lambda e: int(e.id))


def hold_out_images(examples: list[Example], images: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(kept, held out): the examples on `images` images chosen with `seed` are held out."""
    if not images:
        return examples, []
    paths = sorted({e.image.path for e in examples})
    if images >= len(paths):
        raise ValueError(f"validation_images={images} but the train split has only {len(paths)} images.")
    held = set(random.Random(seed).sample(paths, images))
    return [e for e in examples if e.image.path not in held], [e for e in examples if e.image.path in held]


def fixed_subset(examples: list[Example], size: int | None, seed: int) -> list[Example]:
    """``size`` examples drawn with `seed` from the examples sorted by id (all of them if size is None)."""
    if size is None or size >= len(examples):
        return examples
    chosen = set(random.Random(seed).sample(sorted(int(e.id) for e in examples), size))
    return [e for e in examples if int(e.id) in chosen]


def _vqa_task(name: str, files: dict[str, str], root: str, image_root: str | None, test_size: int | None,
              subset_seed: int, validation_images: int, seed: int, task_options: dict) -> Task:
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"{name}: dataset folder not found: {root} (set task.root).")
    paths = {key: root_path / value for key, value in files.items()}
    images = image_root if image_root is not None else root
    train = read_vqa(paths["train_questions"], paths["train_annotations"], images)
    test = fixed_subset(read_vqa(paths["val_questions"], paths["val_annotations"], images), test_size, subset_seed)
    train, validation = hold_out_images(train, validation_images, seed)
    defaults = {"instruction": VQA_INSTRUCTION, "template": DEFAULT_TEMPLATE, "metric": "vqa_accuracy",
                "stop_strings": DEFAULT_STOP_STRINGS, "max_new_tokens": 20}
    return Task(name, {"train": train, "validation": validation, "test": test}, **{**defaults, **task_options})


def vqav2_task(root: str, image_root: str | None = None, test_size: int | None = 10000,
               subset_seed: int = PUBLISHED_SUBSET_SEED, validation_images: int = 200, *, seed: int,
               **options) -> Task:
    """VQAv2 (see the module docstring). Options named like `VQAV2_FILES` override file names (relative to
    `root`); the rest are `Task` fields (template, instruction, stop_strings, ...)."""
    files = {**VQAV2_FILES, **{k: options.pop(k) for k in list(options) if k in VQAV2_FILES}}
    return _vqa_task("vqav2", files, root, image_root, test_size, subset_seed, validation_images, seed,
                     options)


def okvqa_task(root: str, image_root: str | None = None, test_size: int | None = None,
               subset_seed: int = PUBLISHED_SUBSET_SEED, validation_images: int = 500, *, seed: int,
               **options) -> Task:
    """OK-VQA (same format as VQAv2; by default the whole val set is the test set)."""
    files = {**OKVQA_FILES, **{k: options.pop(k) for k in list(options) if k in OKVQA_FILES}}
    return _vqa_task("ok-vqa", files, root, image_root, test_size, subset_seed, validation_images, seed,
                     options)


vqav2_task.extra_options = tuple(VQAV2_FILES)  # options beyond its parameters and `Task`'s fields
okvqa_task.extra_options = tuple(OKVQA_FILES)
