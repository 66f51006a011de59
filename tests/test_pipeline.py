"""Trainer, evaluator, tasks and CLI on tiny local models and JSONL tasks with images drawn in the test."""

import json
from pathlib import Path

import pytest
import torch

from hificl import pipeline, protocol
from hificl.backbones import IGNORE_INDEX, load_backbone
from hificl.cli import main as cli_main
from hificl.evaluator import GenerationConfig, evaluate
from hificl.methods import get_method
from hificl.prompting import KShot, Prompter
from hificl.run_config import RunConfig, load_run_config
from hificl.seeding import Seeds
from hificl.tasks import get_task, read_jsonl
from hificl.trainer import Checkpointing, TrainConfig, Trainer


@pytest.fixture(scope="module")
def workspace(tiny_vlm, tiny_lm, colour_task, text_colour_task):
    return {"vlm": tiny_vlm, "lm": tiny_lm, "task": colour_task, "text_task": text_colour_task}


def _config(workspace, out, **extra):
    data = {"backbone": workspace["vlm"], "output_dir": str(out), "progress": False,
            "task": {"name": "jsonl", "train": workspace["task"]["train"], "test": workspace["task"]["test"],
                     "validation_size": 4},
            "methods": [{"name": "zero-shot"}, {"name": "icl", "shots": 2}, {"name": "hificl"}],
            "train": {"epochs": 2, "batch_size": 4, "grad_accum": 2, "lr": 0.05},
            "eval": {"batch_size": 3, "max_new_tokens": 4}, "validation_samples": 4}
    data.update(extra)
    return RunConfig.from_dict(data)


def test_compare_runs_train_eval_report_end_to_end(workspace, tmp_path):
    config = _config(workspace, tmp_path, data_efficiency=[{"samples": 8, "epochs": 2}])
    results = pipeline.compare(config)
    methods = [row["method"] for row in results["rows"]]
    assert methods[:2] == ["zero-shot", "2-shot ICL"] and "HiFICL" in methods
    for row in results["rows"]:
        assert row["metric"] == "vqa_accuracy" and 0.0 <= row["vqa_accuracy"] <= 1.0
        assert row["seconds_per_query"] > 0 and row["prompt_tokens_per_query"] > 0
    shots = {row["method"]: row["prompt_tokens_per_query"] for row in results["rows"]}
    assert shots["2-shot ICL"] > 2 * shots["zero-shot"]
    hificl_row = next(row for row in results["rows"] if row["method"] == "HiFICL")
    assert hificl_row["trainable_params"] > 0 and hificl_row["train_steps"] == 2 * 3  # 20 examples: 5 batches of 4, 3 steps of 2
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"][0]["method"] == "zero-shot" and saved["num_test"] == 8
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("**")
    lines = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("|")]
    header, cells = [c.strip() for c in lines[0]], {line[0].strip(): [c.strip() for c in line] for line in lines[2:]}
    assert cells["HiFICL"][header.index("labelled")] == "20" and cells["zero-shot"][header.index("labelled")] == "0"
    assert (tmp_path / "vqa_accuracy.png").stat().st_size > 0 and (tmp_path / "data_efficiency.png").stat().st_size > 0
    predictions = (tmp_path / "zero-shot" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 8 and {"prediction", "answers", "score"} <= set(json.loads(predictions[0]))
    hificl = next(row for row in results["rows"] if row["method"] == "HiFICL")
    assert hificl["id"].startswith("hificl-") and hificl["seeds"] == [3407]
    train = tmp_path / hificl["id"] / "seed-3407" / "train"
    assert (train / "epoch-2" / "artifact" / "adapter_model.safetensors").is_file()
    phases = [p["phase"] for p in saved["phases"]]  # the wall time of each phase, in order
    assert phases == ["load backbone and data", "zero-shot", "2-shot ICL", "HiFICL", "data efficiency"]
    assert 0.9 * saved["total_seconds"] <= sum(p["seconds"] for p in saved["phases"]) <= saved["total_seconds"]
    assert "Wall time:" in table


def test_cli_train_then_eval_with_the_saved_adapter(workspace, tmp_path, capsys):
    common = ["--backbone", workspace["vlm"], "--no-progress",
              "--set", "task={name: jsonl, train: %s, test: %s}" % (workspace["task"]["train"], workspace["task"]["test"]),
              "--set", "methods=[{name: hificl, rank: 4}]", "--set", "train.epochs=1", "--set", "train.batch_size=8",
              "--set", "validation_samples=0", "--set", "eval.max_new_tokens=3"]
    assert cli_main(["train", *common, "--output-dir", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "adapter" / "adapter_config.json").is_file()
    assert cli_main(["eval", *common, "--output-dir", str(tmp_path / "e"), "--adapter", str(tmp_path / "t" / "adapter")]) == 0
    assert "HiFICL" in capsys.readouterr().out
    assert json.loads((tmp_path / "e" / "results.json").read_text())["rows"][0]["trainable_params"] == 0


def _trainer(workspace, out, epochs=2, seed=5, mixed_precision="no"):
    backbone = load_backbone(workspace["vlm"])
    task = get_task("jsonl", seed=3407, train=workspace["task"]["train"], test=workspace["task"]["test"])
    parts = get_method("hificl", init_seed=1).build(backbone, task, Seeds(seed, seed))
    config = TrainConfig(epochs=epochs, batch_size=5, grad_accum=2, lr=0.05, mixed_precision=mixed_precision)
    return Trainer(parts.model, parts.objective, task.splits["train"], config, seed,
                   Checkpointing(out, parts.adapter.save_pretrained), progress=False), parts


@pytest.mark.parametrize("kind", ["FSDP", "MEGATRON_LM"])  # FSDP without fsdp_version 2: FSDP1
def test_an_engine_the_trainer_cannot_run_is_refused_with_how_to_launch(workspace, tmp_path, monkeypatch, kind):
    from accelerate.utils import DistributedType

    import hificl.trainer as trainer_module

    real = trainer_module.accelerator_for

    def sharded(*args, **kwargs):
        accelerator = real(*args, **kwargs)
        monkeypatch.setattr(type(accelerator), "distributed_type", property(lambda self: DistributedType[kind]))
        return accelerator

    monkeypatch.setattr(trainer_module, "accelerator_for", sharded)
    with pytest.raises(ValueError, match=r"on several with DDP, FSDP2 or DeepSpeed ZeRO; this run is configured for "
                                         + ("FSDP1" if kind == "FSDP" else kind)):
        _trainer(workspace, tmp_path)


def _crash_after(trainer, checkpoint: str) -> None:
    """Train until `checkpoint` is written, then stop as a crash would."""
    original = trainer._save_checkpoint

    def crash(name, position, result, artifact):
        original(name, position, result, artifact)
        if name == checkpoint:
            raise KeyboardInterrupt

    trainer._save_checkpoint = crash
    with pytest.raises(KeyboardInterrupt):
        trainer.train()


def test_resume_after_an_interruption_gives_the_same_adapter(workspace, tmp_path):
    reference, parts = _trainer(workspace, tmp_path / "straight", epochs=3)
    reference.train()
    expected = {k: v.clone() for k, v in parts.adapter.adapters.state_dict().items()}

    interrupted, parts = _trainer(workspace, tmp_path / "broken", epochs=3)
    _crash_after(interrupted, "epoch-2")
    assert interrupted.latest_checkpoint().name == "epoch-2"
    resumed, parts = _trainer(workspace, tmp_path / "broken", epochs=3)  # a fresh process would do exactly this
    result = resumed.train()
    assert result.last_epoch == 3 and result.steps == reference.total_steps
    for key, value in parts.adapter.adapters.state_dict().items():
        assert torch.equal(value, expected[key]), key
    changed, _ = _trainer(workspace, tmp_path / "broken", epochs=3, seed=6)
    with pytest.raises(ValueError, match="settings changed"):
        changed.train()


def test_trainers_with_different_precisions_run_in_one_process(workspace, tmp_path):
    first, _ = _trainer(workspace, tmp_path / "fp32", epochs=1)
    first.train()
    second, parts = _trainer(workspace, tmp_path / "bf16", epochs=1, mixed_precision="bf16")
    result = second.train()
    assert second.accelerator.mixed_precision == "bf16" and result.steps == second.total_steps
    assert all(p.dtype == torch.float32 for p in parts.adapter.adapters.parameters())


def test_loss_mask_covers_exactly_the_answer_tokens(workspace):
    backbone = load_backbone(workspace["vlm"])
    task = get_task("jsonl", seed=3407, train=workspace["task"]["train"], test=workspace["task"]["test"])
    examples = task.splits["train"][:3]
    targets = [task.target_text(e) for e in examples]
    for side in ("left", "right"):
        batch = backbone.encode([task.query_prompt(e) for e in examples], targets, padding_side=side)
        for row, target in enumerate(targets):
            labelled = batch["labels"][row] != IGNORE_INDEX
            assert backbone.tokenizer.decode(batch["labels"][row][labelled]) == target
            assert torch.equal(batch["labels"][row][labelled], batch["input_ids"][row][labelled])
            span = labelled.nonzero().flatten()
            assert span.max() - span.min() + 1 == labelled.sum(), "answer tokens are contiguous"
            assert batch["attention_mask"][row][labelled].all()
            last_real = batch["attention_mask"][row].nonzero().max()
            assert span.max() == last_real, "the answer ends the real tokens"
        image_token = backbone.tokenizer.convert_tokens_to_ids("<image>")
        assert not (batch["labels"] == image_token).any()


@pytest.mark.parametrize("backbone_key, task_key", [("vlm", "task"), ("lm", "text_task")])
def test_batched_evaluation_equals_unbatched(workspace, backbone_key, task_key):
    backbone = load_backbone(workspace[backbone_key])
    task = get_task("jsonl", seed=3407, train=workspace[task_key]["train"], test=workspace[task_key]["test"])
    for method in (get_method("icl", shots=2), get_method("hificl", value_b_std=0.5, init_seed=3)):
        parts = method.build(backbone, task, Seeds(0, 0))
        try:
            batched = evaluate(parts.model, parts.prompter, backbone, task, task.splits["test"],
                               GenerationConfig(batch_size=8, max_new_tokens=6), progress=False)
            single = evaluate(parts.model, parts.prompter, backbone, task, task.splits["test"],
                              GenerationConfig(batch_size=1, max_new_tokens=6), progress=False)
        finally:
            parts.close()
        assert [p["raw"] for p in batched.predictions] == [p["raw"] for p in single.predictions]


def test_icl_with_zero_shots_is_the_zero_shot_prompt(workspace):
    task = get_task("jsonl", seed=3407, train=workspace["task"]["train"], test=workspace["task"]["test"])
    zero, icl0, icl2 = Prompter(task), KShot(task, None, shots=0), KShot(task, None, shots=2)
    example = task.splits["test"][0]
    assert icl0.prompt(example) == zero.prompt(example)
    demos = icl2.demonstrations(example)
    assert icl2.prompt(example) == task.demonstration(demos[0]) + task.demonstration(demos[1]) + zero.prompt(example)
    assert icl2.demonstrations(example) == demos, "the same demonstrations every time"


def test_bad_inputs_raise_clear_errors(workspace, tmp_path):
    good = Path(workspace["task"]["train"]).read_text().splitlines()
    bad = Path(workspace["task"]["train"]).parent / "bad.jsonl"  # beside the images its lines point to
    bad.write_text("\n".join([good[0], "{not json", good[1]]) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: not valid JSON"):
        read_jsonl(bad)
    bad.write_text(json.dumps({"question": "q?"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: needs 'answer'"):
        read_jsonl(bad)
    bad.write_text(json.dumps({"question": "q?", "answer": "a", "image": "missing.png"}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"line 1: image file not found: .*missing.png"):
        read_jsonl(bad)
    bad.write_text(json.dumps({"question": "q?", "answer": "a", "colour": "red"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1: unknown field\(s\) \['colour'\]"):
        read_jsonl(bad)
    with pytest.raises(ValueError, match="Unknown method 'lora-xl'"):
        get_method("lora-xl")
    with pytest.raises(ValueError, match="shots"):
        get_method("icl", shots=-1)
    with pytest.raises(ValueError, match="rank"):
        get_method("hificl", rank=0)
    with pytest.raises(ValueError, match="train.lr"):
        load_run_config(None, ["train.lr=-1"])
    with pytest.raises(ValueError, match=r"Unknown config field\(s\) \['epochs'\]"):
        load_run_config(None, ["epochs=3"])
    with pytest.raises(ValueError, match="Unknown train setting"):
        load_run_config(None, ["train.epoch=3"])
    with pytest.raises(ValueError, match="key=value"):
        load_run_config(None, ["train.epochs"])
    assert cli_main(["compare", "--set", "eval.num_beams=0"]) == 2
    with pytest.raises(ValueError, match="Unknown train setting"):
        protocol.build_method({"name": "hificl", "train": {"lrr": 1}})
    with pytest.raises(ValueError, match="not trained"):
        protocol.build_method({"name": "zero-shot", "train": {"lr": 1.0}})
    backbone = load_backbone(workspace["lm"])
    task = get_task("jsonl", seed=3407, train=workspace["task"]["train"], test=workspace["task"]["test"])
    with pytest.raises(ValueError, match="text-only"):
        backbone.encode([task.query_prompt(task.splits["test"][0])])


def test_packaged_embedded_configs_are_valid():
    config = load_run_config(None)  # the main job: the embedded SmolVLM on easy-VQA
    assert config.backbone == "embedded" and config.task["name"] == "easy-vqa"
    assert [(m["name"], m.get("shots")) for m in config.methods] == [
        ("zero-shot", None), ("icl", 1), ("icl", 2), ("icl", 4), ("icl", 8), ("hificl", None)]
    baselines = load_run_config("embedded-easyvqa-baselines")
    assert {m["name"] for m in baselines.methods} == {"zero-shot", "icl", "lora", "live", "mimic", "hificl"}
    assert baselines.task == config.task  # one prompt format for the embedded model
    text = load_run_config("embedded-text-capitals")
    assert text.backbone == "embedded-text" and text.task["name"] == "capitals"


def test_capitals_task_is_a_fixed_seeded_split():
    task = get_task("capitals", seed=3407)
    assert [len(task.splits[s]) for s in ("train", "validation", "test")] == [90, 20, 60]
    assert get_task("capitals", seed=3407).splits["test"] == task.splits["test"]
    ids = [e.id for split in task.splits.values() for e in split]
    assert len(ids) == len(set(ids)) == 170


def test_cpu_peak_memory_is_per_training_run_where_linux_allows():
    """Methods trained one after another in one process must not inherit each other's peak (checked in a fresh
    process, whose resident memory is not already above the test's allocation)."""
    import subprocess
    import sys

    script = """
import torch
from hificl.memory import peak_memory_mb, reset_peak_memory
cpu = torch.device("cpu")
if not reset_peak_memory(cpu):
    print("skip"); raise SystemExit
start = peak_memory_mb(cpu)
big = torch.ones(100_000_000)  # 400 MB, touched
del big
with_big = peak_memory_mb(cpu)
reset_peak_memory(cpu)
print(start, with_big, peak_memory_mb(cpu))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    if out == ["skip"]:
        pytest.skip("the OS does not allow resetting the peak: the CPU peak covers the whole process here")
    start, with_big, after = map(float, out)
    assert with_big > start + 300 and after < with_big - 300, (start, with_big, after)


def test_atomic_folder_keeps_the_old_folder_when_writing_fails(tmp_path):
    from hificl.io import atomic_folder

    target = tmp_path / "epoch-1"
    with atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_folder(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("disk full")
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["epoch-1"]  # no temporary or set-aside folder left
    with atomic_folder(target) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"] and len(list(tmp_path.iterdir())) == 1


def test_training_metrics_reach_accelerate_trackers(workspace, tmp_path):
    """`train.log_with: [tensorboard]`: the step losses and the validation metric land in TensorBoard's files."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = _config(workspace, tmp_path, methods=[{"name": "hificl"}],
                     train={"epochs": 1, "batch_size": 4, "grad_accum": 1, "lr": 0.05, "log_with": ["tensorboard"]})
    results = pipeline.compare(config)
    logs = tmp_path / results["rows"][0]["id"] / "seed-3407" / "train" / "hificl"  # the tracker's own folder
    assert list(logs.glob("events.out.tfevents.*")), "no TensorBoard event file"
    accumulator = EventAccumulator(str(logs))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/lr", "val/vqa_accuracy"} <= tags
    assert len(accumulator.Scalars("train/loss")) == 5  # 20 training examples, batches of 4


def test_budgets_beyond_the_split_are_clipped_and_reported_as_used(workspace, tmp_path, caplog, capsys):
    """A budget larger than its split trains/tests on what the split holds, says so, and every output states the
    number actually used; data-efficiency points that clip to one size run once."""
    config = _config(workspace, tmp_path, methods=[{"name": "hificl", "rank": 2}], train_samples=1000,
                     validation_samples=50, test_samples=500, train={"epochs": 1, "batch_size": 10, "grad_accum": 1},
                     data_efficiency=[{"samples": 8, "epochs": 1}, {"samples": 100, "epochs": 2},
                                      {"samples": 400, "epochs": 1}])
    with caplog.at_level("WARNING", logger="hificl"):
        results = pipeline.compare(config)
    train, validation, test = 20, 4, 8  # what the task's splits hold
    assert (results["num_train"], results["num_validation"], results["num_test"]) == (train, validation, test)
    assert [(p["samples"], p["epochs"]) for p in results["data_efficiency"]] == [(8, 1), (train, 2)]
    assert results["rows"][0]["train_samples"] == train and results["rows"][0]["labelled_examples"] == train
    warned = caplog.text + capsys.readouterr().err  # (the CLI's handler, where an earlier test set it up)
    assert "train_samples is 1000" in warned and "test_samples is 500" in warned and "validation_samples is 50" in warned
    assert "point 400 samples is dropped" in warned
    table = (tmp_path / "results.md").read_text()
    assert f"{test} test questions, {train} training samples" in table and "| 100 |" not in table
    assert sorted(p.name for p in (tmp_path / "data-efficiency").iterdir()) == ["20-samples", "8-samples"]


@pytest.mark.parametrize("damage", ["state", "weights"])
def test_a_damaged_checkpoint_is_named_and_the_one_before_it_resumes(workspace, tmp_path, caplog, capsys, damage):
    """A damaged newest checkpoint is named in a warning and training resumes from the intact one before it, to
    the adapter of an uninterrupted run; with no intact checkpoint left the error names the file and the fix."""
    reference, parts = _trainer(workspace, tmp_path / "straight", epochs=3)
    reference.train()
    expected = {k: v.clone() for k, v in parts.adapter.adapters.state_dict().items()}
    file = "trainer_state.json" if damage == "state" else "trainable.safetensors"

    def spoil(path):
        path.write_bytes(b'{"result": \x01' if damage == "state" else path.read_bytes()[:40])

    crashed, _ = _trainer(workspace, tmp_path / "run2", epochs=3)
    _crash_after(crashed, "epoch-2")
    damaged = tmp_path / "run2" / "epoch-2" / file
    spoil(damaged)
    caplog.clear()
    capsys.readouterr()
    again, parts = _trainer(workspace, tmp_path / "run2", epochs=3)
    with caplog.at_level("WARNING", logger="hificl"):
        result = again.train()
    warned = caplog.text + capsys.readouterr().err  # (the CLI's handler, where an earlier test set it up)
    assert str(damaged) in warned and "damaged" in warned
    assert result.steps == reference.total_steps
    for key, value in parts.adapter.adapters.state_dict().items():
        assert torch.equal(value, expected[key]), key
    for name in ("epoch-1", "epoch-2", "epoch-3"):  # none intact: the error names the file and the fix
        spoil(tmp_path / "run2" / name / file)
    last, _ = _trainer(workspace, tmp_path / "run2", epochs=3)
    with pytest.raises(ValueError, match=r"epoch-1.*damaged.*--restart"):
        last.train()


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resumes_to_the_same_adapter(workspace, tmp_path):
    """SIGTERM (a scheduler's notice) mid-epoch: the step finishes, a step checkpoint is written, the run stops with
    `Interrupted`; the rerun resumes at the next step and ends with the uninterrupted run's adapter."""
    import os
    import signal

    from hificl.trainer import Interrupted

    reference, parts = _trainer(workspace, tmp_path / "straight", epochs=2)
    reference.train()
    expected = {k: v.clone() for k, v in parts.adapter.adapters.state_dict().items()}
    stopped, parts = _trainer(workspace, tmp_path / "run", epochs=2)
    calls = []
    terms = stopped.objective.terms

    def signalled(model, batch):
        calls.append(1)
        if len(calls) == 3:  # during the 2nd optimiser step (2 micro-batches a step)
            os.kill(os.getpid(), signal.SIGTERM)
        return terms(model, batch)

    stopped.objective.terms = signalled
    with pytest.raises(Interrupted) as stop:
        stopped.train()
    assert stop.value.signum == signal.SIGTERM and stop.value.checkpoint.name == "step-2"
    assert stop.value.checkpoint.is_dir() and len(calls) == 4  # the step was finished, no further one begun
    assert signal.getsignal(signal.SIGTERM) is not None and signal.getsignal(signal.SIGTERM) != stopped._stop._handle
    resumed, parts = _trainer(workspace, tmp_path / "run", epochs=2)
    result = resumed.train()
    assert result.steps == reference.total_steps
    for key, value in parts.adapter.adapters.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_validation_asked_of_a_task_without_it_is_said(workspace, tmp_path, caplog, capsys):
    config = _config(workspace, tmp_path, task={"name": "jsonl", "train": workspace["task"]["train"],
                                                "test": workspace["task"]["test"]}, validation_samples=30)
    with caplog.at_level("WARNING", logger="hificl"):
        run = protocol.Run(config)
    assert run.validation_examples == []
    warned = caplog.text + capsys.readouterr().err
    assert "validation_samples is 30 but task" in warned and "no epoch is chosen on validation" in warned


def test_a_step_of_several_micro_batches_is_the_mean_over_its_answer_tokens(workspace, tmp_path):
    """With grad_accum micro-batches a step's loss (and so its gradient) is the cross-entropy over all of the step's
    answer tokens, as if it were one batch, not the mean of the micro-batches' means."""
    trainer, parts = _trainer(workspace, tmp_path, epochs=1)
    step = [[0, 1, 2, 3, 4], [5, 6]]  # as an epoch's last step can be: micro-batches of other sizes
    items = [[trainer.examples[i] for i in chunk] for chunk in step]
    objective = parts.objective
    with torch.no_grad():
        whole = objective.loss(parts.model, objective.batch(items[0] + items[1])).item()
        means = [objective.loss(parts.model, objective.batch(chunk)).item() for chunk in items]
        tokens = [objective.counts(objective.batch(chunk))[0] for chunk in items]
    # answers of other lengths: weighing the micro-batches equally or by examples would give another loss
    assert tokens[0] * 2 != tokens[1] * 5
    assert abs(whole - sum(means) / 2) > 1e-4 and abs(whole - (5 * means[0] + 2 * means[1]) / 7) > 1e-4
    trainer._examples_seen = 0
    assert trainer._step(step, 0, trainer.accelerator.device) == pytest.approx(whole, rel=1e-5)


@pytest.mark.parametrize("environment, refused", [
    ({"ACCELERATE_USE_FSDP": "true"}, "FSDP with fsdp_version"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu"}, "launched for DeepSpeed")])
def test_a_launch_hificl_cannot_train_with_is_refused_before_the_backbone_loads(workspace, tmp_path, monkeypatch,
                                                                                 environment, refused):
    """`accelerate launch` with an FSDP1 config, or DeepSpeed with parameter offload: a run that trains stops before
    loading the model (which for the models these engines are for takes minutes), naming the setting; evaluating
    is not refused."""
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    loaded = []
    monkeypatch.setattr(protocol, "load_backbone", lambda *args, **kwargs: loaded.append(args) or 1 / 0)
    with pytest.raises(ValueError, match=refused):
        protocol.Run(_config(workspace, tmp_path))
    assert not loaded
    with pytest.raises(ZeroDivisionError):  # evaluation goes on to load the backbone
        protocol.Run(_config(workspace, tmp_path), trains=False)
