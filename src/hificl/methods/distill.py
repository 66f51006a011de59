"""Distillation of k demonstrations into an adapter, from unlabelled queries only.

The teacher is the frozen model with k labelled demonstrations in its context (`labelled` examples in all: the
demonstrations are drawn from that pool, at random or retrieved per query; with ``draws > 1`` an ensemble of
that many draws, whose next-token distributions are averaged: each draw its own random k of the pool, in its own
order, per query, so with ``labelled`` = k the draws are orders of the same k, and with ``labelled`` > k, e.g.
``shots: 6, labelled: 8``, different subsets of the same labelled examples). The student is the zero-shot prompt
plus the adapter of a trained method (``student: hificl``, or ``live``, ``mimic``, ``lora``, ...), built by that
method's own recipe: its adapter, its optimiser groups (LIVE's learning rates, MimIC's bias without weight decay)
and its adapter options (e.g. ``rank`` for HiFICL); the options of the student's own objective do not apply. For
each training query the teacher first answers greedily (an ensemble: the majority of its draws' answers); the
loss is then the student method's distillation objective (`Method.distillation_objective`): the KL divergence
between the teacher's and the student's next-token distributions where each token of that answer (and its end)
is predicted (MimIC: its layer-wise MLP alignment on the teacher's answer instead), plus ``ce_weight`` x the
student's cross-entropy on that answer (0: pure distillation). No label of the training queries is ever read:
the pipeline hands this method `hificl.tasks.Query` objects, which have none, drawn from outside the labelled
pool, and picks no epoch on labelled validation questions (the last epoch is used).

Two options use more of what the teacher holds (KL-distilling students only; the MimIC student has its own
objective): ``labelled_weight`` adds that weight x the student's cross-entropy on the true answers of the labelled
examples themselves, asked as zero-shot queries (the teacher's demonstrations: labels the method reads anyway), and
``confidence`` ("none", "weight" or "filter" below ``min_confidence``) weighs each unlabelled query by the
teacher's probability of its own answer (`hificl.distillation.TeacherAnswerKL`).

A HiFICL student's virtual pairs start as the paper's random factors (``init: random``), or from the teacher's own
demonstration tokens (``init: demonstrations``, `hificl.distillation.initialise_from_demonstrations`). Unlike the
paper's trained HiFICL, the student adds its virtual term to the attention output (``fixed_alpha: true``, HiFICL's
"alpha fixed to 1" ablation) unless told ``fixed_alpha: false``: its values start at zero, so the student starts
exactly at the zero-shot model, while the paper's formula lets the random virtual keys take softmax mass from the
prompt. With a few dozen unlabelled queries that start decides the result: on the elements example the paper's
formula starts at 2.1% (the backbone alone 52.1%) and its students end 12 points under their teacher; the
zero-shot start ends at or above it (README, "Beyond the paper").
"""

from __future__ import annotations

from typing import Any

from ..core.validate import choice, integer, number
from ..adapters import AdapterModel
from ..distillation import TeacherAnswers, initialise_from_demonstrations
from ..objectives import Teacher
from ..prompting import KShot
from ..tasks import unlabelled
from .base import Method


class Distill(Method):
    """Options: ``shots`` (k, the demonstrations in a teacher context), ``labelled`` (the labelled examples in
    all, the pool the demonstrations come from; default k), ``selection`` ("random" or "retrieval"), ``draws``
    (teacher contexts averaged: an ensemble), ``ce_weight``, ``align_weight`` (the attention outputs aligned with
    the teacher's, `hificl.distillation.TeacherAnswerKL`), ``labelled_weight`` (x the cross-entropy on the true
    answers of the labelled pool, asked zero-shot), ``confidence`` ("none"; "weight": each query's terms x the
    teacher's probability of its own answer; "filter": x 1 where that probability is at least ``min_confidence``,
    default 0.5, else 0), ``init`` ("random" or "demonstrations", HiFICL students), ``student`` (a trained
    method: "hificl", "live", "mimic", "lora", ...) and the student method's own options except those of its
    objective (for HiFICL, any `HiFICLConfig` field: num_virtual_tokens, rank, ...; ``fixed_alpha`` is true unless
    given: the student starts at the zero-shot model)."""

    name = "distill"
    trainable = True
    unlabelled = True  # trains on queries without their answers

    def __init__(self, shots: int = 8, labelled: int | None = None, selection: str = "random", draws: int = 1,
                 ce_weight: float = 0.0, init: str = "random", student: str = "hificl", align_weight: float = 0.0,
                 labelled_weight: float = 0.0, confidence: str = "none", min_confidence: float | None = None,
                 **options: Any):
        super().__init__()
        students = _students()
        name = choice(student, "distill: student", sorted(students))
        objective_only = sorted(set(options) & set(students[name].objective_options))
        if objective_only:
            raise ValueError(f"distill: {objective_only} set the {name} method's own training objective, which "
                             "distillation replaces: drop them (distill's own: ce_weight, confidence, draws, init, "
                             "labelled, labelled_weight, min_confidence, selection, shots).")
        if name == "hificl" and options.get("normalizer", "exact") == "exact":
            options.setdefault("fixed_alpha", True)  # start at the zero-shot model (module docstring)
        try:
            self.student = students[name](**options)
        except ValueError as error:
            raise ValueError(f"distill (student {name}): {error}") from None
        self.init = choice(init, "distill: init", ("random", "demonstrations"))
        if self.init == "demonstrations" and name != "hificl":
            raise ValueError(f"distill: init: demonstrations sets virtual key-value pairs, which student {name!r} "
                             "does not have: use student: hificl, or init: random.")
        if draws > 1 and not students[name].distils_ensembles:
            raise ValueError(f"distill: a {self.student.label} student aligns with one teacher context: draws must "
                             "be 1.")
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
        self.align_weight = float(number(align_weight, "distill: align_weight"))
        self.labelled_weight = float(number(labelled_weight, "distill: labelled_weight"))
        self.confidence = choice(confidence, "distill: confidence", ("none", "weight", "filter"))
        if min_confidence is not None and self.confidence != "filter":
            raise ValueError(f"distill: min_confidence is the threshold of confidence: filter (confidence is "
                             f"{self.confidence!r}): drop it or set confidence: filter.")
        self.min_confidence = float(number(0.5 if min_confidence is None else min_confidence,
                                           "distill: min_confidence", positive=True))
        if self.min_confidence > 1:
            raise ValueError(f"distill: min_confidence is a probability: at most 1, got {self.min_confidence!r}.")
        own = students[name].distillation_objective is not Method.distillation_objective
        for option, value, off in (("align_weight", self.align_weight, "0"),
                                   ("labelled_weight", self.labelled_weight, "0"),
                                   ("confidence", self.confidence != "none", "none")):
            if own and value:
                raise ValueError(f"distill: a {self.student.label} student learns by its own distillation "
                                 f"objective, which takes no {option}: {option} must be {off}.")

    @classmethod
    def option_names(cls) -> list[str]:
        """Distill's own options and those of any student method (its objective's are refused by name)."""
        students = {name for klass in _students().values() for name in klass.option_names()}
        return sorted(set(super().option_names()) | students)

    @property
    def options(self) -> dict[str, Any]:
        student = {k: v for k, v in self.student.options.items() if k not in self.student.objective_options}
        return {"shots": self.shots, "labelled": self.labelled, "selection": self.selection, "draws": self.draws,
                "ce_weight": self.ce_weight, "init": self.init, "student": self.student.name,
                **({"align_weight": self.align_weight} if self.align_weight else {}),
                **({"labelled_weight": self.labelled_weight} if self.labelled_weight else {}),
                **({"confidence": self.confidence} if self.confidence != "none" else {}),
                **({"min_confidence": self.min_confidence} if self.confidence == "filter" else {}), **student}

    @property
    def label(self) -> str:
        parts = [f"{self.shots} of {self.labelled} labelled" if self.labelled != self.shots else f"{self.shots}-shot"]
        if self.selection == "retrieval":
            parts.append("retrieved")
        if self.draws > 1:
            parts.append(f"ensemble of {self.draws}")
        if self.init != "random":
            parts.append(f"init {self.init}")
        if self.align_weight:
            parts.append(f"attention aligned x{self.align_weight:g}")
        if self.labelled_weight:
            parts.append(f"labelled CE x{self.labelled_weight:g}")
        if self.confidence == "weight":
            parts.append("confidence-weighted")
        elif self.confidence == "filter":
            parts.append(f"confidence >= {self.min_confidence:g}")
        if self.student.name == "hificl":
            ablations = self.student.ablations  # fixed_alpha is the student's default; its absence is named
            parts += [a for a in ablations if a != "fixed_alpha"]
            if "fixed_alpha" not in ablations:
                parts.append("paper formula")
        student = "" if self.student.name == "hificl" else f"{self.student.label} "
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

    # the student method's recipe, with distillation's objective
    def adapter(self, backbone, seeds) -> AdapterModel:
        return self.student.adapter(backbone, seeds)

    def param_groups(self) -> list[dict[str, Any]]:
        return self.student.param_groups()

    def objective(self, backbone, task, prompter, adapter, seeds):
        teachers = self.teachers(backbone, task, seeds, adapter)
        if self.init == "demonstrations":
            queries = [unlabelled(e) for e in task.subset("train", self.labelled + 4, seeds.data)[self.labelled:]]
            initialise_from_demonstrations(adapter, backbone, teachers[0], task, queries)
        answers = TeacherAnswers(backbone, task, teachers, adapter)
        options = {}  # set only where used: a student with its own distillation objective takes none (refused above)
        if self.labelled_weight:
            options.update(labelled=task.subset("train", self.labelled, seeds.data),
                           labelled_weight=self.labelled_weight)
        if self.confidence != "none":
            options.update(confidence=self.confidence, min_confidence=self.min_confidence)
        return self.student.distillation_objective(backbone, task, prompter, adapter, answers, self.ce_weight,
                                                   self.align_weight, **options)

    def data_budget(self, train_examples: int) -> dict[str, int]:
        return {"labelled": self.labelled, "unlabelled": train_examples}

    def labelled_ids(self, task, seeds) -> set[str]:
        """The ids of the only labelled examples the method reads: its teachers' demonstration pool."""
        return {e.id for e in task.subset("train", self.labelled, seeds.data)}


def _students() -> dict[str, type[Method]]:
    """The methods a student can be: every registered trained method that learns from labels (not distill)."""
    from . import METHODS  # the registry holds this module: read it when a distill method is made

    return {name: klass for name, klass in METHODS.items() if klass.trainable and not klass.unlabelled}
