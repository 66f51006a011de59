"""Run configs: includes (a config states only what differs from its base), YAML numbers, clear errors."""

import pytest

from hificl.run_config import load_run_config, packaged_configs, read_yaml


def test_include_merges_mappings_and_replaces_lists_and_scalars(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "task: {name: capitals, test_size: 40}\nmethods: [{name: zero-shot}, {name: hificl}]\n"
        "train: {epochs: 3, lr: 5.0e-3}\nseed: 1\n")
    (tmp_path / "child.yaml").write_text(
        "include: base.yaml\ntask: {validation_size: 10}\nmethods: [{name: icl, shots: 2}]\ntrain: {epochs: 1}\n")
    data = read_yaml(str(tmp_path / "child.yaml"))
    assert data["task"] == {"name": "capitals", "test_size": 40, "validation_size": 10}
    assert data["methods"] == [{"name": "icl", "shots": 2}], "lists are replaced, not merged"
    assert data["train"] == {"epochs": 1, "lr": 5e-3} and data["seed"] == 1 and "include" not in data


def test_includes_apply_in_order_and_packaged_bases_resolve(tmp_path):
    (tmp_path / "a.yaml").write_text("seed: 1\noutput_dir: a\n")
    (tmp_path / "b.yaml").write_text("seed: 2\n")
    (tmp_path / "c.yaml").write_text("include: [a.yaml, b.yaml]\ntest_samples: 5\n")
    data = read_yaml(str(tmp_path / "c.yaml"))
    assert data["seed"] == 2 and data["output_dir"] == "a" and data["test_samples"] == 5
    (tmp_path / "mine.yaml").write_text("include: embedded-easyvqa\ntrain_samples: 10\n")  # a packaged config
    mine = load_run_config(str(tmp_path / "mine.yaml"))
    assert mine.train_samples == 10 and mine.task == load_run_config(None).task


def test_bases_are_not_listed_as_runnable_configs_but_the_benchmarks_use_them():
    assert not [name for name in packaged_configs() if name.startswith("_")]
    assert "_paper-base" in packaged_configs(bases=True)
    qwen, idefics = load_run_config("qwen3-vl-okvqa"), load_run_config("idefics2-coco")
    assert qwen.train.lr == 5e-4 and qwen.train.epochs == 3 and qwen.task["name"] == "ok-vqa"
    assert next(m for m in qwen.methods if m["name"] == "hificl")["rank"] == 16
    assert idefics.chat_template is False and idefics.eval.num_beams == 1 and idefics.task["instruction"] == ""
    assert {m["name"] for m in idefics.methods} >= {"live", "mimic", "lora"}


def test_include_errors_name_the_problem(tmp_path):
    (tmp_path / "loop.yaml").write_text("include: loop.yaml\n")
    with pytest.raises(ValueError, match="includes itself"):
        read_yaml(str(tmp_path / "loop.yaml"))
    (tmp_path / "missing.yaml").write_text("include: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match="'nowhere.yaml' is neither a file nor a packaged config"):
        read_yaml(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("include: {a: 1}\n")
    with pytest.raises(ValueError, match="'include' must be a config name or a list"):
        read_yaml(str(tmp_path / "bad.yaml"))


def test_yaml_reads_exponent_floats_without_a_dot(tmp_path):
    config = load_run_config(None, ["train.lr=1e-3", "train.weight_decay=5E-4"])
    assert config.train.lr == 1e-3 and config.train.weight_decay == 5e-4
    (tmp_path / "c.yaml").write_text("include: embedded-easyvqa\ntrain: {lr: 2e-3}\n")
    assert load_run_config(str(tmp_path / "c.yaml")).train.lr == 2e-3
    with pytest.raises(ValueError, match=r"train.lr must be a finite number > 0, got 'fast'"):
        load_run_config(None, ["train.lr=fast"])


def test_the_elements_example_loads_from_the_repository_root(monkeypatch):
    """examples/elements/distill.yaml (the held-out distillation task) reads as a run config and a task, its data
    the 118 elements split 70 / 48 without overlap."""
    from pathlib import Path

    from hificl.tasks import get_task

    root = Path(__file__).parents[1]
    monkeypatch.chdir(root)
    config = load_run_config("examples/elements/distill.yaml")
    task = get_task(config.task["name"], seed=config.seed, **{k: v for k, v in config.task.items() if k != "name"})
    train, test = task.splits["train"], task.splits["test"]
    assert (len(train), len(test)) == (70, 48)
    assert not {e.question for e in train} & {e.question for e in test}
    assert {m["name"] for m in config.methods} >= {"icl", "distill"}
