"""The k-shot teacher of LIVE, MimIC and HiFICL's teacher-alignment ablation: the same frozen model with k
demonstrations in context (adapter disabled, no gradient), aligned token by token with the student, which sees
the query (and answer) alone.

Both batches are right-padded. The two sequences end alike (query, then answer) but may begin differently (an
instruction or a system turn stated once before the demonstrations, a BOS token), so they are aligned on the
tokens they share at the END: student position ``j`` of row ``r`` is teacher position ``offsets[r] + j`` for
``j >= starts[r]``; `aligned_mask` marks those positions. The shared tail must cover the whole answer and the
position that predicts its first token.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from ..tasks import Example
from .icl import InContext


class Teacher:
    """Builds teacher batches and runs the teacher forward, returning values at the student's positions."""

    def __init__(self, shots: int):
        self.demos = InContext(shots=shots)

    def setup(self, backbone, task, seed: int) -> None:
        self.demos.setup(backbone, task, seed)

    def batch(self, items: list[Example], student: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The teacher inputs for `items`, plus ``offsets`` and ``starts`` (see the module docstring)."""
        task, backbone = self.demos.task, self.demos.backbone
        teacher = backbone.encode([self.demos.prompt(e) for e in items], [task.target_text(e) for e in items],
                                  padding_side="right")
        student_lengths = student["attention_mask"].sum(1).tolist()
        teacher_lengths = teacher["attention_mask"].sum(1).tolist()
        starts = []
        for row, (n_student, n_teacher) in enumerate(zip(student_lengths, teacher_lengths)):
            ours = student["input_ids"][row, :n_student].tolist()
            theirs = teacher["input_ids"][row, :n_teacher].tolist()
            shared = 0
            while shared < min(n_student, n_teacher) and ours[n_student - 1 - shared] == theirs[n_teacher - 1 - shared]:
                shared += 1
            answer_start = int((student["labels"][row] != -100).nonzero().min())
            if n_student - shared > answer_start - 1:
                raise ValueError(
                    f"Example {items[row].id!r}: after demonstrations the query and answer tokenise differently than "
                    "alone, so teacher and student cannot be aligned. End the task's answer_suffix with a "
                    "separator (e.g. a newline) so the tokeniser cannot merge across it."
                )
            starts.append(n_student - shared)
        teacher["offsets"] = torch.tensor(teacher_lengths) - torch.tensor(student_lengths)
        teacher["starts"] = torch.tensor(starts)
        return teacher

    @staticmethod
    def aligned_mask(teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor]) -> torch.Tensor:
        """Boolean ``[b, T_student]``: the student positions that have a teacher counterpart."""
        positions = torch.arange(student["input_ids"].shape[1], device=student["input_ids"].device)[None, :]
        return (positions >= teacher["starts"][:, None]) & student["attention_mask"].bool()

    @staticmethod
    def align(values: torch.Tensor, offsets: torch.Tensor, length: int) -> torch.Tensor:
        """``values[r, offsets[r] + j]`` for ``j < length``: ``[b, T_teacher, ...] -> [b, length, ...]``."""
        index = offsets[:, None] + torch.arange(length, device=values.device)[None, :]
        index = index.clamp(max=values.shape[1] - 1)
        shape = index.shape + values.shape[2:]
        index = index.view(index.shape + (1,) * (values.dim() - 2)).expand(shape)
        return values.gather(1, index)

    @staticmethod
    def run(model: nn.Module, disabled: Callable[[], contextlib.AbstractContextManager], teacher: dict,
            capture: list[nn.Module] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Teacher logits and (optionally) the outputs of `capture` modules, without gradient or adapter."""
        inputs = {k: v for k, v in teacher.items() if k not in ("offsets", "starts", "labels")}
        with torch.no_grad(), disabled(), capture_outputs(capture or []) as outputs:
            logits = model(**inputs).logits
        return logits, outputs


@contextlib.contextmanager
def capture_outputs(modules: list[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Collect each module's output (in the order given) during the block."""
    outputs: list[torch.Tensor | None] = [None] * len(modules)
    handles = []
    for index, module in enumerate(modules):
        def hook(_module, _inputs, output, index=index):
            outputs[index] = output[0] if isinstance(output, tuple) else output
        handles.append(module.register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean ``[b, T]``: positions whose NEXT token is an answer token (where the answer is predicted)."""
    predicting = torch.zeros_like(labels, dtype=torch.bool)
    predicting[:, :-1] = labels[:, 1:] != -100
    return predicting


def kl_teacher_student(teacher_logits: torch.Tensor, student_logits: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Mean over `where` of KL(teacher || student) between next-token distributions."""
    teacher_log = torch.log_softmax(teacher_logits[where].float(), -1)
    student_log = torch.log_softmax(student_logits[where].float(), -1)
    return (teacher_log.exp() * (teacher_log - student_log)).sum(-1).mean()


def layer_mse(teacher: list[torch.Tensor], student: list[torch.Tensor], offsets: torch.Tensor,
              mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers of the MSE between student and aligned teacher hidden states at the positions of
    `mask` (the aligned query and answer positions)."""
    losses = []
    keep = mask.bool()
    for t, s in zip(teacher, student):
        aligned = Teacher.align(t, offsets, s.shape[1])
        losses.append(((s.float() - aligned.float()) ** 2)[keep].mean())
    return torch.stack(losses).mean()
