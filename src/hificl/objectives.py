"""Objectives: what a trained method minimises. An objective builds the inputs of a training step from training
items (`batch`, the trainer's collate function) and computes the loss of a model on them (`loss`).

A loss is a weighted sum of means (cross-entropy over answer tokens, KL over aligned positions, ...): `terms`
returns each ``(weight, mean)`` and `counts` how many elements each mean is over, read from the batch alone. The
trainer weighs every micro-batch's means by its share of the optimiser step's elements, so a step's loss is the
mean over all of its elements however its examples are split into micro-batches and dealt out to processes.

* `AnswerLoss`: cross-entropy on the answer tokens of the zero-shot prompt (HiFICL, LoRA).
* `TeacherKL`: distil a k-shot teacher's next-token distributions into the student, plus CE (LIVE).
* `TeacherMLPAlignment`: match the teacher's MLP outputs layer by layer, plus CE (MimIC; HiFICL's teacher
  ablation).

A `Teacher` is a helper given the backbone, the task and a k-shot prompter: it builds the teacher inputs aligned
token by token with the student's and runs the model on them inside ``model.disable_adapter()``.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Iterator

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from .backbones import IGNORE_INDEX, Backbone
from .prompting import KShot, Prompter
from .seeding import Seeds
from .tasks import Example, Task


class AnswerLoss:
    """Cross-entropy on the answer tokens: the prompt then the target, right-padded, `labels` on the target.

    Only the positions that predict an answer token of some row go through the LM head (``logits_to_keep``, where
    the backbone takes it): the loss and its gradients are those of the whole-sequence logits (the other positions
    have no label), without the LM head's matrix product over every prompt token (a fifth of a small model's step)."""

    def __init__(self, backbone: Backbone, task: Task, prompter: Prompter):
        self.backbone, self.task, self.prompter = backbone, task, prompter
        self.keep_logits = "logits_to_keep" in inspect.signature(backbone.model.forward).parameters

    def student_batch(self, items: list[Example]) -> dict[str, torch.Tensor]:
        return self.backbone.encode([self.prompter.prompt(e) for e in items], [self.task.target_text(e) for e in items],
                                    padding_side="right", names=[e.id for e in items])

    def batch(self, items: list[Example]):
        """The inputs of a training step on `items`."""
        return self.student_batch(items)

    def counts(self, batch) -> list[int]:
        """How many elements each of the loss's `terms` is a mean over: here the answer tokens."""
        return [answer_tokens(batch["labels"])]

    def terms(self, model: nn.Module, batch) -> list[tuple[float, torch.Tensor]]:
        """The loss's ``(weight, mean)`` terms: the cross-entropy on the answer tokens."""
        return [(1.0, self.answer_loss(model, batch))]

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        return weighted(self.terms(model, batch))

    def answer_loss(self, model: nn.Module, batch) -> torch.Tensor:
        if not self.keep_logits:
            return model(**batch).loss
        targets = batch["labels"][:, 1:]  # position t predicts token t + 1
        positions = (targets != IGNORE_INDEX).any(0).nonzero().flatten()
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, logits_to_keep=positions).logits
        return nn.functional.cross_entropy(logits.float().flatten(0, 1), targets[:, positions].flatten(),
                                           ignore_index=IGNORE_INDEX)


def weighted(terms: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """A loss from its ``(weight, mean)`` terms."""
    loss = terms[0][0] * terms[0][1]
    for weight, mean in terms[1:]:
        loss = loss + weight * mean
    return loss


def answer_tokens(labels: torch.Tensor) -> int:
    """The answer tokens a batch's cross-entropy is a mean over (labels after the first position)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


# ------------------------------------------------------------------------------------------------ teachers
@dataclass
class TeacherBatch:
    """Student inputs, the teacher inputs of the same items and how their tokens align.

    Both batches are right-padded. The two sequences end alike (query, then answer) but may begin differently
    (an instruction or a system turn stated once before the demonstrations, a BOS token), so they are aligned on
    the tokens they share at the END: student position ``j`` of row ``r`` is teacher position ``offsets[r] + j``
    for ``j >= starts[r]``."""

    student: dict[str, torch.Tensor]
    teacher: dict[str, torch.Tensor]
    offsets: torch.Tensor
    starts: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> "TeacherBatch":
        def move(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.to(device, non_blocking=non_blocking) for k, v in tensors.items()}

        return TeacherBatch(move(self.student), move(self.teacher), self.offsets.to(device), self.starts.to(device))

    def aligned(self) -> torch.Tensor:
        """Boolean ``[b, T_student]``: the student positions that have a teacher counterpart -- never a row's
        sequence-initial token (its first real one: a BOS, or the prompt's first token), the attention sink of
        Llama-style models, whose huge MLP outputs have no counterpart in the middle of the teacher's context
        (as in MimIC's and LIVE's original code)."""
        ids, real = self.student["input_ids"], self.student["attention_mask"].bool()
        positions = torch.arange(ids.shape[1], device=ids.device)[None, :]
        first = real.int().argmax(dim=1, keepdim=True)
        return (positions >= self.starts[:, None]) & real & (positions != first)

    def align(self, values: torch.Tensor) -> torch.Tensor:
        """Teacher `values` ``[b, T_teacher, ...]`` at the student's positions: ``[b, T_student, ...]``."""
        length = self.student["input_ids"].shape[1]
        index = self.offsets[:, None] + torch.arange(length, device=values.device)[None, :]
        index = index.clamp(max=values.shape[1] - 1)
        shape = index.shape + values.shape[2:]
        index = index.view(index.shape + (1,) * (values.dim() - 2)).expand(shape)
        return values.gather(1, index)


def shared_tails(student_ids: torch.Tensor, student_mask: torch.Tensor, teacher_ids: torch.Tensor,
                 teacher_mask: torch.Tensor) -> list[int]:
    """Per row of right-padded student and teacher encodings: how many tokens their real sequences share at the
    end (the query, and its answer where both hold it; what the teacher has before them is its demonstrations and
    any instruction or system turn)."""
    lengths = []
    for row in range(student_ids.shape[0]):
        n_student, n_teacher = int(student_mask[row].sum()), int(teacher_mask[row].sum())
        ours, theirs = student_ids[row, :n_student].tolist(), teacher_ids[row, :n_teacher].tolist()
        shared = 0
        while shared < min(n_student, n_teacher) and ours[n_student - 1 - shared] == theirs[n_teacher - 1 - shared]:
            shared += 1
        lengths.append(shared)
    return lengths


class Teacher:
    """The frozen model with k demonstrations in context (adapter disabled, no gradient), aligned token by token
    with the student, which sees the query (and answer) alone. The shared tail must cover the whole answer and
    the position that predicts its first token. With `resample`, every epoch draws each query's demonstrations
    anew (seeded by the epoch), as MimIC's original code does at every step; otherwise a query keeps its draw."""

    def __init__(self, backbone: Backbone, task: Task, prompter: KShot, resample: bool = False,
                 adapter: nn.Module | None = None):
        self.backbone, self.task, self.prompter, self.resample = backbone, task, prompter, resample
        self.adapter = adapter  # disabled while prompts are built (retrieval reads the frozen model's features)

    @classmethod
    def with_shots(cls, backbone: Backbone, task: Task, shots: int, seeds: Seeds, resample: bool = False,
                   adapter: nn.Module | None = None) -> "Teacher":
        """A teacher with `shots` random demonstrations from train (drawn with the replicate's demos seed)."""
        return cls(backbone, task, KShot(task, backbone, shots, data_seed=seeds.data, demos_seed=seeds.replicate),
                   resample, adapter)

    def prompts(self, items) -> list:
        """The teacher's prompt of each item, built with the adapter disabled."""
        with self.adapter.disable_adapter() if self.adapter is not None else contextlib.nullcontext():
            return [self.prompter.prompt(e) for e in items]

    def set_epoch(self, epoch: int) -> None:
        if self.resample:
            self.prompter.draw = epoch - 1

    def batch(self, items: list[Example], student: dict[str, torch.Tensor]) -> TeacherBatch:
        teacher = self.backbone.encode(self.prompts(items), [self.task.target_text(e) for e in items],
                                       padding_side="right", names=[e.id for e in items])
        teacher.pop("labels")
        student_lengths = student["attention_mask"].sum(1).tolist()
        teacher_lengths = teacher["attention_mask"].sum(1).tolist()
        starts = []
        shared_lengths = shared_tails(student["input_ids"], student["attention_mask"], teacher["input_ids"],
                                      teacher["attention_mask"])
        for row, (n_student, shared) in enumerate(zip(student_lengths, shared_lengths)):
            answer_start = int((student["labels"][row] != -100).nonzero().min())
            if n_student - shared > answer_start - 1:
                raise ValueError(
                    f"Example {items[row].id!r}: after demonstrations the query and answer tokenise differently than "
                    "alone, so teacher and student cannot be aligned. End the task's answer_suffix with a "
                    "separator (e.g. a newline) so the tokeniser cannot merge across it."
                )
            starts.append(n_student - shared)
        offsets = torch.tensor(teacher_lengths) - torch.tensor(student_lengths)
        return TeacherBatch(student, teacher, offsets, torch.tensor(starts))

    @staticmethod
    def run(model: nn.Module, batch: TeacherBatch,
            capture: list[nn.Module] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Teacher logits and (optionally) the outputs of `capture` modules, without gradient or adapter."""
        model = extract_model_from_parallel(model)  # DDP / FSDP wrappers: the adapter model inside
        with torch.no_grad(), model.disable_adapter(), capture_outputs(capture or []) as outputs:
            logits = model(**batch.teacher).logits
        return logits, outputs


class TeacherObjective(AnswerLoss):
    """Base of the objectives with a teacher: batches are `TeacherBatch`es."""

    def __init__(self, backbone: Backbone, task: Task, prompter: Prompter, teacher: Teacher):
        super().__init__(backbone, task, prompter)
        self.teacher = teacher

    def batch(self, items: list[Example]) -> TeacherBatch:
        return self.teacher.batch(items, self.student_batch(items))

    def set_epoch(self, epoch: int) -> None:
        self.teacher.set_epoch(epoch)


class TeacherKL(TeacherObjective):
    """``ce_weight * CE(answer) + kl_weight * KL(teacher || student)`` of the next-token distributions, at the
    positions that predict the answer tokens (`positions` "predicting": every answer token's prediction is
    distilled) or at the answer tokens' own positions ("answer", LIVE's original code: the first answer token's
    prediction is not distilled, the end-of-answer prediction is)."""

    def __init__(self, backbone, task, prompter, teacher: Teacher, ce_weight: float = 0.5, kl_weight: float = 1.0,
                 positions: str = "predicting"):
        super().__init__(backbone, task, prompter, teacher)
        self.ce_weight, self.kl_weight, self.positions = ce_weight, kl_weight, positions

    def _where(self, batch: TeacherBatch) -> torch.Tensor:
        labels = batch.student["labels"]
        at = answer_positions(labels) if self.positions == "predicting" else labels != -100
        return at & batch.aligned()

    def counts(self, batch: TeacherBatch) -> list[int]:
        return [answer_tokens(batch.student["labels"]), int(self._where(batch).sum())]

    def terms(self, model: nn.Module, batch: TeacherBatch) -> list[tuple[float, torch.Tensor]]:
        out = model(**batch.student)
        teacher_logits, _ = Teacher.run(model, batch)
        kl = kl_teacher_student(batch.align(teacher_logits), out.logits, self._where(batch))
        return [(self.ce_weight, out.loss), (self.kl_weight, kl)]


class TeacherMLPAlignment(TeacherObjective):
    """``align_weight * MSE(MLP outputs, teacher's) + ce_weight * CE(answer)``: the layer-wise mean squared error
    between the student's and the teacher's MLP outputs at the aligned positions (query and answer)."""

    def __init__(self, backbone, task, prompter, teacher: Teacher, mlps: list[nn.Module], align_weight: float = 1.0,
                 ce_weight: float = 1.0):
        super().__init__(backbone, task, prompter, teacher)
        self.mlps, self.align_weight, self.ce_weight = mlps, align_weight, ce_weight

    def counts(self, batch: TeacherBatch) -> list[int]:
        return [int(batch.aligned().sum()), answer_tokens(batch.student["labels"])]

    def terms(self, model: nn.Module, batch: TeacherBatch) -> list[tuple[float, torch.Tensor]]:
        with capture_outputs(self.mlps) as student_hidden:
            out = model(**batch.student)
        _, teacher_hidden = Teacher.run(model, batch, self.mlps)
        align = layer_mse([batch.align(t) for t in teacher_hidden], student_hidden, batch.aligned())
        return [(self.align_weight, align), (self.ce_weight, out.loss)]


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


def layer_mse(teacher: list[torch.Tensor], student: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers of the MSE between student and (aligned) teacher hidden states at the positions of
    `mask`."""
    keep = mask.bool()
    losses = [((s.float() - t.float()) ** 2)[keep].mean() for t, s in zip(teacher, student)]
    return torch.stack(losses).mean()
