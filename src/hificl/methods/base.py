"""The method interface: a method is a name, validated options and a recipe that composes its parts on a backbone
and a task -- a prompter (how a query is shown), an adapter (what is trained, PEFT-shaped) and an objective (the
batches and the loss). Trainer, evaluator and pipeline only see the parts."""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import InitVar, dataclass, field
from typing import Any, ClassVar

from torch import nn

from ..adapters import AdapterModel, load_adapter_model
from ..backbones import Backbone
from ..core.validate import unknown_options
from ..distillation import TeacherAnswerKL, TeacherAnswers
from ..objectives import AnswerLoss
from ..prompting import Prompter
from ..routing import find_language_model
from ..seeding import Seeds
from ..tasks import Task


@dataclass
class Parts:
    """A method set up on a backbone and a task.

    Attributes:
        prompter: how each query is shown to the model.
        model: the module that is trained and generates (the adapter model, or the backbone's model).
        adapter: the adapter model (None for training-free methods).
        objective: the training batches and loss (None for training-free methods).
        param_groups: optimiser groups ``{"params": [parameter names], ...settings}`` for parameters with their
            own learning rate or weight decay; the other trainable parameters use the run's settings.
        method: the method that builds these parts to train them: its name and options are recorded in the
            adapter (``trained_by`` in the saved config), so an evaluation of the saved folder reports them.
    """

    prompter: Prompter
    model: nn.Module
    adapter: AdapterModel | None = None
    objective: AnswerLoss | None = None
    param_groups: list[dict[str, Any]] = field(default_factory=list)
    method: InitVar["Method | None"] = None  # the trained method, recorded in its adapter

    def __post_init__(self, method: "Method | None") -> None:
        if self.adapter is not None and method is not None:  # what trained it, in its saved config
            self.adapter.record_training(method.name, method.options)

    def close(self) -> None:
        """Give the backbone's model back as it was."""
        if self.adapter is not None:
            self.adapter.unload()
            self.adapter = None


class Method:
    """Base class. Subclasses set `name` (the registry key) and `trainable`, validate their options in `__init__`
    and give their `options` and `label`. A training-free method may override `prompter`; a trained one gives its
    recipe: `adapter` (required), `objective` (default: cross-entropy on the answer) and `param_groups`, which
    `build` composes -- and which `hificl.methods.distill` reuses to distil into the method's adapter."""

    name: ClassVar[str]
    trainable: ClassVar[bool] = False
    unlabelled: ClassVar[bool] = False  # trains on queries without answers (see `labelled_ids`)
    objective_options: ClassVar[tuple[str, ...]] = ()  # options of the objective alone (a distilled student has none)
    distils_ensembles: ClassVar[bool] = True  # whether its distillation objective takes an ensemble of teachers

    def __init__(self, **options: Any):
        if options:
            raise ValueError(unknown_options(f"Method {self.name!r}", options, self.option_names()))
        self.train_overrides: dict[str, Any] = {}  # per-method training settings (e.g. LoRA's learning rate)

    @classmethod
    def option_names(cls) -> list[str]:
        """The options the method takes: the keyword parameters of its constructors, up the class chain for as
        long as a constructor passes ``**options`` on (a method whose options feed a config adds its fields)."""
        names: set[str] = set()
        for klass in cls.__mro__:
            if klass is Method:
                break
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            parameters = list(inspect.signature(init).parameters.values())[1:]
            names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
            if not any(p.kind is p.VAR_KEYWORD for p in parameters):
                break
        return sorted(names)

    @property
    def options(self) -> dict[str, Any]:
        """The method's settings (defaults filled in), as JSON-able values."""
        return {}

    @property
    def label(self) -> str:
        """How tables name the method."""
        return self.name

    @property
    def random(self) -> bool:
        """Whether the method has randomness of its own (initialisation, data order, drawn demonstrations), so
        that a run repeats it once per seed."""
        return self.trainable

    @property
    def id(self) -> str:
        """A stable identifier: the name and a short hash of the options and the method's own training settings
        (names result folders)."""
        settings = {**self.options, **({"train": self.train_overrides} if self.train_overrides else {})}
        digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
        return f"{self.name}-{digest}" if settings else self.name

    def settings(self) -> dict[str, Any]:
        """The options and the method's own training settings (``train.<name>``), flat."""
        return {**self.options, **{f"train.{k}": v for k, v in self.train_overrides.items()}}

    def describe(self) -> dict[str, Any]:
        """The method's label and settings, for reports."""
        return {"method": self.label, "name": self.name, **self.options,
                **({"train": self.train_overrides} if self.train_overrides else {})}

    def prompter(self, backbone: Backbone, task: Task, seeds: Seeds) -> Prompter:
        """How the method shows a query (default: the query prompt alone)."""
        return Prompter(task)

    def build(self, backbone: Backbone, task: Task, seeds: Seeds) -> Parts:
        """The method's parts on `backbone` and `task`: its prompter, and for a trained method its freshly
        initialised adapter, objective and optimiser groups."""
        prompter = self.prompter(backbone, task, seeds)
        if not self.trainable:
            return Parts(prompter, backbone.model)
        adapter = self.adapter(backbone, seeds)
        try:
            objective = self.objective(backbone, task, prompter, adapter, seeds)
        except BaseException:
            adapter.unload()  # the backbone as it was
            raise
        return Parts(prompter, adapter, adapter, objective, self.param_groups(), method=self)

    def adapter(self, backbone: Backbone, seeds: Seeds) -> AdapterModel:
        """A trained method's adapter on the backbone's model, initialised from the replicate's seed."""
        raise NotImplementedError(f"Method {self.name!r} trains no adapter.")

    def objective(self, backbone: Backbone, task: Task, prompter: Prompter, adapter: AdapterModel, seeds: Seeds):
        """What a trained method minimises (default: cross-entropy on the answer tokens)."""
        return AnswerLoss(backbone, task, prompter)

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups of parameters with settings of their own (see `Parts.param_groups`)."""
        return []

    def distillation_objective(self, backbone: Backbone, task: Task, prompter: Prompter, adapter: AdapterModel,
                               answers: TeacherAnswers, ce_weight: float, align_weight: float = 0.0, **options):
        """What the method's adapter minimises as a distillation student (`hificl.methods.distill`): by default the
        KL divergence from the k-shot teacher where its own answer is predicted (and, with `align_weight`, the
        alignment of the language model's attention outputs with the teacher's; `options`: the labelled examples'
        cross-entropy and the confidence weighting of `TeacherAnswerKL`, which distill passes only where they are
        set, and refuses for a student whose own objective takes none)."""
        attention = find_language_model(backbone.model).attention_modules if align_weight else None
        return TeacherAnswerKL(backbone, task, prompter, answers, ce_weight, align_weight, attention, **options)

    def load(self, backbone: Backbone, task: Task, seeds: Seeds, folder) -> Parts:
        """The parts of a trained method around the adapter saved in `folder` (for evaluation)."""
        adapter = load_adapter_model(backbone.model, folder)
        return Parts(self.prompter(backbone, task, seeds), adapter, adapter)

    def labelled_ids(self, task: Task, seeds: Seeds) -> set[str]:
        """For a method trained on unlabelled queries: the ids of the only labelled examples it reads (kept out
        of its training queries)."""
        return set()

    def data_budget(self, train_examples: int) -> dict[str, int]:
        """The labelled examples the method trains on (and, trained on unlabelled queries, how many of those),
        given the run's training examples; the demonstrations its prompts show are counted by the prompter."""
        return {"labelled": train_examples if self.trainable else 0}

    @classmethod
    def from_saved(cls, config: dict[str, Any]) -> "Method":
        """The method of a saved adapter that records no ``trained_by`` (saved by an earlier version, or trained
        outside hificl), from what its adapter_config.json holds (trained methods only)."""
        raise ValueError(f"Method {cls.name!r} trains no adapter.")


def distinct_labels(methods: list[Method]) -> dict[str, str]:
    """A table label per method id: the method's label, and where two methods share it, the settings in which
    they differ (e.g. "HiFICL (rank=4)" and "HiFICL (rank=8)", "LoRA (train.lr=0.0005)")."""
    labels = {}
    for method in methods:
        twins = [m for m in methods if m.label == method.label]
        settings = [m.settings() for m in twins]
        differing = [k for k in sorted({k for s in settings for k in s})
                     if len({json.dumps(s.get(k), sort_keys=True, default=str) for s in settings}) > 1]
        mine = method.settings()
        suffix = ", ".join(f"{k}={'default' if mine.get(k) is None else mine[k]}" for k in differing)
        label = method.label
        if suffix:
            label = f"{label[:-1]}; {suffix})" if label.endswith(")") else f"{label} ({suffix})"
        labels[method.id] = label
    return labels
