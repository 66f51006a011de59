"""Prompt format of the embedded VLM: plain text blocks, one ``<image>`` per block, no chat template.

    Image:<image>
    Question: what color is the shape?
    Answer: blue

    Image:<image>
    Question: is there a red shape?
    Answer:

k-shot in-context learning puts k finished blocks (image, question, one-word answer) before the
query block; zero-shot, SmolLM2-Instruct answers in its own sentences. The answer is the generated
text up to the first newline. (Measured with SmolLM2 on text stand-ins for the images, this format
gave clearly better in-context learning than SmolLM2's chat template, and its zero-shot answers
are still full sentences.) A description is asked for in the same block with a request such as
"Describe the image." in place of the question.
"""

from __future__ import annotations

import re

IMAGE = "<image>"
STOP_STRINGS = ("\n",)


def vqa_prompt(question: str) -> str:
    """Query block for a question about one image; the answer is generated after it."""
    return f"Image:{IMAGE}\nQuestion: {question}\nAnswer:"


def vqa_demo(question: str, answer: str) -> str:
    """A finished demonstration block (image, question, answer)."""
    return f"{vqa_prompt(question)} {answer}\n\n"


CAPTION_REQUEST = "Describe the image."


def caption_prompt(request: str = CAPTION_REQUEST) -> str:
    """Query block asking for a description of one image."""
    return vqa_prompt(request)


def caption_demo(description: str, request: str = CAPTION_REQUEST) -> str:
    """A finished description block."""
    return vqa_demo(request, description)


def vqa_context(demos: list[tuple[str, str]], question: str) -> str:
    """Full k-shot text: ``demos`` as (question, answer) blocks, then the query block. The images go
    in the same order: one per demonstration, the query image last."""
    return "".join(vqa_demo(q, a) for q, a in demos) + vqa_prompt(question)


def cut_answer(generated: str) -> str:
    """The answer part of a generation: the text before the first newline."""
    return generated.split("\n", 1)[0].replace("<|im_end|>", "").strip()


def normalize_answer(answer: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed (VQA-style)."""
    words = re.sub(r"[^\w\s]", " ", answer.lower()).split()
    return " ".join(w for w in words if w not in ("a", "an", "the"))
