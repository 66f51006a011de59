"""COCO captions with the Karpathy split (``dataset_coco.json``), scored with CIDEr-D, and CHAIR when COCO instance
annotations are given.

Layout (names are options; defaults are the official ones)::

    ROOT/dataset_coco.json     {"images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
                                "split": "train" | "restval" | "val" | "test", "cocoid": 391895,
                                "sentences": [{"raw": "A man ...", "tokens": [...]}, ...]}, ...]}
    IMAGE_ROOT/<filepath>/<filename>                    (COCO images; IMAGE_ROOT defaults to ROOT)
    instances_val2014.json                             (optional: COCO instance annotations, for CHAIR)

Splits: test is the Karpathy `test_split` ("val", 5,000 images, as in the paper; or "test"); train is Karpathy
train + restval minus `validation_images` images held out (with the run's data seed) for epoch selection. One example per image: its
`answers` are the reference captions (CIDEr-D scores against all of them); its `target` (training and
demonstrations) is the first reference caption.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..metrics import canonical_category, chair, extract_objects
from .base import CorpusScore, Example, ImageRef, Task
from .vqav2 import hold_out_images, read_json, require_field

CAPTION_TEMPLATE = "{image}Caption:"
CAPTION_STOP = ("\n", "Caption", "Image", "Question", "Answer")


class CaptionTask(Task):
    """A captioning task; with `objects` (ground-truth COCO objects per example id) CHAIR is reported too, for every
    evaluated set whose images all have ground-truth objects (the test set; not the validation slice of train)."""

    def __init__(self, name: str, splits: dict[str, list[Example]], objects: dict[str, set[str]] | None = None,
                 **task_options):
        super().__init__(name, splits, **task_options)
        self.objects = objects

    def _has_objects(self, examples: Sequence[Example]) -> bool:
        return bool(self.objects) and all(e.id in self.objects for e in examples)

    def reported_metrics(self, examples: Sequence[Example]) -> list[str]:
        chair_metrics = ["chair_s", "chair_i", "chair_recall"] if self._has_objects(examples) else []
        return super().reported_metrics(examples) + chair_metrics

    def score_corpus(self, predictions: Sequence[str], examples: Sequence[Example]) -> CorpusScore:
        result = super().score_corpus(predictions, examples)
        if not self._has_objects(examples):
            return result
        hallucination = chair({e.id: p for e, p in zip(examples, predictions)},
                              {e.id: self.objects[e.id] for e in examples})
        details = {"chair_s": hallucination["chair_s"], "chair_i": hallucination["chair_i"],
                   "chair_recall": hallucination["recall"]}
        return CorpusScore(result.score, result.per_example, {**result.details, **details})


def read_karpathy(path: str | Path, image_root: str | Path) -> dict[str, list[Example]]:
    """Examples per Karpathy split ("train", "restval", "val", "test") of a dataset_coco.json file."""
    path = Path(path)
    _, images = read_json(path, "images")
    splits: dict[str, list[Example]] = {}
    checked: set[Path] = set()
    for index, record in enumerate(images):
        where = f"{path} images[{index}]"
        folder = Path(image_root) / require_field(record, "filepath", str, where)
        if folder not in checked:
            if not folder.is_dir():
                raise FileNotFoundError(f"Image folder not found: {folder} (named by {where}).")
            checked.add(folder)
        sentences = require_field(record, "sentences", list, where)
        captions = tuple(require_field(s, "raw", str, f"{where}.sentences").strip() for s in sentences)
        if not captions or not all(captions):
            raise ValueError(f"{where}: needs non-empty reference captions in 'sentences'.")
        cocoid = require_field(record, "cocoid", int, where)
        image = ImageRef(str(folder / require_field(record, "filename", str, where)))
        example = Example(str(cocoid), "", captions, image, target=captions[0])
        splits.setdefault(require_field(record, "split", str, where), []).append(example)
    return splits


def read_instance_objects(path: str | Path, image_ids: set[str]) -> dict[str, set[str]]:
    """COCO category names present in each of `image_ids` (as strings), from an instances_*.json file. Every id
    must be one of the file's images (an image without annotations has no objects)."""
    path = Path(path)
    data, annotations = read_json(path, "annotations")
    if not isinstance(data.get("categories"), list) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: expected COCO instance annotations with 'images' and 'categories'.")
    names = {c["id"]: canonical_category(c["name"]) for c in data["categories"]}
    covered = {str(image["id"]) for image in data["images"]}
    missing = sorted(image_ids - covered, key=int)
    if missing:
        raise ValueError(f"{path} does not cover {len(missing)} test image(s) (e.g. {missing[:3]}); give the instance "
                         "annotations of the test images' COCO split (instances_val2014.json for Karpathy val/test).")
    objects: dict[str, set[str]] = {i: set() for i in image_ids}
    for annotation in annotations:
        image_id = str(annotation["image_id"])
        if image_id in objects:
            objects[image_id].add(names[annotation["category_id"]])
    return objects


def coco_captions_task(root: str, karpathy_file: str = "dataset_coco.json", image_root: str | None = None,
                       test_split: str = "val", instances: str | None = None, validation_images: int = 500,
                       *, seed: int, **task_options) -> CaptionTask:
    """COCO captions, Karpathy split (see the module docstring). `instances`: a COCO instances file (relative to
    `root` unless absolute) enabling CHAIR on the test set; its ground-truth objects are the image's annotated
    categories plus the objects its reference captions mention (as in Rohrbach et al. 2018)."""
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"coco-captions: dataset folder not found: {root} (set task.root).")
    if test_split not in ("val", "test"):
        raise ValueError(f"coco-captions: test_split must be 'val' or 'test', got {test_split!r}.")
    splits = read_karpathy(root_path / karpathy_file, image_root if image_root is not None else root)
    test = splits.get(test_split, [])
    train, validation = hold_out_images(splits.get("train", []) + splits.get("restval", []), validation_images, seed)
    objects = None
    if instances is not None:
        objects = read_instance_objects(root_path / instances, {e.id for e in test})
        for example in test:
            objects[example.id] |= {o for caption in example.answers for o in extract_objects(caption)}
    defaults = {"template": CAPTION_TEMPLATE, "metric": "cider_d", "stop_strings": CAPTION_STOP, "max_new_tokens": 20}
    return CaptionTask("coco-captions", {"train": train, "validation": validation, "test": test}, objects,
                       **{**defaults, **task_options})
