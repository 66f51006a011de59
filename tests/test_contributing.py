"""CONTRIBUTING's worked example is real: its "Add a method" code block, run as written, adds a method (and its
adapter) that trains and reports under the protocol, distils as a student and saves and loads like any other."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from hificl import pipeline
from hificl.adapters import ADAPTERS, load_adapter_model
from hificl.backbones import load_backbone
from hificl.methods import METHODS, get_method
from hificl.run_config import RunConfig
from hificl.seeding import Seeds
from hificl.tasks import get_task

GUIDE = Path(__file__).resolve().parents[1] / "CONTRIBUTING.md"


@pytest.fixture
def example(tmp_path):
    section = GUIDE.read_text().split("## Add a method", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    path = tmp_path / "mlp_bias_example.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("mlp_bias_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    METHODS.unregister("mlp_bias")
    ADAPTERS.unregister("mlp_bias")


def test_the_worked_example_trains_distils_and_reloads(example, tiny_vlm, colour_task, tmp_path):
    config = RunConfig.from_dict({
        "backbone": tiny_vlm, "output_dir": str(tmp_path / "run"), "progress": False,
        "task": {"name": "jsonl", "train": colour_task["train"], "test": colour_task["test"], "validation_size": 4},
        "methods": [{"name": "zero-shot"}, {"name": "mlp_bias", "bias_lr": 0.01},
                    {"name": "distill", "shots": 2, "student": "mlp_bias"}],
        "train": {"epochs": 1, "batch_size": 4, "grad_accum": 1, "lr": 0.05}, "eval": {"max_new_tokens": 3},
        "validation_samples": 4, "test_samples": 4})
    results = pipeline.compare(config)
    rows = {row["method"]: row for row in results["rows"]}
    backbone = load_backbone(tiny_vlm)
    layers, hidden = backbone.model.config.text_config.num_hidden_layers, backbone.model.config.text_config.hidden_size
    assert rows["MLP bias"]["trainable_params"] == layers * hidden and rows["MLP bias"]["trained"]
    assert rows["MLP bias distilled (2-shot)"]["unlabelled_examples"] > 0

    method = get_method("mlp_bias", bias_lr=0.01)
    task = get_task("jsonl", seed=3407, train=colour_task["train"], test=colour_task["test"])
    parts = method.build(backbone, task, Seeds(0, 0))
    try:
        assert parts.param_groups == [{"params": ["shifts.bias"], "lr": 0.01}]
        with torch.no_grad():
            parts.adapter.shifts.bias.fill_(0.5)
        parts.adapter.save_pretrained(tmp_path / "adapter")
    finally:
        parts.close()
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["method"] == "mlp_bias" and saved["trained_by"]["options"] == {"bias_lr": 0.01}
    loaded = load_adapter_model(backbone.model, tmp_path / "adapter")
    try:
        assert isinstance(loaded, example.MlpBiasModel) and bool((loaded.shifts.bias == 0.5).all())
        batch = backbone.encode(["Question: What colour is it?\nAnswer:"])
        with torch.no_grad():
            adapted = loaded(**batch).logits
            with loaded.disable_adapter():
                base = loaded(**batch).logits
        assert not torch.allclose(adapted, base), "the biases change the output; disabled, the base model"
    finally:
        loaded.unload()
