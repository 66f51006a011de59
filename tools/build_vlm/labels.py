"""Per-image colour/shape labels of easy-VQA for the build, on the library's easy-VQA examples
(`hificl.tasks.easyvqa.load_examples`), and images as tensors.

Every easy-VQA image holds one shape of one colour. Labels come from the dataset's own questions and
answers ("what color is ...?" -> colour, "what shape ...?" -> shape, yes/no questions naming a
colour or shape). Where the questions of an image leave an attribute open, the image metadata fills
it in: the shape is drawn in one of eight exact palette colours, and its fill ratio of the bounding
box separates rectangles (~1.0), circles (~0.79) and triangles (~0.53). The two sources are checked
against each other wherever both exist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hificl.tasks.easyvqa import load_examples

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
PALETTE = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0),
    "gray": (128, 128, 128), "teal": (0, 128, 128), "brown": (165, 42, 42), "yellow": (255, 255, 0),
}
IMAGE_SIZE = 64


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    image_id: int


@dataclass
class Split:
    """One easy-VQA split: image paths, decoded labels and questions."""

    name: str
    image_ids: list[int]
    paths: dict[int, str]
    colors: dict[int, str]
    shapes: dict[int, str]
    questions: list[Question]

    def description(self, image_id: int) -> str:
        """'blue rectangle' for the given image."""
        return f"{self.colors[image_id]} {self.shapes[image_id]}"


def _pixel_labels(path: str) -> tuple[str, str]:
    """Colour and shape of an image read off its pixels (palette colour, bounding-box fill ratio)."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.int32)
    exact = {c: int((np.abs(rgb - np.array(v)).sum(-1) == 0).sum()) for c, v in PALETTE.items()}
    color = max(exact, key=exact.get)
    mask = np.abs(rgb - np.array(PALETTE[color])).sum(-1) <= 60
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "rectangle" if fill > 0.95 else "circle" if fill > 0.725 else "triangle"
    return color, shape


def _question_labels(questions: list[Question]) -> tuple[dict[int, str], dict[int, str]]:
    """Colour/shape per image wherever its questions determine them."""
    pos = {"color": {}, "shape": {}}
    neg = {"color": {}, "shape": {}}
    for q in questions:
        words = re.findall(r"[a-z]+", q.text)
        named = {"color": [w for w in words if w in COLORS], "shape": [w for w in words if w in SHAPES]}
        if q.answer in COLORS or q.answer in SHAPES:
            kind = "color" if q.answer in COLORS else "shape"
            other = "shape" if kind == "color" else "color"
            pos[kind].setdefault(q.image_id, set()).add(q.answer)
            for w in named[other]:
                pos[other].setdefault(q.image_id, set()).add(w)
            continue
        present = (q.answer == "yes") != ("not" in words or "no" in words)
        for kind in ("color", "shape"):
            for w in named[kind]:
                (pos if present else neg)[kind].setdefault(q.image_id, set()).add(w)
    out = []
    for kind, values in (("color", COLORS), ("shape", SHAPES)):
        labels = {}
        for image_id in set(pos[kind]) | set(neg[kind]):
            cands = pos[kind].get(image_id) or set(values) - neg[kind].get(image_id, set())
            if len(cands) == 1:
                labels[image_id] = next(iter(cands))
        out.append(labels)
    return out[0], out[1]


def load_split(name: str) -> Split:
    """Load the ``train`` or ``test`` split of easy-VQA with per-image labels (image ids: the numbers easy-VQA
    names its image files by)."""
    examples = load_examples(name)
    paths = {int(Path(e.image.path).stem): e.image.path for e in examples}
    questions = [Question(e.question, e.target, int(Path(e.image.path).stem)) for e in examples]
    q_colors, q_shapes = _question_labels(questions)
    colors, shapes = {}, {}
    for image_id, path in paths.items():
        p_color, p_shape = _pixel_labels(path)
        for src, p_value, store in ((q_colors, p_color, colors), (q_shapes, p_shape, shapes)):
            value = src.get(image_id, p_value)
            if image_id in src and src[image_id] != p_value:
                raise ValueError(f"easy-VQA {name} image {image_id}: label {value!r} but pixels say {p_value!r}")
            store[image_id] = value
    return Split(name, sorted(paths), paths, colors, shapes, questions)


def image_tensor(paths: list[str]) -> torch.Tensor:
    """Images as float [N, 3, 64, 64] scaled to [-1, 1] (the processor's rescale and 0.5/0.5 normalisation)."""
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float32) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
