"""Measurements of the embedded VLM on easy-VQA TEST images (greedy decoding throughout).

* ``see``: described with the caption prompt, does the reply name the right colour and shape (and
  no other colour or shape)?
* ``multi_image``: the same for the LAST of 4..8 images whose earlier images carry their
  descriptions in the context (does the model read the right image?).
* ``icl``: exact match (answer cut at the first newline, normalised) on a fixed seeded sample of test
  questions with k = 0, 1, 2, 4, 8 random training demonstrations (nested: the k-shot demonstrations
  are the first k of the 8-shot ones), with the time per query.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter

import torch
from PIL import Image
from tqdm.auto import tqdm

from . import prompts
from .data import COLORS, SHAPES, Split


@torch.no_grad()
def generate(model, processor, texts: list[str], images: list[list[Image.Image]], max_new_tokens: int,
             batch_size: int = 16, desc: str = "generate") -> list[str]:
    """Greedy replies (special tokens kept, so callers can cut at ``<|im_end|>``)."""
    tokenizer = processor.tokenizer
    outs = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, mininterval=2, leave=False):
        enc = processor(text=texts[start:start + batch_size], images=images[start:start + batch_size],
                        padding=True, return_tensors="pt")
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             stop_strings=list(prompts.STOP_STRINGS), tokenizer=tokenizer,
                             pad_token_id=tokenizer.pad_token_id)
        new = gen[:, enc["input_ids"].shape[1]:]
        outs += tokenizer.batch_decode(new, skip_special_tokens=False)
    return outs


def _mentions(reply: str, vocabulary) -> list[str]:
    """Colour or shape words of the reply's first line, in order ("grey" = gray, "square" = rectangle)."""
    words = re.findall(r"[a-z]+", prompts.cut_answer(reply).lower())
    words = ["gray" if w == "grey" else "rectangle" if w in ("square", "rectangular") else w for w in words]
    return [w for w in words if w in vocabulary]


def names_correctly(reply: str, color: str, shape: str, strict: bool = False) -> bool:
    """The first colour and the first shape the reply names are right (``strict``: and it names no
    other colour or shape)."""
    colors, shapes = _mentions(reply, COLORS), _mentions(reply, SHAPES)
    if strict:
        return set(colors) == {color} and set(shapes) == {shape}
    return colors[:1] == [color] and shapes[:1] == [shape]


def _open(split: Split, image_id: int) -> Image.Image:
    return Image.open(split.paths[image_id]).convert("RGB")


def see(model, processor, split: Split, limit: int | None = None) -> dict:
    ids = split.image_ids[:limit]
    texts = [prompts.caption_prompt()] * len(ids)
    t0 = time.time()
    replies = generate(model, processor, texts, [[_open(split, i)] for i in ids], 12, 50, "see")
    ok = [names_correctly(r, split.colors[i], split.shapes[i]) for r, i in zip(replies, ids)]
    strict = [names_correctly(r, split.colors[i], split.shapes[i], strict=True) for r, i in zip(replies, ids)]
    color_ok = [_mentions(r, COLORS)[:1] == [split.colors[i]] for r, i in zip(replies, ids)]
    shape_ok = [_mentions(r, SHAPES)[:1] == [split.shapes[i]] for r, i in zip(replies, ids)]
    return {"accuracy": sum(ok) / len(ok), "accuracy_strict": sum(strict) / len(ids),
            "color_accuracy": sum(color_ok) / len(ids), "shape_accuracy": sum(shape_ok) / len(ids),
            "n_images": len(ids), "criterion": "first colour and first shape named are right (strict: no other named)",
            "seconds_per_image": (time.time() - t0) / len(ids),
            "examples": [{"image_id": i, "truth": split.description(i), "reply": prompts.cut_answer(r)}
                         for r, i in list(zip(replies, ids))[:5]]}


def multi_image(model, processor, split: Split, n_sequences: int = 64, seed: int = 0) -> dict:
    rng = random.Random(seed)
    texts, images, targets, lengths = [], [], [], []
    for _ in range(n_sequences):
        n = rng.randint(4, 8)
        ids = rng.sample(split.image_ids, n)
        context = "".join(prompts.caption_demo(f"The image shows a {split.description(i)}.") for i in ids[:-1])
        texts.append(context + prompts.caption_prompt())
        images.append([_open(split, i) for i in ids])
        targets.append(ids)
        lengths.append(n)
    order = sorted(range(n_sequences), key=lengths.__getitem__)  # similar lengths share a batch
    replies = [None] * n_sequences
    outs = generate(model, processor, [texts[j] for j in order], [images[j] for j in order], 20, 8, "multi-image")
    for j, r in zip(order, outs):
        replies[j] = r
    last_ok = [names_correctly(r, split.colors[t[-1]], split.shapes[t[-1]]) for r, t in zip(replies, targets)]
    copied = [names_correctly(r, split.colors[t[-2]], split.shapes[t[-2]]) and split.description(t[-2]) != split.description(t[-1])
              for r, t in zip(replies, targets)]
    return {"last_image_accuracy": sum(last_ok) / n_sequences, "n_sequences": n_sequences,
            "images_per_sequence": "4-8", "described_previous_image_instead": sum(copied) / n_sequences}


def icl(model, processor, train: Split, test: Split, shots=(0, 1, 2, 4, 8), n_questions: int = 150,
        seed: int = 0, batch_size: int = 8) -> dict:
    rng = random.Random(seed)
    queries = rng.sample(test.questions, n_questions)
    demos = [rng.sample(train.questions, max(shots)) for _ in queries]
    majority = Counter(q.answer for q in train.questions).most_common(1)[0][0]
    result = {"n_questions": n_questions, "majority_answer": majority,
              "majority_rate": sum(q.answer == majority for q in queries) / n_questions, "shots": {}}
    for k in shots:
        texts = [prompts.vqa_context([(d.text, d.answer) for d in ds[:k]], q.text) for q, ds in zip(queries, demos)]
        images = [[_open(train, d.image_id) for d in ds[:k]] + [_open(test, q.image_id)] for q, ds in zip(queries, demos)]
        t0 = time.time()
        replies = generate(model, processor, texts, images, 16 if k == 0 else 6, batch_size, f"{k}-shot")
        seconds = (time.time() - t0) / n_questions
        hits = [prompts.normalize_answer(prompts.cut_answer(r)) == q.answer for r, q in zip(replies, queries)]
        yes_no = [h for h, q in zip(hits, queries) if q.answer in ("yes", "no")]
        other = [h for h, q in zip(hits, queries) if q.answer not in ("yes", "no")]
        if k == 0:  # SmolLM2's own style: full sentences, not the task's one-word answers
            result["zero_shot_verbose_rate"] = sum(len(prompts.cut_answer(r).split()) >= 3 for r in replies) / n_questions
        result["shots"][str(k)] = {
            "accuracy": sum(hits) / n_questions, "yes_no_accuracy": sum(yes_no) / max(1, len(yes_no)),
            "color_shape_accuracy": sum(other) / max(1, len(other)), "seconds_per_query": seconds,
            "examples": [{"question": q.text, "answer": q.answer, "reply": prompts.cut_answer(r)}
                         for r, q in list(zip(replies, queries))[:6]],
        }
    return result
