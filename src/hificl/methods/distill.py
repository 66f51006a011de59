"""Distillation of k demonstrations into an adapter, from unlabelled queries only.

The teacher is the frozen model with k labelled demonstrations in its context (`labelled` examples in all: the
demonstrations are drawn from that pool, at random or retrieved per query; with ``draws > 1`` an ensemble of
that many draws, whose next-token distributions are averaged). The student is the zero-shot prompt plus a HiFICL
adapter (``student: hificl``; ``live`` or ``mimic`` give those baselines the same data and teacher). For each
training query the teacher first answers greedily (an ensemble: the majority of its draws' answers); the loss is
then the KL divergence between the teacher's and the student's next-token distributions where each token of that
answer (and its end) is predicted (MimIC's student: its layer-wise MLP alignment on the teacher's answer
instead), plus ``ce_weight`` x the student's cross-entropy on that answer (0: pure distillation). No label of the
training queries is ever read: the pipeline hands this method `hificl.tasks.Query` objects, which have none, drawn
from outside the labelled pool, and picks no epoch on labelled validation questions (the last epoch is used).

The virtual pairs start as the paper's random factors (``init: random``), or from the teacher's own
demonstration tokens (``init: demonstrations``): for each layer and query head, the post-RoPE keys and values of
the ``n`` demonstration tokens the queries attend to most, factorised to rank r (a truncated SVD) or kept full
rank (``full_rank_keys`` / ``full_rank_values``).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import AdapterModel
from ..core.validate import choice, integer, number
from ..generation import generate_answers
from ..adapters import HiFICLModel
from ..tuner import HiFICLConfig
from ..tuner.config import HIFICL_FIELDS
from ..objectives import (Teacher, TeacherBatch, TeacherMLPAlignment, TeacherObjective, answer_positions,
                          answer_tokens)
from ..prompting import KShot
from ..tasks import Example, Query, unlabelled
from .base import Method, Parts
from .live import LiveConfig, LiveModel
from .mimic import MimicConfig, MimicModel


class TeacherAnswers:
    """The teacher's own answers to unlabelled queries: greedy, with the adapter disabled (an ensemble of
    teachers: the majority answer, ties to the first draw). `prepare` generates them all before training, in
    batches of `batch_size` queries in the given order dealt out to the processes, so the answers do not depend on
    the number of processes, the micro-batches or a resume."""

    def __init__(self, backbone, task, teachers: list[Teacher], adapter: AdapterModel, batch_size: int = 8):
        self.backbone, self.task, self.teachers, self.adapter = backbone, task, teachers, adapter
        self.batch_size = batch_size
        self.answers: dict[str, str] = {}

    @torch.no_grad()
    def _generate(self, queries: list[Query]) -> dict[str, str]:
        model, backbone = self.adapter, self.backbone
        was_training = model.training
        model.eval()
        draws = []
        for teacher in self.teachers:
            batch = backbone.encode(teacher.prompts(queries), padding_side="left", names=[q.id for q in queries])
            batch = {k: v.to(backbone.device) for k, v in batch.items()}
            with model.disable_adapter():
                raws = generate_answers(model, backbone, self.task, batch, self.task.max_new_tokens)
            draws.append([self.task.postprocess(raw) for raw in raws])
        model.train(was_training)
        answers = {}
        for index, query in enumerate(queries):
            votes = Counter(draw[index] for draw in draws)
            best = max(votes.values())
            answers[query.id] = next(draw[index] for draw in draws if votes[draw[index]] == best)
        return answers

    def prepare(self, queries: list[Query], progress: bool = True) -> None:
        """Generate the answers of every training query (each process its share of the batches, then gathered),
        with a progress bar (ETA) on the main process."""
        from accelerate.utils import gather_object

        from ..distributed import process_state

        state = process_state()
        missing = [q for q in queries if q.id not in self.answers]
        batches = [missing[i:i + self.batch_size] for i in range(0, len(missing), self.batch_size)]
        mine_batches = batches[state.process_index::state.num_processes]
        mine = {}
        with tqdm(total=sum(len(b) for b in mine_batches), desc="teacher answers", unit="q", dynamic_ncols=True,
                  disable=not (progress and state.is_main_process)) as bar:
            for batch in mine_batches:
                mine.update(self._generate(batch))
                bar.update(len(batch))
        for answers in (gather_object([mine]) if state.num_processes > 1 else [mine]):
            self.answers.update(answers)

    def __call__(self, queries: list[Query]) -> list[Example]:
        """`queries` labelled with the teacher's answers (post-processed as the task does)."""
        missing = [q for q in queries if q.id not in self.answers]
        if missing:  # outside a trainer, which prepares them all first
            self.answers.update(self._generate(missing))
        return [Example(q.id, q.question, (self.answers[q.id],), q.image, target=self.answers[q.id]) for q in queries]


class TeacherAnswerKL(TeacherObjective):
    """KL(teacher || student) at the positions predicting the teacher's own greedy answer (+ ``ce_weight`` x CE
    on it); the teacher an ensemble of `teachers` (their next-token distributions averaged)."""

    def __init__(self, backbone, task, prompter, answers: TeacherAnswers, ce_weight: float = 0.0):
        super().__init__(backbone, task, prompter, answers.teachers[0])
        self.answers, self.teachers, self.ce_weight = answers, answers.teachers, ce_weight

    def prepare(self, items: list[Query], progress: bool = True) -> None:
        self.answers.prepare(items, progress)

    def batch(self, items: list[Query]) -> list[TeacherBatch]:
        """One aligned batch per teacher draw (the same student inputs)."""
        labelled = self.answers(items)
        student = self.student_batch(labelled)
        return [teacher.batch(labelled, student) for teacher in self.teachers]

    def counts(self, batches: list[TeacherBatch]) -> list[int]:
        first = batches[0]
        where = answer_positions(first.student["labels"]) & first.aligned()
        return [int(where.sum())] + ([answer_tokens(first.student["labels"])] if self.ce_weight else [])

    def terms(self, model: nn.Module, batches: list[TeacherBatch]) -> list[tuple[float, torch.Tensor]]:
        first = batches[0]
        out = model(**first.student)
        probs = None
        for batch in batches:
            logits, _ = Teacher.run(model, batch)
            p = torch.softmax(batch.align(logits).float(), -1)
            probs = p if probs is None else probs + p
        probs = probs / len(batches)
        where = answer_positions(first.student["labels"]) & first.aligned()
        teacher_log = torch.log(probs[where].clamp_min(1e-30))
        student_log = torch.log_softmax(out.logits[where].float(), -1)
        kl = (probs[where] * (teacher_log - student_log)).sum(-1).mean()
        return [(1.0, kl)] + ([(self.ce_weight, out.loss)] if self.ce_weight else [])

    def set_epoch(self, epoch: int) -> None:
        for teacher in self.teachers:
            teacher.set_epoch(epoch)


class TeacherAnswerAlignment(TeacherMLPAlignment):
    """MimIC's layer-wise MLP alignment (+ CE) with the teacher's own answer in place of the label."""

    def __init__(self, backbone, task, prompter, answers: TeacherAnswers, mlps, ce_weight: float = 0.0):
        super().__init__(backbone, task, prompter, answers.teachers[0], mlps, align_weight=1.0, ce_weight=ce_weight)
        self.answers = answers

    def prepare(self, items: list[Query], progress: bool = True) -> None:
        self.answers.prepare(items, progress)

    def batch(self, items: list[Query]) -> TeacherBatch:
        labelled = self.answers(items)
        return self.teacher.batch(labelled, self.student_batch(labelled))


class Distill(Method):
    """Options: ``shots`` (k, the demonstrations in a teacher context), ``labelled`` (the labelled examples in
    all, the pool the demonstrations come from; default k), ``selection`` ("random" or "retrieval"), ``draws``
    (teacher contexts averaged: an ensemble), ``ce_weight``, ``init`` ("random" or "demonstrations"), and any
    `HiFICLConfig` field (num_virtual_tokens, rank, full_rank_keys, ...)."""

    name = "distill"
    trainable = True
    unlabelled = True  # trains on queries without their answers

    def __init__(self, shots: int = 8, labelled: int | None = None, selection: str = "random", draws: int = 1,
                 ce_weight: float = 0.0, init: str = "random", student: str = "hificl", **options: Any):
        super().__init__()
        self.student = choice(student, "distill: student", ("hificl", "live", "mimic"))
        if student != "hificl" and (options or init != "random"):
            raise ValueError(f"distill: HiFICL options and init apply to student hificl, not {student!r}.")
        if student == "mimic" and draws > 1:
            raise ValueError("distill: a MimIC student aligns with one teacher context: draws must be 1.")
        if selection == "retrieval" and draws > 1:
            raise ValueError("distill: retrieved demonstrations are the same in every draw: an ensemble needs "
                             "selection: random.")
        self.shots = integer(shots, "distill: shots")
        self.labelled = integer(labelled, "distill: labelled", allow_none=True) or self.shots
        if self.labelled < self.shots:
            raise ValueError(f"distill: labelled ({self.labelled}) must be at least shots ({self.shots}).")
        self.selection = choice(selection, "distill: selection", ("random", "retrieval"))
        self.draws = integer(draws, "distill: draws")
        self.ce_weight = float(number(ce_weight, "distill: ce_weight"))
        self.init = choice(init, "distill: init", ("random", "demonstrations"))
        self.config = HiFICLConfig(**options)

    @classmethod
    def option_names(cls) -> list[str]:
        return sorted(set(super().option_names()) | set(HIFICL_FIELDS))

    @property
    def options(self) -> dict[str, Any]:
        config = self.config.settings()
        return {"shots": self.shots, "labelled": self.labelled, "selection": self.selection, "draws": self.draws,
                "ce_weight": self.ce_weight, "init": self.init, "student": self.student,
                **(config if self.student == "hificl" else {})}

    @property
    def label(self) -> str:
        parts = [f"{self.shots} of {self.labelled} labelled" if self.labelled != self.shots else f"{self.shots}-shot"]
        if self.selection == "retrieval":
            parts.append("retrieved")
        if self.draws > 1:
            parts.append(f"ensemble of {self.draws}")
        if self.init != "random":
            parts.append(f"init {self.init}")
        student = {"hificl": "", "live": "LIVE ", "mimic": "MimIC "}[self.student]
        return f"{student}distilled ({', '.join(parts)})"

    @classmethod
    def from_saved(cls, config: dict[str, Any]) -> Method:
        raise ValueError("A distilled adapter records how it was distilled (trained_by); this one does not.")

    def teachers(self, backbone, task, seeds, adapter: AdapterModel) -> list[Teacher]:
        """The teacher contexts: demonstrations from the `labelled` pool (the first `labelled` of the run's seeded
        shuffle of train: the pool k-shot ICL rows with ``pool_size: k`` use), one draw per ensemble member."""
        teachers = []
        for draw in range(self.draws):
            prompter = KShot(task, backbone, self.shots, self.selection, self.labelled, data_seed=seeds.data,
                             demos_seed=seeds.replicate)
            prompter.draw = draw
            teachers.append(Teacher(backbone, task, prompter, adapter=adapter))
        return teachers

    def build(self, backbone, task, seeds) -> Parts:
        prompter = self.prompter(backbone, task, seeds)
        if self.student == "live":
            adapter = LiveModel(backbone.model, LiveConfig(init_seed=seeds.replicate))
        elif self.student == "mimic":
            adapter = MimicModel(backbone.model, MimicConfig(init_seed=seeds.replicate))
        else:
            config = self.config
            if config.init_seed is None:
                config = dataclasses.replace(config, init_seed=seeds.replicate)
            adapter = HiFICLModel(backbone.model, config)
        teachers = self.teachers(backbone, task, seeds, adapter)
        if self.init == "demonstrations":
            queries = [unlabelled(e) for e in task.subset("train", self.labelled + 4, seeds.data)[self.labelled:]]
            initialise_from_demonstrations(adapter, backbone, teachers[0], task, queries)
        answers = TeacherAnswers(backbone, task, teachers, adapter)
        if self.student == "mimic":
            objective = TeacherAnswerAlignment(backbone, task, prompter, answers, adapter.routing.mlps(), self.ce_weight)
            return Parts(prompter, adapter, adapter, objective, [{"params": ["shifts.bias"], "weight_decay": 0.0}],
                         method=self)
        return Parts(prompter, adapter, adapter, TeacherAnswerKL(backbone, task, prompter, answers, self.ce_weight),
                     method=self)

    def data_budget(self, train_examples: int) -> dict[str, int]:
        return {"labelled": self.labelled, "unlabelled": train_examples}

    def labelled_ids(self, task, seeds) -> set[str]:
        """The ids of the only labelled examples the method reads: its teachers' demonstration pool."""
        return {e.id for e in task.subset("train", self.labelled, seeds.data)}


def _demonstration_spans(teacher_ids: torch.Tensor, teacher_mask: torch.Tensor, student_ids: torch.Tensor,
                         student_mask: torch.Tensor) -> list[tuple[int, int]]:
    """Per row of right-padded teacher and student (query alone) encodings: (where the query's tokens start in the
    teacher's sequence, where its real tokens end). The two end alike, so the tokens they share at the end are the
    query's; what the teacher has before them is its demonstrations (and the instruction or system turn)."""
    spans = []
    for row in range(teacher_ids.shape[0]):
        n_teacher, n_student = int(teacher_mask[row].sum()), int(student_mask[row].sum())
        theirs, ours = teacher_ids[row, :n_teacher].tolist(), student_ids[row, :n_student].tolist()
        shared = 0
        while shared < min(n_teacher, n_student) and theirs[n_teacher - 1 - shared] == ours[n_student - 1 - shared]:
            shared += 1
        spans.append((n_teacher - shared, n_teacher))
    return spans


@torch.no_grad()
def initialise_from_demonstrations(adapter: HiFICLModel, backbone, teacher: Teacher, task, queries: list[Query]) -> None:
    """Set each layer's virtual keys and values to the post-RoPE keys and values of the demonstration tokens its
    query heads attend to most (in the teacher's prompts of a few unlabelled queries), factorised to the
    adapter's rank by a truncated SVD, or kept as they are for full-rank factors."""
    from ..inspect import capture_attention

    batch = backbone.encode(teacher.prompts(queries), padding_side="right")
    alone = backbone.encode([task.query_prompt(q) for q in queries], padding_side="right")
    spans = _demonstration_spans(batch["input_ids"], batch["attention_mask"], alone["input_ids"],
                                 alone["attention_mask"])
    batch = {k: v.to(backbone.device) for k, v in batch.items()}
    with adapter.disable_adapter(), capture_attention(adapter) as captured:
        adapter(**batch)
    config = adapter.peft_config[adapter.active_adapter]
    n = config.num_virtual_tokens
    for layer, (query, key, value, visible) in captured.items():
        layer_kv = adapter.adapters[adapter.active_adapter].get(layer)
        if layer_kv is None:
            continue
        heads, groups = query.shape[1], query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1).float(), value.repeat_interleave(groups, 1).float()
        scores = (query.float() @ key.transpose(-1, -2)) * query.shape[-1] ** -0.5
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)  # [b, h, q, k]
        keys, values = [], []
        for h in range(heads):
            attended = []  # (attention mass from the query's own tokens, row, position) of demonstration tokens
            for row, (demo_length, end) in enumerate(spans):
                mass = probs[row, h, demo_length:end, :demo_length].sum(0)
                attended += [(float(m), row, pos) for pos, m in enumerate(mass.tolist()) if pos > 0]  # no sink
            chosen = sorted(attended, reverse=True)[:n]
            chosen += chosen[: n - len(chosen)] if len(chosen) < n else []
            keys.append(torch.stack([key[row, h, pos] for _, row, pos in chosen]))
            values.append(torch.stack([value[row, h, pos] for _, row, pos in chosen]))
        _set_factors(layer_kv, torch.stack(keys), torch.stack(values), config.rank)


def _set_factors(layer_kv, keys: torch.Tensor, values: torch.Tensor, rank: int) -> None:
    """Keys/values ``[h, n, d]`` into a `VirtualKV`: full-rank tensors as they are, else a rank-r truncated SVD
    ``U S^(1/2) @ S^(1/2) V^T`` (the best rank-r approximation)."""
    for target, name in ((keys, "k"), (values, "v")):
        full = getattr(layer_kv, f"{name}_full", None)
        if full is not None:
            full.copy_(target.to(full.dtype))
            continue
        u, s, vh = torch.linalg.svd(target.double(), full_matrices=False)
        r = min(rank, s.shape[-1])
        a = torch.zeros(getattr(layer_kv, f"{name}_a").shape, dtype=torch.float64)
        b = torch.zeros(getattr(layer_kv, f"{name}_b").shape, dtype=torch.float64)
        a[..., :r] = u[..., :r] * s[..., None, :r].sqrt()
        b[..., :r, :] = s[..., :r, None].sqrt() * vh[..., :r, :]
        getattr(layer_kv, f"{name}_a").copy_(a.to(getattr(layer_kv, f"{name}_a").dtype))
        getattr(layer_kv, f"{name}_b").copy_(b.to(getattr(layer_kv, f"{name}_b").dtype))
