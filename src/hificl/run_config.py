"""The run configuration of `hificl train | eval | compare`: YAML files plus ``--set key=value`` overrides,
validated field by field (no eval of strings: values are parsed as YAML scalars).

A config may start from others with ``include: NAME`` (or a list of names): a packaged config, or a YAML file
(relative to the including file). Mappings are merged key by key, the including file winning; lists and scalars
are replaced. So a config states only what differs from its base (see ``configs/paper-base.yaml``).
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .core import DTYPES
from .core.validate import boolean, choice, integer, known_fields
from .seeding import DEFAULT_SEED
from .settings import GenerationConfig, TrainConfig

DEFAULT_CONFIG = "embedded-easyvqa"


class _Loader(yaml.SafeLoader):
    """YAML's safe loader reading ``1e-3`` (no dot, which YAML 1.1 requires of a float) as a float too."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+][0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


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
        seed: the run's seed: it picks the data (train / validation / test subsets, held-out splits) and, unless
            `seeds` is given, seeds initialisation, training order and random demonstrations (`hificl.seeding`).
        seeds: the replicates of every method with randomness of its own (trained methods, random
            demonstrations): one run per seed on the same data, reported as mean, spread and 95% confidence
            intervals (null: one replicate, seeded by `seed`).
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
    seed: int = DEFAULT_SEED
    seeds: list[int] | None = None
    output_dir: str = "runs/hificl"
    progress: bool = True

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        if not isinstance(data, dict):
            raise ValueError(f"A run config must be a mapping, got {type(data).__name__}.")
        known_fields(data, cls.__dataclass_fields__, "config")
        data = dict(data)
        for key in ("train", "eval"):
            if not isinstance(data.get(key, {}), dict):
                raise ValueError(f"Config field {key!r} must be a mapping, got {data[key]!r}.")
        data["train"] = TrainConfig.from_dict(data.get("train", {}))
        data["eval"] = GenerationConfig(**known_fields(data.get("eval", {}), GenerationConfig.__dataclass_fields__,
                                                       "eval setting"))
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
            integer(getattr(self, name), f"Config field {name!r}", allow_none=True)
        integer(self.validation_samples, "Config field 'validation_samples'", minimum=0)
        integer(self.seed, "Config field 'seed'", minimum=None)
        if self.seeds is not None:
            if not isinstance(self.seeds, list) or not self.seeds:
                raise ValueError(f"Config field 'seeds' must be a non-empty list of ints or null, got {self.seeds!r}.")
            for value in self.seeds:
                integer(value, "Config field 'seeds' entries", minimum=None)
            if len(set(self.seeds)) != len(self.seeds):
                raise ValueError(f"Config field 'seeds' repeats a seed: {self.seeds!r}.")
        for index, point in enumerate(self.data_efficiency):
            if not isinstance(point, dict) or set(point) != {"samples", "epochs"} or not all(
                    isinstance(v, int) and v > 0 for v in point.values()):
                raise ValueError(f"data_efficiency[{index}] must be {{samples: N, epochs: E}} with positive ints, got {point!r}.")
        if self.chat_template is not None:
            boolean(self.chat_template, "Config field 'chat_template' (or null)")
        choice(self.dtype, "Config field 'dtype'", [name for name in DTYPES if name != "float64"])
        boolean(self.progress, "Config field 'progress'")

    def to_dict(self) -> dict[str, Any]:
        out = {name: copy.deepcopy(getattr(self, name)) for name in self.__dataclass_fields__}
        out["train"], out["eval"] = asdict(self.train), asdict(self.eval)
        return out


def packaged_configs(bases: bool = False) -> list[str]:
    """The names of the packaged configs; with `bases`, also the bases they include (named with a leading "_")."""
    folder = resources.files("hificl") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml") and (bases or p.name[0] != "_"))


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: mappings merged key by key, everything else replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_one(name: str, relative_to: Path | None) -> tuple[dict[str, Any], Path | None]:
    candidates = [Path(name)] + ([relative_to / name] if relative_to is not None and not Path(name).is_absolute() else [])
    found = next((c for c in candidates if c.is_file()), None)
    if found is not None:
        where, folder = str(found), found.parent
        raw = found.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            line = raw[:error.start].count(b"\n") + 1
            raise ValueError(f"Config {where} line {line} is not UTF-8 text: save the file as UTF-8.") from None
    elif name in packaged_configs(bases=True):
        where, folder = f"{name} (packaged)", None
        text = (resources.files("hificl") / "configs" / f"{name}.yaml").read_text(encoding="utf-8")
    else:
        raise FileNotFoundError(f"Config {name!r} is neither a file nor a packaged config ({packaged_configs()}).")
    try:
        data = parse_yaml(text) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"Config {where}: invalid YAML ({error}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"Config {where}: the top level must be a mapping.")
    return data, folder


def read_yaml(path: str | None, relative_to: Path | None = None, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A YAML file by path, or a packaged config by name (default: the embedded easy-VQA comparison), with its
    ``include``s merged in (see the module docstring)."""
    name = path or DEFAULT_CONFIG
    if name in _seen:
        raise ValueError(f"Config {name!r} includes itself ({' -> '.join(_seen + (name,))}).")
    data, folder = _read_one(name, relative_to)
    includes = data.pop("include", [])
    includes = [includes] if isinstance(includes, str) else includes
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ValueError(f"Config {name}: 'include' must be a config name or a list of them, got {includes!r}.")
    merged: dict[str, Any] = {}
    for included in includes:
        merged = _merge(merged, read_yaml(included, folder, _seen + (name,)))
    return _merge(merged, data)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``dotted.key=value`` (list items by index, e.g. ``methods.1.shots=4``); the value is a YAML scalar.
    ``task.name=OTHER`` starts a fresh task section: the options of the config's own task do not carry over."""
    if "=" not in assignment:
        raise ValueError(f"Override {assignment!r} must look like key=value (e.g. train.epochs=2).")
    path, raw = assignment.split("=", 1)
    try:
        value = parse_yaml(raw) if raw.strip() else ""
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
            if keys == ["task", "name"] and isinstance(node.get("name"), str) and node["name"] != value:
                node.clear()  # another task: the previous task's options are not this one's
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
