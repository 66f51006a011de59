"""The settings of training and of generation, as the run config holds them: plain validated dataclasses (no
model, no accelerate), read by the trainer and the evaluator."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .core.validate import boolean, choice, integer, known_fields, number


@dataclass
class TrainConfig:
    """Training settings (defaults: the paper's recipe).

    Attributes:
        epochs: passes over the training examples.
        batch_size: examples per micro-batch (per process); grad_accum: micro-batches per optimiser step, over all
            processes together (any number). The effective batch is ``batch_size * grad_accum``.
        lr, weight_decay: AdamW's; warmup_ratio: share of the steps with a linear warm-up, then cosine decay to 0.
        max_grad_norm: gradient clipping (0 disables it).
        mixed_precision: "no", "bf16" or "fp16" (accelerate's autocast; trainable weights stay float32).
        select_metric: the validation metric that picks the best epoch (null: the task's own metric); its
            direction (higher or lower is better) comes from the metric registry.
        log_with: accelerate trackers that also receive the training metrics ("tensorboard", "wandb", ...; their
            files go under the run's output folder).
        checkpoint_every: also write a checkpoint every N optimiser steps (null: after every epoch only), so a
            killed run loses at most N steps.
        gradient_checkpointing: recompute the frozen backbone's activations in the backward pass instead of
            keeping them (bounded memory for long, many-image prompts; about one more forward per step).
    """

    epochs: int = 3
    batch_size: int = 2
    grad_accum: int = 2
    lr: float = 5e-3
    weight_decay: float = 1e-3
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    select_metric: str | None = None
    log_with: list[str] = field(default_factory=list)
    checkpoint_every: int | None = None
    gradient_checkpointing: bool = False

    def __post_init__(self):
        for name in ("epochs", "batch_size", "grad_accum"):
            integer(getattr(self, name), f"train.{name}")
        for name in ("weight_decay", "max_grad_norm"):
            number(getattr(self, name), f"train.{name}")
        number(self.lr, "train.lr", positive=True)
        number(self.warmup_ratio, "train.warmup_ratio", below=1)
        choice(self.mixed_precision, "train.mixed_precision", ("no", "bf16", "fp16"))
        if self.select_metric is not None and not isinstance(self.select_metric, str):
            raise ValueError(f"train.select_metric must be a metric name or null, got {self.select_metric!r}.")
        if isinstance(self.log_with, str):
            self.log_with = [self.log_with]
        if not isinstance(self.log_with, list):
            raise ValueError(f"train.log_with must be a list of tracker names, got {self.log_with!r}.")
        if self.log_with:
            from accelerate.utils import LoggerType

            for tracker in self.log_with:
                choice(tracker, "train.log_with entries", [t.value for t in LoggerType])
        integer(self.checkpoint_every, "train.checkpoint_every", allow_none=True)
        boolean(self.gradient_checkpointing, "train.gradient_checkpointing")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known_fields(data, cls.__dataclass_fields__, "train setting")
        return cls(**data)

    def optimisation(self) -> dict[str, Any]:
        """The settings that change what training computes (not how it is logged, checkpointed or selected)."""
        skip = ("select_metric", "log_with", "checkpoint_every", "gradient_checkpointing")
        return {k: v for k, v in asdict(self).items() if k not in skip}


@dataclass(frozen=True)
class Selection:
    """How the best epoch is chosen: by `metric` of the validation results, higher or lower being better."""

    metric: str
    higher_is_better: bool = True

    def best(self, history: list[dict[str, Any]]) -> int | None:
        key = f"val_{self.metric}"
        scored = [h for h in history if key in h]
        if not scored:
            return None
        pick = max if self.higher_is_better else min
        return pick(scored, key=lambda h: h[key])["epoch"]


@dataclass
class GenerationConfig:
    """Decoding settings. The paper: beam 3 (greedy for Idefics2), at most 20 new tokens, no sampling."""

    batch_size: int = 8
    num_beams: int = 1
    max_new_tokens: int | None = None  # None: the task's budget

    def __post_init__(self):
        for name in ("batch_size", "num_beams"):
            integer(getattr(self, name), f"eval.{name}")
        integer(self.max_new_tokens, "eval.max_new_tokens", allow_none=True)
