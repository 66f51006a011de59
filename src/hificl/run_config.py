"""The run configuration of `hificl train | eval | compare`: YAML files plus ``--set key=value`` overrides,
validated field by field (no eval of strings: values are parsed as YAML scalars)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .evaluator import GenerationConfig
from .trainer import TrainConfig

DEFAULT_CONFIG = "embedded-easyvqa"


@dataclass
class RunConfig:
    """Everything a run needs. See `configs/embedded-easyvqa.yaml` for a documented example.

    Attributes:
        backbone: "embedded" (default SmolVLM), "embedded-text" (SmolLM2 alone), or a local folder / model id.
        dtype: the backbone's dtype ("float32", "bfloat16", "float16").
        chat_template: null uses the model's chat template where it has one (the embedded models keep plain
            prompts), true requires it, false uses plain prompts (e.g. the paper's Idefics2 base prompt).
        task: {"name": a registered task, plus its options} (e.g. {"name": "jsonl", "train": ..., "test": ...}).
        methods: a list of {"name": method, plus its options}; `train` uses the trainable one.
        train / eval: `TrainConfig` and `GenerationConfig` fields.
        train_samples: the first N of a seeded shuffle of train (null: all).
        validation_samples: validation questions scored after each epoch to pick the best epoch (0: none).
        test_samples: test questions for the reported numbers (null: the whole test split).
        data_efficiency: extra runs of the trainable method as [{samples: N, epochs: E}, ...] for the plot.
        seed: seeds data selection, demonstrations, initialisation and training.
        output_dir: where checkpoints, adapters, predictions and reports go.
        progress: show progress bars.
    """

    backbone: str | None = "embedded"
    dtype: str = "float32"
    chat_template: bool | None = None
    task: dict[str, Any] = field(default_factory=lambda: {"name": "easy-vqa"})
    methods: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "zero-shot"}, {"name": "hificl"}])
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: GenerationConfig = field(default_factory=GenerationConfig)
    train_samples: int | None = 1000
    validation_samples: int = 100
    test_samples: int | None = None
    data_efficiency: list[dict[str, int]] = field(default_factory=list)
    seed: int = 3407
    output_dir: str = "runs/hificl"
    progress: bool = True

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        if not isinstance(data, dict):
            raise ValueError(f"A run config must be a mapping, got {type(data).__name__}.")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown config field(s) {unknown}; known fields: {sorted(known)}.")
        data = dict(data)
        for key, kind in (("train", TrainConfig), ("eval", GenerationConfig)):
            section = data.get(key, {})
            if not isinstance(section, dict):
                raise ValueError(f"Config field {key!r} must be a mapping, got {section!r}.")
            if kind is GenerationConfig:
                bad = sorted(set(section) - set(GenerationConfig.__dataclass_fields__))
                if bad:
                    raise ValueError(f"Unknown eval setting(s) {bad}; known: {sorted(GenerationConfig.__dataclass_fields__)}.")
                data[key] = GenerationConfig(**section)
            else:
                data[key] = TrainConfig.from_dict(section)
        config = cls(**data)
        config.validate()
        return config

    def validate(self) -> None:
        if not isinstance(self.task, dict) or not isinstance(self.task.get("name"), str):
            raise ValueError(f"Config field 'task' must be a mapping with a 'name', got {self.task!r}.")
        if not isinstance(self.methods, list) or not self.methods:
            raise ValueError("Config field 'methods' must be a non-empty list of {name: ..., options...}.")
        for index, spec in enumerate(self.methods):
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                raise ValueError(f"methods[{index}] must be a mapping with a 'name', got {spec!r}.")
        for name in ("train_samples", "test_samples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"Config field {name!r} must be a positive int or null, got {value!r}.")
        if isinstance(self.validation_samples, bool) or not isinstance(self.validation_samples, int) or self.validation_samples < 0:
            raise ValueError(f"Config field 'validation_samples' must be an int >= 0, got {self.validation_samples!r}.")
        for index, point in enumerate(self.data_efficiency):
            if not isinstance(point, dict) or set(point) != {"samples", "epochs"} or not all(
                    isinstance(v, int) and v > 0 for v in point.values()):
                raise ValueError(f"data_efficiency[{index}] must be {{samples: N, epochs: E}} with positive ints, got {point!r}.")
        if self.chat_template is not None and not isinstance(self.chat_template, bool):
            raise ValueError(f"Config field 'chat_template' must be true, false or null, got {self.chat_template!r}.")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"Config field 'dtype' must be float32, bfloat16 or float16, got {self.dtype!r}.")

    def to_dict(self) -> dict[str, Any]:
        out = {name: copy.deepcopy(getattr(self, name)) for name in self.__dataclass_fields__}
        out["train"], out["eval"] = vars(self.train).copy(), vars(self.eval).copy()
        return out


def packaged_configs() -> list[str]:
    folder = resources.files("hificl") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_yaml(path: str | None) -> dict[str, Any]:
    """A YAML file by path, or a packaged config by name (default: the embedded easy-VQA comparison)."""
    name = path or DEFAULT_CONFIG
    if path and Path(path).is_file():
        text = Path(path).read_text(encoding="utf-8")
    elif name in packaged_configs():
        text = (resources.files("hificl") / "configs" / f"{name}.yaml").read_text(encoding="utf-8")
    else:
        raise FileNotFoundError(f"Config {path!r} is neither a file nor a packaged config ({packaged_configs()}).")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"Config {name}: invalid YAML ({error}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"Config {name}: the top level must be a mapping.")
    return data


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``dotted.key=value`` (list items by index, e.g. ``methods.1.shots=4``); the value is a YAML scalar."""
    if "=" not in assignment:
        raise ValueError(f"Override {assignment!r} must look like key=value (e.g. train.epochs=2).")
    path, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ValueError(f"Override {assignment!r}: cannot parse the value ({error}).") from None
    keys = path.strip().split(".")
    node: Any = data
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        where = ".".join(keys[: depth + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ValueError(f"Override {assignment!r}: {where} is not an index of a list of {len(node)}.")
            key = int(key)
        elif not isinstance(node, dict):
            raise ValueError(f"Override {assignment!r}: {'.'.join(keys[:depth])} is not a mapping or list.")
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and key not in node:
                node[key] = {}
            node = node[key]


def load_run_config(path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    data = read_yaml(path)
    for assignment in overrides or []:
        apply_override(data, assignment)
    return RunConfig.from_dict(data)
